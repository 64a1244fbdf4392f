"""MoE dispatch benchmark: CPU tokens/s of each dispatch, and compiled FLOPs vs the ideal.

    python tools/bench_moe.py cpu [--experts 32 --tokens 512 --steps 3]
    python tools/bench_moe.py flops [--experts 256 --tokens 4096 --topology v5e:2x2]
    python tools/bench_moe.py layer --topology v5p:2x2x2 --mesh fsdp=2,expert=4 --rows 8 \
        [--capacity-factor 1.25 | --no-expert-parallel | --exchange ragged]

`cpu`: forward tokens/s of `moe.moe_experts` for each dispatch at the 48B-A3B layer widths (hidden
2304, expert width 1024, top-8) with the experts scaled down (default 32 of 256), jitted on this
machine's CPU; "gather" only when its [N, k, D, F] weight gather fits (decode sizes).

`flops`: the compiled FLOP count of one MoE layer's routed experts (forward) at the real widths
against the ideal 2 * tokens * top_k * 3 * hidden * moe_inter, ratio printed:
- tpu: "ragged" (the table's TPU entry) compiled by libtpu for one chip of `--topology`
  (`[tpu-aot]` extra, Python >= 3.12; skipped with the reason otherwise);
- gpu: "blocked" with the GPU rule's block rows (the table's GPU entry). No GPU compiler can run
  here (jaxlib's CUDA plugin needs a GPU to compile), so its FLOPs are counted from the XLA:CPU
  compile of the same program: the blocked dispatch is static dots whose shapes do not depend on
  the backend;
- cpu: "blocked" with the CPU rule's block rows, and "ragged", as XLA:CPU compiles them
  (ragged_dot becomes dense there).
The GPU and TPU rows come from the same run (the TPU one needs libtpu: run it with .venv-newest).

`layer`: one MoE layer of the 48B-A3B config (router, 256 routed experts, the shared expert),
forward + backward in bf16, `--rows` x 4096 tokens sharded over the mesh, compiled by libtpu for
`--topology`: per-chip temporaries and FLOPs of the expert-parallel dispatch (or, with
`--no-expert-parallel`, of XLA partitioning the single-device dispatch).

`mesh`: compiled FLOPs per device (XLA:CPU cost analysis) of one MoE layer's forward + backward
(float32, the 48B widths with `--experts` routed experts, `--rows` x 512 tokens) under `--mesh` on
virtual CPU devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (or the mesh's
size). With a `tensor` axis, compare against the same mesh without it: the expert work per device
should shrink by the tensor size, not repeat on every tensor shard.

Each result is one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding as shd
from jaxllm.nn.moe import AUTO_DISPATCH, MoE, experts_blocked, moe_experts, route, rows_per_block

# libtpu locks a file for the life of the process that loads it; compiling needs no chip
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

HIDDEN, MOE_INTER, TOP_K = 2304, 1024, 8  # Kimi Linear 48B-A3B (configs/kimi_linear_48b_a3b.json)


def ideal_flops(tokens: int, top_k: int = TOP_K, hidden: int = HIDDEN, inter: int = MOE_INTER) -> float:
    """Matmul FLOPs of the routed experts' forward: each of the tokens*top_k assignments runs w1, w3
    ([D,F]) and w2 ([F,D])."""
    return 2.0 * tokens * top_k * 3 * hidden * inter


def problem(tokens: int, experts: int, dtype=jnp.float32, seed: int = 0):
    """(x, weights, idx, w1, w3, w2) with a random router (load roughly even)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(tokens, HIDDEN)), dtype)
    router = jnp.asarray(rng.normal(size=(HIDDEN, experts)) * HIDDEN**-0.5, jnp.float32)
    wts, idx = route(x, router, None, top_k=TOP_K)
    w1, w3 = (jnp.asarray(rng.normal(size=(experts, HIDDEN, MOE_INTER)) * 0.02, dtype) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(experts, MOE_INTER, HIDDEN)) * 0.02, dtype)
    return x, wts, idx, w1, w3, w2


def abstract_problem(tokens: int, experts: int, dtype=jnp.bfloat16, sharding=None):
    """`problem`'s shapes and dtypes only (compiling needs no data)."""
    shapes = (
        ((tokens, HIDDEN), dtype),
        ((tokens, TOP_K), jnp.float32),
        ((tokens, TOP_K), jnp.int32),
        ((experts, HIDDEN, MOE_INTER), dtype),
        ((experts, HIDDEN, MOE_INTER), dtype),
        ((experts, MOE_INTER, HIDDEN), dtype),
    )
    return [jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for shape, dt in shapes]


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    return float(cost.get("flops", float("nan")))


def experts_fn(dispatch: str):
    """moe_experts with `dispatch`; "blocked:BM" is the blocked dispatch with BM rows per block."""
    if dispatch.startswith("blocked:"):
        return functools.partial(experts_blocked, block_rows=int(dispatch.split(":")[1]))
    return functools.partial(moe_experts, dispatch=dispatch)


def bench_cpu(tokens: int, experts: int, steps: int, dispatches) -> list[dict]:
    args = problem(tokens, experts)
    rows = []
    for dispatch in dispatches:
        if dispatch == "gather" and tokens * TOP_K * HIDDEN * MOE_INTER * 4 * 3 > 2**31:
            rows.append({"bench": "cpu", "dispatch": dispatch, "skipped": "[N,k,D,F] gather > 2 GiB"})
            continue
        f = jax.jit(experts_fn(dispatch))
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            out = f(*args)
        out.block_until_ready()
        dt = (time.perf_counter() - t0) / steps
        flops = compiled_flops(f.lower(*args).compile())
        rows.append(
            {
                "bench": "cpu",
                "dispatch": dispatch,
                "tokens": tokens,
                "experts": experts,
                "top_k": TOP_K,
                "step_s": round(dt, 4),
                "tokens_per_s": round(tokens / dt, 1),
                "compile_s": round(compile_s, 2),
                "flops_ratio": round(flops / ideal_flops(tokens), 3),
            }
        )
    return rows


def flops_row(backend: str, dispatch: str, compiled, tokens: int, experts: int, how: str) -> dict:
    flops = compiled_flops(compiled)
    ideal = ideal_flops(tokens)
    return {
        "bench": "flops",
        "backend": backend,
        "dispatch": dispatch,
        "tokens": tokens,
        "experts": experts,
        "top_k": TOP_K,
        "compiled_flops": flops,
        "ideal_flops": ideal,
        "ratio": round(flops / ideal, 3),
        "how": how,
    }


def table_dispatch(backend: str, tokens: int, experts: int) -> str:
    """The dispatch table's "auto" entry for `backend` at this size, "blocked:BM" with its block rows."""
    dispatch = AUTO_DISPATCH[backend].dispatch
    if dispatch == "blocked":
        return f"blocked:{rows_per_block(tokens * TOP_K, experts, backend)}"
    return dispatch


def bench_flops(tokens: int, experts: int, topology: str) -> list[dict]:
    args = abstract_problem(tokens, experts)
    rows = []
    cases = [("gpu", table_dispatch("gpu", tokens, experts)), ("cpu", table_dispatch("cpu", tokens, experts))]
    for backend, dispatch in [*cases, ("cpu", "ragged")]:
        f = jax.jit(experts_fn(dispatch))
        how = "XLA:CPU compile (static dot shapes, as on GPU)" if backend == "gpu" else "XLA:CPU compile"
        rows.append(flops_row(backend, dispatch, f.lower(*args).compile(), tokens, experts, how))
    rows.append(tpu_flops(tokens, experts, topology, table_dispatch("tpu", tokens, experts)))
    return rows


def tpu_flops(tokens: int, experts: int, topology: str, dispatch: str) -> dict:
    try:
        import libtpu  # noqa: F401, PLC0415 (optional [tpu-aot] extra)
        from jax.experimental import topologies  # noqa: PLC0415 (only with libtpu)
    except ImportError as e:
        return {"bench": "flops", "backend": "tpu", "skipped": f"libtpu not importable ({e})"}
    device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    args = abstract_problem(tokens, experts, sharding=jax.sharding.SingleDeviceSharding(device))
    compiled = jax.jit(experts_fn(dispatch)).lower(*args).compile()
    return flops_row("tpu", dispatch, compiled, tokens, experts, f"libtpu AOT, {topology} one chip")


def compile_layer(
    topology: str, mesh_text: str, rows: int, expert_parallel: bool, capacity_factor, exchange: str = "dense"
) -> dict:
    """Per-chip memory and FLOPs of one MoE layer's forward + backward (see the module docstring)."""
    from tpu_aot import memory_report, parse_mesh, tpu_devices, traced_as_on_tpu  # noqa: PLC0415 (libtpu)

    mesh_sizes = parse_mesh(mesh_text)
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_sizes), devices=tpu_devices(topology))
    moe = MoE(
        HIDDEN,
        256,
        TOP_K,
        MOE_INTER,
        num_shared_experts=1,
        routed_scaling_factor=2.446,
        expert_parallel=expert_parallel,
        capacity_factor=capacity_factor,
        expert_exchange=exchange,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    boxed = jax.eval_shape(lambda: moe.init(jax.random.key(0), jnp.zeros((1, 8, HIDDEN), jnp.bfloat16)))
    params = jax.tree.map(
        lambda b, sh: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=sh),
        boxed,
        shd.tree_shardings(boxed, mesh),
        is_leaf=shd._is_boxed,
    )
    x_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec())
    x = jax.ShapeDtypeStruct((rows, 4096, HIDDEN), jnp.bfloat16, sharding=x_sharding)
    loss = lambda p, x: jnp.sum(jnp.square(moe.apply(p, x).astype(jnp.float32)))
    with traced_as_on_tpu():
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x)
        compiled = lowered.compile()
    rep = memory_report(compiled)
    return {
        "bench": "layer",
        "topology": topology,
        "mesh": mesh_sizes,
        "rows": rows,
        "tokens": rows * 4096,
        "expert_parallel": expert_parallel,
        "capacity_factor": capacity_factor,
        "exchange": exchange,
        "temp_gb": round(rep["temp_bytes"] / 1e9, 3),
        "peak_gb": round(rep["peak_bytes"] / 1e9, 3),
        "tflop_per_chip": round(rep["flops"] / 1e12, 3),
        "compile_s": round(time.perf_counter() - t0, 1),
    }


def mesh_flops(mesh_text: str, experts: int, rows: int) -> dict:
    """Per-device FLOPs of one MoE layer's forward + backward under a mesh of CPU devices."""
    mesh_sizes = {k: int(v) for k, v in (kv.split("=") for kv in mesh_text.split(","))}
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_sizes))
    moe = MoE(HIDDEN, experts, TOP_K, MOE_INTER, num_shared_experts=0)
    x_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec())
    x = jax.ShapeDtypeStruct((rows, 512, HIDDEN), jnp.float32, sharding=x_sharding)
    boxed = jax.eval_shape(lambda: moe.init(jax.random.key(0), jnp.zeros((1, 8, HIDDEN))))
    params = jax.tree.map(
        lambda b, sh: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=sh),
        boxed,
        shd.tree_shardings(boxed, mesh),
        is_leaf=shd._is_boxed,
    )
    loss = lambda p, x: jnp.sum(jnp.square(moe.apply(p, x)))  # noqa: E731
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    flops = compiled_flops(compiled)
    ideal = 3 * ideal_flops(rows * 512)  # forward + backward (2x) of the routed experts, all devices
    return {
        "bench": "mesh",
        "mesh": mesh_sizes,
        "experts": experts,
        "tokens": rows * 512,
        "tflop_per_device": round(flops / 1e12, 4),
        "ideal_tflop_per_device": round(ideal / mesh.size / 1e12, 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("cpu", "flops", "layer", "mesh"))
    ap.add_argument("--experts", type=int, default=None, help="default: 32 (cpu), 256 (flops)")
    ap.add_argument("--tokens", type=int, default=None, help="default: 512 (cpu), 4096 (flops)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dispatch", action="append", default=None, help="cpu: repeatable (default all)")
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--mesh", default="fsdp=2,expert=4", help="layer: mesh axis sizes")
    ap.add_argument("--rows", type=int, default=8, help="layer: rows of 4096 tokens")
    ap.add_argument("--capacity-factor", type=float, default=None, help="layer: default dropless")
    ap.add_argument("--no-expert-parallel", action="store_true", help="layer: XLA partitions the dispatch")
    ap.add_argument(
        "--exchange", choices=("dense", "ragged"), default="dense", help="layer: ragged = ragged_all_to_all"
    )
    a = ap.parse_args(argv)
    if a.what == "mesh":
        print(json.dumps(mesh_flops(a.mesh, a.experts or 16, a.rows)), flush=True)
        return 0
    if a.what == "layer":
        row = compile_layer(
            a.topology, a.mesh, a.rows, not a.no_expert_parallel, a.capacity_factor, a.exchange
        )
        print(json.dumps(row), flush=True)
        return 0
    if a.what == "cpu":
        rows = bench_cpu(
            a.tokens or 512, a.experts or 32, a.steps, a.dispatch or ("blocked", "ragged", "onehot", "gather")
        )
    else:
        rows = bench_flops(a.tokens or 4096, a.experts or 256, a.topology)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
