"""Matmul FLOPs vs elementwise ops per chunk and head of each Pallas KDA kernel, from the traced bodies.

    python tools/kda_op_counts.py                 # K = V = 128, bf16 q/k/v, L2 norm in-kernel
    python tools/kda_op_counts.py --K 64 --V 64 --cond exact
    python tools/kda_op_counts.py --precision default  # the kernels' bf16-operand matmuls

Traces forward+backward of `kda_pallas_tpu` and `kda_pallas_gpu` (no compile, nothing runs), finds
every `pallas_call` and walks its kernel jaxpr:

* matmul FLOPs: 2 * output size * contracted size of each `dot_general`; those whose operands
  are both bfloat16 (one MXU pass / bf16 tensor cores) are also listed on their own;
* elementwise ops: output elements of every other array op (arithmetic, exp, compare, select,
  iota, casts), input elements of reductions; loads, stores and pure shape changes (broadcast,
  reshape, squeeze, transpose) are not counted;
* transcendentals (exp, log, rsqrt, ...) are also listed on their own;
* loops: a `scan` (static `fori_loop`) counts its body times its length; a `cond` counts one branch:
  `--cond fast` (default) the last branch (the kernels' fast diagonal-block path, and the body of
  each `pl.when`), `--cond exact` the costliest branch (the exact per-column path for gates whose
  log decay spans more than `SAFE_SPAN` inside a 16-row sub-chunk).

A kernel's body count times its grid size, divided by B * H * NC (chunks), gives the figures per
chunk and head. Prints one JSON line, then a table. Estimates of work, not of time: Mosaic and
Triton fuse, hoist and pad (a [64, 1] column occupies 64 x 128 lanes on a TPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.kda import tpu  # noqa: E402
from pallas_kernels.kda.gpu import kda_pallas_gpu  # noqa: E402
from pallas_kernels.kda.tpu import kda_pallas_tpu  # noqa: E402

# not work: memory traffic, program ids, shape-only ops
_FREE = {
    "get",
    "swap",
    "load",
    "store",
    "masked_load",
    "masked_swap",
    "program_id",
    "num_programs",
    "multiple_of",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "transpose",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin", "reduce_and", "reduce_or"}
_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "rsqrt", "sqrt", "tanh", "logistic", "expm1", "pow"}


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()) or (1,))


def _sub_jaxprs(params):
    for p in params.values():
        if isinstance(p, jax.extend.core.ClosedJaxpr):
            yield p.jaxpr
        elif isinstance(p, jax.extend.core.Jaxpr):
            yield p


def count(jaxpr, cond: str = "fast") -> dict:
    """{'matmul_flops', 'bf16_matmul_flops', 'elementwise', 'transcendental'} of one run of `jaxpr`
    (see module doc)."""
    tot = {"matmul_flops": 0, "bf16_matmul_flops": 0, "elementwise": 0, "transcendental": 0}

    def add(c, times=1):
        for key in tot:
            tot[key] += times * c[key]

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            shape = eqn.invars[0].aval.shape
            flops = 2 * _size(eqn.outvars[0].aval) * math.prod(shape[d] for d in lhs_contract)
            tot["matmul_flops"] += flops
            if all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars):
                tot["bf16_matmul_flops"] += flops
        elif name == "scan":
            add(count(eqn.params["jaxpr"].jaxpr, cond), eqn.params["length"])
        elif name == "cond":
            branches = [count(b.jaxpr, cond) for b in eqn.params["branches"]]
            add(branches[-1] if cond == "fast" else max(branches, key=lambda c: c["elementwise"]))
        elif name == "while":
            raise ValueError("kda_op_counts: a while loop without a static trip count in a kernel body")
        elif any(True for _ in _sub_jaxprs(eqn.params)):  # pjit, closed_call, custom_jvp, run_scoped
            for sub in _sub_jaxprs(eqn.params):
                add(count(sub, cond))
        elif name in _FREE:
            continue
        elif name in _REDUCTIONS:
            tot["elementwise"] += _size(eqn.invars[0].aval)
        else:
            n = sum(_size(v.aval) for v in eqn.outvars)
            tot["elementwise"] += n
            if name in _TRANSCENDENTAL:
                tot["transcendental"] += n
    return tot


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for sub in _sub_jaxprs(eqn.params):
            yield from _pallas_calls(sub)


def kernel_counts(
    fn, *, B=1, T=256, H=2, K=128, V=128, dtype="bfloat16", cond="fast", precision="highest"
) -> list[dict]:
    """Per chunk and head counts of every `pallas_call` in forward+backward of `fn` (a
    `kda_pallas_*` entry point, called with `precision`), in trace order; a kernel launched twice
    (the GPU intra kernel, recomputed in the backward) is listed twice."""
    dt = jnp.dtype(dtype)
    sds = jax.ShapeDtypeStruct
    args = (
        sds((B, T, H, K), dt),
        sds((B, T, H, K), dt),
        sds((B, T, H, V), dt),
        sds((B, T, H, K), jnp.float32),
        sds((B, T, H), jnp.float32),
    )

    def loss(q, k, v, g, beta):
        return jnp.sum(fn(q, k, v, g, beta, use_qk_l2norm=True, precision=precision)[0].astype(jnp.float32))

    closed = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(5))))(*args)
    chunk_heads = B * H * (-(-T // 64))
    rows = []
    for eqn in _pallas_calls(closed.jaxpr):
        grid = math.prod(eqn.params["grid_mapping"].grid)
        c = count(eqn.params["jaxpr"], cond)
        per = {key: val * grid / chunk_heads for key, val in c.items()}
        name = eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", "?")
        rows.append(
            {
                "kernel": str(name),
                "matmul_mflop": round(per["matmul_flops"] / 1e6, 3),
                "bf16_matmul_mflop": round(per["bf16_matmul_flops"] / 1e6, 3),
                "elementwise_mop": round(per["elementwise"] / 1e6, 3),
                "transcendental_mop": round(per["transcendental"] / 1e6, 3),
                "ratio": round(per["elementwise"] / max(per["matmul_flops"], 1), 3),
            }
        )
    return rows


_PER_CHUNK = ("matmul_mflop", "bf16_matmul_mflop", "elementwise_mop", "transcendental_mop")


def tpu_kernel_counts(state_stride: int, **kw) -> list[dict]:
    """`kernel_counts` of `kda_pallas_tpu` at `state_stride` S, with the backward's recompute of a
    group's states counted once per S chunks, as it runs. It sits in a `pl.when` body, which
    `count` counts at every grid step; the stride-1 kernel has no such work, so the rows are
    those at stride 1 plus a 1/S share of the difference to those at stride S."""
    at = lambda S: kernel_counts(functools.partial(kda_pallas_tpu, state_stride=S), **kw)
    one = at(1)
    if state_stride == 1:
        return one
    rows = []
    for r1, rs in zip(one, at(state_stride), strict=True):
        r = {**r1, **{key: round(r1[key] + (rs[key] - r1[key]) / state_stride, 3) for key in _PER_CHUNK}}
        r["ratio"] = round(r["elementwise_mop"] / max(r["matmul_mflop"], 1e-9), 3)
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", help="q/k/v dtype")
    ap.add_argument("--cond", default="fast", choices=("fast", "exact"))
    ap.add_argument("--precision", default="highest", choices=("highest", "default"))
    ap.add_argument(
        "--state-stride", type=int, default=tpu.STATE_STRIDE, help="the TPU kernel's (default: its own)"
    )
    a = ap.parse_args(argv)
    out = {"K": a.K, "V": a.V, "dtype": a.dtype, "cond": a.cond, "precision": a.precision}
    out["per"] = "chunk (64 tokens) and head"
    out["tpu_state_stride"] = a.state_stride
    kw = dict(K=a.K, V=a.V, dtype=a.dtype, cond=a.cond, precision=a.precision)
    out["pallas_tpu"] = tpu_kernel_counts(a.state_stride, T=max(256, 64 * a.state_stride), **kw)
    out["pallas_gpu"] = kernel_counts(kda_pallas_gpu, **kw)
    print(json.dumps(out), flush=True)
    print(
        f"\nper chunk and head, K={a.K} V={a.V} {a.dtype}, cond={a.cond}, precision={a.precision}, "
        f"TPU state_stride={a.state_stride}"
    )
    print(
        f"{'impl':<11} {'kernel':<22} {'matmul MFLOP':>13} {'of it bf16':>11} {'elementwise M':>14} "
        f"{'exp etc. M':>11} {'ratio':>6}"
    )
    for label in ("pallas_tpu", "pallas_gpu"):
        for r in out[label]:
            print(
                f"{label:<11} {r['kernel']:<22} {r['matmul_mflop']:>13.2f} {r['bf16_matmul_mflop']:>11.2f} "
                f"{r['elementwise_mop']:>14.2f} "
                f"{r['transcendental_mop']:>11.3f} {r['ratio']:>6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
