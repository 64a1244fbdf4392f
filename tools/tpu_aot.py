"""Compile a config's train step for a TPU slice without a TPU: per-device memory and compiler counts.

libtpu (`pip install -e '.[tpu-aot]'`, Python >= 3.12) provides compile-only TPU devices for a
named topology (`jax.experimental.topologies.get_topology_desc`); the train step is lowered with
its real shardings on a mesh over those devices and compiled by the real TPU compiler (XLA:TPU and
Mosaic for the Pallas kernels), as it would be on the slice. Nothing runs, nothing is allocated.

    python tools/tpu_aot.py --config configs/small.json --topology v5e:2x2 --mesh fsdp=2,expert=2 \\
        --seq-len 128 --batch 4
    python tools/tpu_aot.py --config configs/kimi_linear_48b_a3b.json --topology v5p:4x4x4 \\
        --mesh fsdp=16,expert=4 --seq-len 4096 --batch 64 --remat full --param-dtype bfloat16 \\
        --compute-dtype bfloat16

    python tools/tpu_aot.py --kda 1,4096,32,128 --topology v5e:2x2 --dtype bfloat16   # KDA op alone
    python tools/tpu_aot.py --kda 1,4096,32,128 --topology v5e:2x2 --impl pallas_tpu  # one impl only
    python tools/tpu_aot.py --kda 1,4096,32,128 --topology v5e:2x2 --impl pallas_tpu \\
        --precision default --state-stride 1   # the Pallas kernels' matmul precision; saved states

Prints one JSON line: per-device bytes (arguments, outputs, aliased, temporaries, generated code,
and their peak sum), the compiler's FLOP / transcendental / byte-access counts per device, the
mesh, the topology's HBM per chip where known, and the lower / compile times.

The model is traced as it would be on a TPU: `jax.default_backend()` answers "tpu" while tracing,
so every `impl="auto"` choice (KDA -> the Pallas TPU kernel, MoE dispatch, attention backend)
resolves as on the chip, not as on this CPU host. `--layers N` keeps the first N layers (for a
quick compile of a very deep config; per-layer costs scale linearly, so extrapolate).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import time
from unittest import mock

# libtpu locks /tmp/libtpu_lockfile for the life of the process that loads it; compiling needs no
# chip, so let other processes (tests, another run of this tool) load it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after the libtpu setting above)
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import pallas_kernels.attention as att  # noqa: E402
from jaxllm import sharding as shd  # noqa: E402
from jaxllm.models import registry  # noqa: E402
from jaxllm.train import loop  # noqa: E402
from jaxllm.train.config import RunConfig  # noqa: E402
from jaxllm.train.step import DTYPES, make_train_step  # noqa: E402
from pallas_kernels.kda import kda  # noqa: E402
from pallas_kernels.kda.tpu import kda_pallas_tpu  # noqa: E402

# Per-chip HBM (GiB) of the TPU generations libtpu names, for the "fits" column.
HBM_GIB = {"v4": 32, "v5e": 16, "v5 lite": 16, "v5p": 95, "v5": 95, "v6e": 32, "v6 lite": 32}


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=16,expert=4' -> {'data': 1, 'fsdp': 16, 'tensor': 1, 'expert': 4}; unnamed axes are 1."""
    sizes = dict.fromkeys(shd.MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise SystemExit(
                f"--mesh: bad entry {part!r}; allowed: AXIS=N with AXIS in {shd.MESH_AXES}, N >= 1"
            )
        sizes[name] = int(value)
    return sizes


def tpu_devices(topology: str):
    """The compile-only devices of a named TPU topology (e.g. 'v5e:2x2', 'v5p:4x4x4')."""
    try:
        import libtpu  # noqa: F401, PLC0415 (optional: the tpu-aot extra, Python >= 3.12)
    except ImportError as e:
        raise RuntimeError(
            f"libtpu is not importable ({e}); install the extra: pip install -e '.[tpu-aot]' (Python >= 3.12)"
        ) from None
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


@contextlib.contextmanager
def traced_as_on_tpu(attention: str = "auto"):
    """`jax.default_backend()` answers 'tpu' inside: `impl="auto"` choices trace as on a TPU.

    `attention` other than "auto" makes `pallas_kernels.attention`'s "auto" resolve to that impl
    (e.g. "blockwise", the pure-JAX path, where the Pallas TPU attention cannot be compiled)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(jax, "default_backend", lambda: "tpu"))
        if attention != "auto":
            resolve = att.resolve_impl
            stack.enter_context(
                mock.patch.object(
                    att, "resolve_impl", lambda impl: resolve(attention if impl == "auto" else impl)
                )
            )
        yield


def keep_layers(config, n: int):
    """The model config with only its first `n` layers (layer and MLP types cut alike)."""
    if not 1 <= n <= config.num_hidden_layers:
        raise SystemExit(f"--layers {n}: allowed 1..{config.num_hidden_layers}")
    fields = {f.name for f in dataclasses.fields(config)}
    cut = {"num_hidden_layers": n}
    for name in ("layer_types", "mlp_layer_types"):
        if name in fields:
            cut[name] = tuple(getattr(config, name))[:n]
    return dataclasses.replace(config, **cut)


def compile_train_step(
    config_path: str,
    topology: str,
    mesh_sizes: dict[str, int],
    *,
    seq_len: int,
    batch: int,
    grad_accum: int = 1,
    remat: str = "none",
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    layers: int | None = None,
    model_args: dict | None = None,
    attention: str = "auto",
    loss_chunk: int = 0,
):
    """(compiled train step, lower seconds, compile seconds) for `config_path` (a Hugging Face
    config.json of a registered model_type) on a mesh over `topology`'s devices."""
    devices = tpu_devices(topology)
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_sizes), devices=devices)
    run = RunConfig(
        model=registry.read_hf_config(config_path)["model_type"],
        model_args={"config_file": config_path, **(model_args or {})},
        seq_len=seq_len,
        batch_size=batch,
        grad_accum=grad_accum,
        remat=remat,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        mesh_data=mesh_sizes["data"],
        mesh_fsdp=mesh_sizes["fsdp"],
        mesh_tensor=mesh_sizes["tensor"],
        mesh_expert=mesh_sizes["expert"],
        mesh_context=mesh_sizes["context"],
        loss_chunk=loss_chunk,
    )
    model_config = registry.config_from_run_args(
        run.model, run.model_args, vocab_size=0, compute_dtype=compute_dtype, param_dtype=param_dtype
    )
    if layers is not None:
        model_config = keep_layers(model_config, layers)
    model = registry.build(model_config, remat=remat)
    with traced_as_on_tpu(attention):
        # setup/abstract_state evaluate shapes with concrete keys: outside the TPU mesh context
        s = loop.setup(run, model=model, mesh=mesh)
        state = loop.abstract_state(s)
        # as loop.compile_step builds it (train() traces it under jax.set_mesh, as here)
        step = make_train_step(s.model.apply, s.tx, s.schedule, DTYPES[compute_dtype], loss_chunk=loss_chunk)
        jitted = jax.jit(
            step,
            in_shardings=(s.state_shardings, s.batch_sharding),
            out_shardings=(s.state_shardings, NamedSharding(mesh, P())),
            donate_argnums=(0,),
        )
        tokens = jax.ShapeDtypeStruct(loop.batch_shape(s), jnp.int32, sharding=s.batch_sharding)
        batch_args = dict.fromkeys(("inputs", "targets", "segment_ids", "loss_mask"), tokens)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = jitted.lower(state, batch_args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def compile_kda_op(
    shape,
    topology: str,
    *,
    impl: str,
    dtype: str = "bfloat16",
    backward: bool = False,
    precision: str = "highest",
    state_stride: int | None = None,
):
    """(compiled, lower s, compile s): `pallas_kernels.kda.kda` alone (in-kernel L2 norm, no state),
    q/k/v `[B,T,H,K]` (K = V) in `dtype`, forward or forward+backward, on one device of `topology`.
    `precision` is the Pallas kernels' matmul precision; `state_stride` (pallas_tpu only; None: the
    kernel's default) saves every state_stride-th chunk state for the backward."""
    B, T, H, K = shape
    on = SingleDeviceSharding(tpu_devices(topology)[0])
    f32, dt = jnp.float32, jnp.dtype(dtype)
    args = [jax.ShapeDtypeStruct((B, T, H, K), d, sharding=on) for d in (dt, dt, dt, f32)]
    args.append(jax.ShapeDtypeStruct((B, T, H), f32, sharding=on))
    if state_stride is None:
        op = functools.partial(kda, impl=impl, precision=precision)
    elif impl == "pallas_tpu":
        op = functools.partial(kda_pallas_tpu, precision=precision, state_stride=state_stride)
    else:
        raise ValueError(f"state_stride applies to impl='pallas_tpu' only, not {impl!r}")
    fwd = lambda q, k, v, g, beta: op(q, k, v, g, beta, use_qk_l2norm=True)[0]
    loss = lambda *a: jnp.sum(fwd(*a).astype(f32))
    fn = jax.jit(jax.grad(loss, argnums=tuple(range(5))) if backward else fwd)
    with traced_as_on_tpu():
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def tpu_kernel_state_stride() -> int:
    """The Pallas TPU kernel's default state stride (what `kda(impl="pallas_tpu")` uses)."""
    return inspect.signature(kda_pallas_tpu).parameters["state_stride"].default


def memory_report(compiled) -> dict:
    """Per-device bytes from the compiled executable's memory analysis and cost analysis."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    # donated state aliases its output: live at once are arguments, the non-aliased outputs,
    # temporaries and the program itself
    out["peak_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    out["flops"] = float(cost.get("flops", float("nan")))
    out["transcendentals"] = float(cost.get("transcendentals", float("nan")))
    out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    return out


def hbm_gib(device) -> float | None:
    kind = device.device_kind.lower()
    for name, gib in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return gib
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="model config.json (Hugging Face layout), e.g. configs/small.json")
    ap.add_argument("--topology", required=True, help="libtpu topology name, e.g. v5e:2x2, v5p:4x4x4")
    ap.add_argument("--mesh", default="", help="mesh axis sizes, e.g. fsdp=16,expert=4 (unnamed axes: 1)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=None, help="global rows per step (default: one per device)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument(
        "--attention",
        default="auto",
        help="what the attention's impl='auto' resolves to (default: as on a TPU, the Pallas kernel); "
        "e.g. blockwise (pure JAX)",
    )
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        help="cross-entropy over chunks of this many positions (RunConfig.loss_chunk; 0 = full logits)",
    )
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers (quick compile)")
    ap.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="model config override, repeatable",
    )
    ap.add_argument(
        "--kda",
        metavar="B,T,H,K",
        help="compile the KDA op alone instead (pallas_tpu and chunk, forward and forward+backward)",
    )
    ap.add_argument("--dtype", default="bfloat16", help="q/k/v dtype for --kda")
    ap.add_argument(
        "--impl",
        action="append",
        choices=("pallas_tpu", "chunk"),
        help="--kda: only these impls (repeatable)",
    )
    ap.add_argument(
        "--precision",
        default="highest",
        choices=("highest", "default"),
        help="--kda: the Pallas kernels' matmul precision (the chunk impl takes highest only)",
    )
    ap.add_argument(
        "--state-stride",
        type=int,
        default=None,
        help="--kda, pallas_tpu: save every Nth chunk state for the backward, recompute the rest "
        "(default: the kernel's own default)",
    )
    ap.add_argument("--backward-only", action="store_true", help="--kda: forward+backward only")
    a = ap.parse_args(argv)
    if a.kda:
        shape = tuple(int(x) for x in a.kda.split(","))
        for impl in a.impl or ("pallas_tpu", "chunk"):
            for backward in (True,) if a.backward_only else (False, True):
                compiled, t_lower, t_compile = compile_kda_op(
                    shape,
                    a.topology,
                    impl=impl,
                    dtype=a.dtype,
                    backward=backward,
                    precision=a.precision,
                    state_stride=a.state_stride if impl == "pallas_tpu" else None,
                )
                row = {"kda": shape, "dtype": a.dtype, "impl": impl, "pass": "fwd+bwd" if backward else "fwd"}
                row.update(precision=a.precision)
                if impl == "pallas_tpu":
                    row.update(state_stride=a.state_stride or tpu_kernel_state_stride())
                row.update(topology=a.topology, **memory_report(compiled))
                row.update(lower_s=round(t_lower, 1), compile_s=round(t_compile, 1))
                print(json.dumps(row), flush=True)
        return 0
    if not a.config:
        ap.error("--config is required (or --kda B,T,H,K)")
    model_args = {}
    for item in a.model_arg:
        key, _, value = item.partition("=")
        try:
            model_args[key] = json.loads(value)
        except json.JSONDecodeError:
            model_args[key] = value
    mesh_sizes = parse_mesh(a.mesh)
    n_dev = len(tpu_devices(a.topology))
    if math.prod(mesh_sizes.values()) != n_dev and "data" not in a.mesh:
        rest = n_dev // math.prod(mesh_sizes.values())
        mesh_sizes["data"] = max(rest, 1)
    batch = a.batch or n_dev
    compiled, t_lower, t_compile = compile_train_step(
        a.config,
        a.topology,
        mesh_sizes,
        seq_len=a.seq_len,
        batch=batch,
        grad_accum=a.grad_accum,
        remat=a.remat,
        param_dtype=a.param_dtype,
        compute_dtype=a.compute_dtype,
        layers=a.layers,
        model_args=model_args,
        attention=a.attention,
        loss_chunk=a.loss_chunk,
    )
    rep = memory_report(compiled)
    hbm = hbm_gib(tpu_devices(a.topology)[0])
    row = {
        "config": a.config,
        "layers": a.layers,
        "topology": a.topology,
        "devices": n_dev,
        "mesh": mesh_sizes,
        "seq_len": a.seq_len,
        "batch": batch,
        "grad_accum": a.grad_accum,
        "remat": a.remat,
        "param_dtype": a.param_dtype,
        "compute_dtype": a.compute_dtype,
        "model_args": model_args,
        "attention": a.attention,
        "loss_chunk": a.loss_chunk,
        **rep,
        "peak_gib": round(rep["peak_bytes"] / 2**30, 3),
        "hbm_gib": hbm,
        "fits": None if hbm is None else rep["peak_bytes"] <= hbm * 2**30,
        "lower_s": round(t_lower, 1),
        "compile_s": round(t_compile, 1),
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
