#!/usr/bin/env python3
"""KDA on one NVIDIA GPU: check our Pallas GPU kernel against the XLA path, then time it.

Run from the repository root on the GPU machine (no network needed):

    python tools/device/kda_gpu.py                 # check + full timing table
    python tools/device/kda_gpu.py --quick         # checks f32 + bf16 "default", T=2048 only
    python tools/device/kda_gpu.py --budget-s 300  # stop starting new timings after 300 s

1. Correctness: `kda_pallas_gpu` (Pallas, Triton backend, compiled for the GPU, not interpreted)
   against the pure-JAX/XLA path (`impl="chunk"` if present, else the lax.scan recurrence) for
   outputs, final state and all six gradients, float32 and bfloat16, plain and varlen, plus the
   bf16-operand matmuls (`precision="default"`, bound 1e-2). Accuracy as rms(ref - impl) / rms(ref).
2. Timing, B=8, H=16, K=V=128, bf16 q/k/v (f32 g, beta, state), T in 2048, 8192, 32768:
   forward and forward+backward for our Pallas kernel (bf16 operands with f32 accumulation,
   `precision="default"`, at num_stages 1 and 2; and float32 operands, "highest": TF32x3 dots,
   IEEE in the intra kernel), our pure-JAX chunk path, and
   flash-linear-attention's Triton `chunk_kda` (torch). fla is installed offline from the wheel
   committed under tools/device/wheels/ (`pip install --no-deps`); if it cannot be imported the
   fla column says why. fla runs in a subprocess so torch and JAX do not share a CUDA context
   or fight over memory.

Prints one JSON line with every figure and the ratios measured in this run, then a short table
last. Failures of one configuration (OOM, compile error) are reported and the run goes on.

Budget for compiles, not for runs: on an H200 (2026-12-04, jax 0.11.2) the checks alone took
315 s (the "highest" ones 80-110 s each, "default" 28 s), and fla's first `chunk_kda` call
(Triton autotuning) did not finish in 60-77 s. Two runs of 330 s and 385 s timed nothing;
give a whole run 10 minutes, or `--quick`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
WHEELS = REPO / "tools" / "device" / "wheels"
B, H, K, V = 8, 16, 128, 128
T_FULL = (2048, 8192, 32768)
TOL_F32 = 1e-4
TOL_BF16 = 1e-2


# ----------------------------------------------------------------------------------------------
# fla (torch) side: runs in a subprocess, prints one JSON line


def fla_worker(T_list, reps):
    out = {}
    try:
        import torch  # noqa: PLC0415 (optional: torch, in the fla subprocess only)

        try:
            from fla.ops.kda import chunk_kda  # noqa: PLC0415 (optional: fla, installed below if absent)
        except ImportError:
            wheels = sorted(glob.glob(str(WHEELS / "fla_core-*.whl")))
            if not wheels:
                raise
            r = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheels[-1]],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:  # read-only site-packages: unpack the pure-Python wheel
                target = tempfile.mkdtemp(prefix="fla_wheel_")
                zipfile.ZipFile(wheels[-1]).extractall(target)
                sys.path.insert(0, target)
            importlib.invalidate_caches()
            from fla.ops.kda import chunk_kda  # noqa: PLC0415 (optional: fla, just installed)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(json.dumps({"fla_error": f"{type(e).__name__}: {e}"}))
        return
    dev = "cuda"
    torch.manual_seed(0)
    for T in T_list:
        try:
            q = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
            k = torch.nn.functional.normalize(torch.randn_like(q).float(), dim=-1).bfloat16()
            v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
            g = -torch.rand(B, T, H, K, device=dev, dtype=torch.float32) * 0.5
            beta = torch.rand(B, T, H, device=dev, dtype=torch.float32).sigmoid()
            h0 = torch.zeros(B, H, K, V, device=dev, dtype=torch.float32)
            do = torch.randn_like(v)

            def fwd():
                with torch.no_grad():
                    return chunk_kda(
                        q,
                        k,
                        v,
                        g,
                        beta,
                        initial_state=h0,
                        output_final_state=True,
                        use_qk_l2norm_in_kernel=True,
                    )

            leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta)]

            def fwd_bwd():
                o, _ = chunk_kda(
                    *leaves, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True
                )
                o.backward(do)
                for x in leaves:
                    x.grad = None

            res = {}
            for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                times = []
                for _ in range(reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fn()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                res[name] = statistics.median(times)
            out[str(T)] = res
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            out[str(T)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(json.dumps({"fla": out, "torch": torch.__version__}))


def run_fla(T_list, reps, timeout_s, smoke=False):
    cmd = [sys.executable, __file__, "--fla-worker", "--T", *map(str, T_list), "--reps", str(reps)]
    cmd += ["--smoke"] if smoke else []
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"fla_error": f"timed out after {timeout_s}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"fla_error": f"no result (rc={p.returncode}): {p.stderr[-400:]}"}


# ----------------------------------------------------------------------------------------------
# JAX side


@contextlib.contextmanager
def kernel_settings(stages=None):
    """Trace the GPU kernels with other launch settings, for the variants below: `stages`
    replaces gpu.NUM_STAGES."""
    from pallas_kernels.kda import gpu  # noqa: PLC0415 (jax is imported in main, after the env is set)

    saved = gpu.NUM_STAGES
    if stages is not None:
        gpu.NUM_STAGES = stages
    try:
        yield
    finally:
        gpu.NUM_STAGES = saved


def settled(jitted, settings):
    """`jitted` traced (first call) under `kernel_settings(**settings)`; every call enters it."""

    def call(*a):
        with kernel_settings(**settings):
            return jitted(*a)

    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="checks f32 and bf16_precision_default, time T=2048 only"
    )
    ap.add_argument("--T", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--budget-s", type=float, default=420.0, help="start no new timing after this many seconds"
    )
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--fla-T", type=int, nargs="*", default=None, help="fla's T values (default: --T)")
    ap.add_argument("--cases", nargs="*", default=None, help="correctness cases to run (default: all)")
    ap.add_argument("--fla-s", type=float, default=120.0, help="seconds fla may run past the budget")
    ap.add_argument("--out", default=None, help="also write the JSON report to this file")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU smoke test of this script: tiny shapes, Pallas interpret mode",
    )
    ap.add_argument("--fla-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global B, H, K, V
    if args.smoke:
        B, H, K, V = 1, 2, 32, 32
        args.T = args.T or [128]
        args.reps = 1
    T_list = args.T or ((2048,) if args.quick else T_FULL)
    if args.fla_worker:
        fla_worker(T_list, args.reps)
        return

    t_start = time.time()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(REPO))
    import jax  # noqa: PLC0415 (after XLA_PYTHON_CLIENT_PREALLOCATE; the fla subprocess never imports jax)
    import jax.numpy as jnp  # noqa: PLC0415 (as above)

    from pallas_kernels.kda.gpu import kda_pallas_gpu  # noqa: PLC0415 (after sys.path gets the repo root)
    from pallas_kernels.kda.reference import kda_recurrent  # noqa: PLC0415 (as above)

    if args.smoke:
        kda_pallas_gpu = functools.partial(kda_pallas_gpu, interpret=True)
    kda_pallas_gpu_default = functools.partial(kda_pallas_gpu, precision="default")
    try:
        from pallas_kernels.kda.chunk import kda_chunk  # noqa: PLC0415 (optional: falls back to the recurrence)

        xla_name = "chunk"
    except ImportError:
        kda_chunk, xla_name = kda_recurrent, "recurrent"

    print(f"jax {jax.__version__} devices {jax.devices()} xla path: {xla_name}", flush=True)
    report = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "xla_path": xla_name,
        "shape": {"B": B, "H": H, "K": K, "V": V},
    }

    def rel(a, b):
        a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
        b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
        return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-30))

    def inputs(key, Bn, T, dtype, n_seq=None):
        ks = jax.random.split(key, 8)
        N = Bn if n_seq is None else n_seq
        q = jax.random.normal(ks[0], (Bn, T, H, K), dtype)
        k = jax.random.normal(ks[1], (Bn, T, H, K), dtype)
        v = jax.random.normal(ks[2], (Bn, T, H, V), dtype)
        g = -jax.random.uniform(ks[3], (Bn, T, H, K)) * 0.5
        g = jnp.where(jax.random.uniform(ks[4], g.shape) < 0.05, -15.0, g)  # some extreme gates
        beta = jax.nn.sigmoid(jax.random.normal(ks[5], (Bn, T, H)))
        h0 = jax.random.normal(ks[6], (N, H, K, V)) * 0.1
        do = jax.random.normal(ks[7], (Bn, T, H, V), dtype)
        dht = jax.random.normal(ks[7], (N, H, K, V)) * 0.1
        return (q, k, v, g, beta, h0), do, dht

    def grads_fn(fn, cu=None):
        def loss(q, k, v, g, beta, h0, do, dht):
            o, ht = fn(
                q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm=True
            )
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(ht * dht), (o, ht)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))

    # 1. correctness ---------------------------------------------------------------------------
    checks = {}
    all_ok = True
    cases = [
        ("f32", jnp.float32, 2, 300, None),
        ("bf16", jnp.bfloat16, 2, 300, None),
        ("f32_varlen", jnp.float32, 1, 400, jnp.asarray([0, 50, 50, 250, 400], jnp.int32)),
    ]
    if args.smoke:
        cases = [("f32", jnp.float32, 1, 70, None)]
    cases.append(("bf16_precision_default", jnp.bfloat16, 2, 300, None))
    wanted = args.cases or (("f32", "bf16_precision_default") if args.quick else None)
    cases = [c for c in cases if wanted is None or c[0] in wanted]
    for name, dtype, Bn, T, cu in cases:
        ours = kda_pallas_gpu_default if name.endswith("precision_default") else kda_pallas_gpu
        try:
            n_seq = None if cu is None else cu.shape[0] - 1
            x, do, dht = inputs(jax.random.PRNGKey(1), Bn, T, dtype, n_seq)
            got_g, (o, ht) = grads_fn(ours, cu)(*x, do, dht)
            tol = TOL_BF16 if dtype == jnp.bfloat16 else TOL_F32
            checks[name] = {"tol": tol}
            ok = True
            # vs the XLA chunk path (the reference) and vs the recurrence (ground truth)
            refs = {xla_name: kda_chunk, "recurrent": kda_recurrent}
            for ref_name, ref_fn in refs.items():
                ref_g, (ref_o, ref_ht) = grads_fn(ref_fn, cu)(*x, do, dht)
                errs = {"o": rel(o, ref_o), "ht": rel(ht, ref_ht)}
                errs.update(
                    {
                        n: rel(gg, rg)
                        for n, gg, rg in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), got_g, ref_g)
                    }
                )
                ok &= all(np.isfinite(e) and e <= tol for e in errs.values())
                checks[name][f"vs_{ref_name}"] = {k_: round(e, 8) for k_, e in errs.items()}
            checks[name]["ok"] = ok
            checks[name]["at_s"] = round(time.time() - t_start, 1)
            all_ok &= ok
        except Exception as e:  # noqa: BLE001
            all_ok = False
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        print(f"check {name}: {checks[name]}", flush=True)
    report["checks"] = checks
    report["checks_ok"] = all_ok

    # 2. timing --------------------------------------------------------------------------------
    def bench(fn, *a):
        out = fn(*a)
        jax.block_until_ready(out)  # compile + warm up
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def fwd_fn(fn):
        return jax.jit(
            lambda q, k, v, g, beta, h0: fn(
                q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True
            )
        )

    def fwd_bwd_fn(fn):
        def loss(q, k, v, g, beta, h0, do):
            o, _ = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=tuple(range(5))))

    timings = {}
    # name -> (kda function, kernel_settings): ours as shipped, then the variants under trial
    # Quickest to compile first: on an H200 (jax 0.11.2) one "highest" check took 80-110 s, mostly
    # ptxas on the large IEEE intra and TF32x3 grads kernels; the "default" check 28 s.
    impls = {
        "pallas_gpu_default": (kda_pallas_gpu_default, {}),
        f"jax_{xla_name}": (kda_chunk, {}),
        "pallas_gpu": (kda_pallas_gpu, {}),
    }
    if not args.smoke:
        impls["pallas_gpu_default_stages2"] = (kda_pallas_gpu_default, {"stages": 2})
    for T in T_list:
        x, do, _ = inputs(jax.random.PRNGKey(2), B, T, jnp.bfloat16)
        g = -jax.random.uniform(jax.random.PRNGKey(3), x[3].shape) * 0.5  # as the fla run
        x = (x[0], x[1], x[2], g, x[4], jnp.zeros_like(x[5]))
        for name, (fn, settings) in impls.items():
            if time.time() - t_start > args.budget_s:
                timings.setdefault(str(T), {})[name] = {"skipped": "time budget"}
                continue
            res = {}
            try:
                res["fwd"] = bench(settled(fwd_fn(fn), settings), *x)
                res["fwd_bwd"] = bench(settled(fwd_bwd_fn(fn), settings), *x, do)
            except Exception as e:  # noqa: BLE001
                res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            timings.setdefault(str(T), {})[name] = res
            print(f"T={T} {name}: {res}", flush=True)
        del x, do
    report["timings_ms"] = timings

    if args.skip_fla:
        report["fla"] = {"fla_error": "skipped (--skip-fla)"}
    else:
        left = max(60.0, args.budget_s + args.fla_s - (time.time() - t_start))
        report["fla"] = run_fla(args.fla_T or T_list, args.reps, timeout_s=left, smoke=args.smoke)
        for T, res in report["fla"].get("fla", {}).items():
            timings.setdefault(T, {})["fla_chunk_kda"] = res
        print(f"fla: {report['fla'].get('fla_error', 'ok')}", flush=True)

    ratios = {}
    for T, row in timings.items():
        for mine in [n for n in impls if n.startswith("pallas")]:
            ours = row.get(mine, {})
            for other in (f"jax_{xla_name}", "fla_chunk_kda"):
                theirs = row.get(other, {})
                for m in ("fwd", "fwd_bwd"):
                    if m in ours and m in theirs:
                        ratios[f"T{T}_{m}_{other}_over_{mine}"] = round(theirs[m] / ours[m], 3)
    report["ratios"] = ratios
    report["wall_s"] = round(time.time() - t_start, 1)
    print(json.dumps(report))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))

    # short table, last
    print(
        f"\nKDA B={B} H={H} K={K} V={V} bf16 on {report['device']}, jax {jax.__version__}; "
        f"checks {'PASS' if all_ok else 'FAIL'}; ms (median of {args.reps})"
    )
    cols = [*impls, "fla_chunk_kda"]
    print(f"{'T':>6} {'':<8}" + "".join(f"{c:>28}" for c in cols))
    for T in map(str, T_list):
        for m in ("fwd", "fwd_bwd"):
            cells = []
            for c in cols:
                r = timings.get(T, {}).get(c, {})
                cells.append(f"{r[m]:.2f}" if m in r else ("err" if "error" in r else "-"))
            print(f"{T:>6} {m:<8}" + "".join(f"{x:>28}" for x in cells))
    if "fla_error" in report["fla"]:
        print(f"fla not measured: {report['fla']['fla_error']}")


if __name__ == "__main__":
    main()
