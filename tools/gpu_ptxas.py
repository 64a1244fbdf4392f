"""Registers, spills and shared memory of the Pallas GPU (Triton) KDA kernels, compiled for sm_90
without a GPU.

Two steps, in two interpreters (jaxlib and the triton wheel each carry their own MLIR/LLVM, so
they are kept out of one process):

1. Under the project's jax (`.venv-newest`, jax 0.12): trace forward+backward of
   `kda_pallas_gpu` at Kimi's shape (B = 1, H = 32, K = V = 128, bf16 q/k/v, in-kernel L2 norm)
   and lower it for platform "cuda" (an abstract H100 names the target; no GPU, no jaxlib CUDA
   plugin needed). The Triton IR (TTIR) that Pallas builds for each `pallas_call` is captured
   from `jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module` (the same module that
   goes, serialized, into the `__gpu$xla.gpu.triton` custom call's `ir` attribute) and written
   to `OUT/<kernel>_<precision>[_bv<BV>].ttir`. The state passes' V slice BV is set by replacing
   `gpu.state_block_v` in this process only; nothing in the kernels changes.
2. Under an interpreter with the `triton` wheel: `triton.compile(<ttir>, target=GPUTarget("cuda",
   90, 32), options=dict(num_warps=, num_stages=))` runs Triton's own TTIR -> TTGIR -> LLVM ->
   PTX -> cubin pipeline for sm_90a, with the ptxas the wheel bundles (CUDA 13.4 in triton
   3.9.0) and Triton's flags (`-v --regAllocOptLevel=2 -lineinfo`); the ptxas log
   (TRITON_DUMP_PTXAS_LOG=1) gives registers per thread, spill bytes and the stack frame, the
   kernel metadata the shared memory Triton allocates.

One JSON line per (kernel, precision, BV, num_warps, num_stages); results are appended to
`OUT/results.jsonl` and reused on a rerun (delete the file to recompute).

Setup (a separate venv; leave .venv / .venv-newest alone):

    python3.12 -m venv /tmp/gpuvenv
    /tmp/gpuvenv/bin/pip install triton==3.9.0

Reproduce (from the repository root; the grads kernel under "highest" takes ~9 min of one core
at 8 warps, and at 4 warps its ptxas grew past 16 GB and was killed on a 23 GB machine; the
intra kernel ~1-6 min, the state passes seconds each; 2026-12-04 figures in docs/kernels.md):

    JAX_PLATFORMS=cpu .venv-newest/bin/python tools/gpu_ptxas.py \
        --triton-python /tmp/gpuvenv/bin/python --out /tmp/kda_ptxas
    # subsets: --kernels kda_state_fwd_gpu kda_state_bwd_gpu --precision default --warps 4 --bv 32

Caveat: on a GPU, XLA compiles the same TTIR with its own copy of Triton (the commit jaxlib
pins) and its own ptxas, whose passes and flags differ in detail from the pip wheel's; the
figures are Triton 3.9's compile of the IR Pallas emits, not XLA's. They are evidence about
register pressure, not a substitute for a device run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = (
    "kda_chunk_intra_gpu",
    "kda_state_fwd_gpu",
    "kda_state_bwd_gpu",
    "kda_state_grads_gpu",
    "kda_chunk_grads_gpu",
)
STATE_KERNELS = ("kda_state_fwd_gpu", "kda_state_bwd_gpu")


# step 1: TTIR (jax venv) ---------------------------------------------------------------------------


def dump_ttir(out: pathlib.Path, T: int, precision: str, bv: int) -> dict[str, pathlib.Path]:
    """Lower forward+backward for "cuda" with the state passes' V slice forced to `bv`; write each
    pallas_call's TTIR. Returns {kernel name: path}."""
    sys.path.insert(0, str(ROOT))
    import jax  # noqa: PLC0415 (step 1 only: the triton interpreter does not have jax)
    import jax.numpy as jnp  # noqa: PLC0415
    from jax._src.pallas.triton import lowering as tl  # noqa: PLC0415 (JAX internals)
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh  # noqa: PLC0415

    from pallas_kernels.kda import gpu  # noqa: PLC0415

    captured: dict[str, str] = {}
    orig_lower, orig_bv = tl.lower_jaxpr_to_triton_module, gpu.state_block_v

    def capture(jaxpr, *a, **kw):
        res = orig_lower(jaxpr, *a, **kw)
        name = str(res.module.operation.attributes["sym_name"]).strip('"')
        captured[name] = res.module.operation.get_asm()
        return res

    B, H, K, V = 1, 32, 128, 128
    sds, bf16, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32

    def loss(q, k, v, g, beta, h0):
        o, ht = gpu.kda_pallas_gpu(
            q,
            k,
            v,
            g,
            beta,
            initial_state=h0,
            output_final_state=True,
            use_qk_l2norm=True,
            precision=precision,
        )
        return jnp.sum(o.astype(f32)) + jnp.sum(ht)

    args = (
        sds((B, T, H, K), bf16),
        sds((B, T, H, K), bf16),
        sds((B, T, H, V), bf16),
        sds((B, T, H, K), f32),
        sds((B, T, H), f32),
        sds((1, H, K, V), f32),
    )
    h100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    tl.lower_jaxpr_to_triton_module = capture
    gpu.state_block_v = lambda *_: bv
    try:
        with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
            jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        tl.lower_jaxpr_to_triton_module, gpu.state_block_v = orig_lower, orig_bv
    assert sorted(captured) == sorted(KERNELS), sorted(captured)
    paths = {}
    for name, text in captured.items():
        suffix = f"_bv{bv}" if name in STATE_KERNELS else ""
        path = out / f"{name}_{precision}{suffix}.ttir"
        path.write_text(text)
        paths[name] = path
    return paths


# step 2: compile (triton venv) ---------------------------------------------------------------------


def compile_one(path: str, num_warps: int, num_stages: int) -> dict:
    """Compile one TTIR file for sm_90 with the triton wheel; registers, spills, shared memory."""
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    import triton  # noqa: PLC0415 (step 2 only)
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: make_cubin prints ptxas -v
        kernel = triton.compile(
            path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
        )
    seconds = time.time() - t0
    text = log.getvalue()
    ptx = kernel.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
    if "Used" not in text:  # a Triton cache hit skips ptxas: run it as make_cubin does
        src = pathlib.Path(path).with_suffix(f".w{num_warps}s{num_stages}.ptx")
        src.write_text(ptx)
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a"]
        text = subprocess.run(
            [ptxas, *flags, str(src), "-o", os.devnull], capture_output=True, text=True
        ).stderr

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": grab(r"(\d+) bytes stack frame"),
        "shared_bytes": kernel.metadata.shared,
        "tensor_core_ops_in_ptx": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)", ptx)),
        "ptx_bytes": len(ptx),
        "compile_s": round(seconds, 1),
        "triton": triton.__version__,
        "ptxas": re.search(
            r"release ([\d.]+)", subprocess.check_output([ptxas, "--version"], text=True)
        ).group(1),
        "target": "sm_90a",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/kda_ptxas")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--precision", nargs="+", default=["highest", "default"])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS))
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument(
        "--stages", nargs="+", type=int, default=[1, 2, 3], help="state passes (they loop over chunks)"
    )
    p.add_argument(
        "--parallel-stages",
        nargs="+",
        type=int,
        default=[1],
        help="intra/grads kernels (grid over chunks; their loops hold no loads to pipeline)",
    )
    p.add_argument("--bv", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--triton-python", default="/tmp/gpuvenv/bin/python")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    p.add_argument("--compile-one", help=argparse.SUPPRESS)  # internal: step 2 in the triton venv
    a = p.parse_args()

    if a.compile_one:
        print(json.dumps(compile_one(a.compile_one, a.warps[0], a.stages[0])))
        return

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["kernel"], r["precision"], r["bv"], r["num_warps"], r["num_stages"], r["T"])] = r

    jobs = []
    for prec in a.precision:
        ttir = {}
        for bv in a.bv:
            paths = dump_ttir(out, a.T, prec, bv)
            for name, path in paths.items():
                key_bv = bv if name in STATE_KERNELS else None
                ttir[(name, key_bv)] = path
        for (name, bv), path in sorted(ttir.items(), key=lambda kv: (KERNELS.index(kv[0][0]), kv[0][1] or 0)):
            if name not in a.kernels:
                continue
            stages = a.stages if name in STATE_KERNELS else a.parallel_stages
            for w in a.warps:
                for s in stages:
                    jobs.append((name, prec, bv, w, s, path))

    env = dict(
        os.environ,
        TRITON_DUMP_PTXAS_LOG="1",
        TRITON_DEFAULT_FP_FUSION="1",
        TRITON_CACHE_DIR=str(out / "triton_cache"),
    )
    for name, prec, bv, w, s, path in jobs:
        key = (name, prec, bv, w, s, a.T)
        if key in done:
            print(json.dumps(done[key]), flush=True)
            continue
        cmd = [a.triton_python, __file__, "--compile-one", str(path), "--warps", str(w), "--stages", str(s)]
        row = {"kernel": name, "precision": prec, "bv": bv, "num_warps": w, "num_stages": s, "T": a.T}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                lines = [ln for ln in proc.stderr.splitlines() if re.search(r"error|fatal|Error|SIGSEGV", ln)]
                row["error"] = " | ".join(lines[-4:]) or f"rc {proc.returncode}"
        except subprocess.TimeoutExpired:
            row["error"] = f"timeout after {a.timeout} s"
        print(json.dumps(row), flush=True)
        if "error" not in row:
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
