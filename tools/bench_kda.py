"""Benchmark KDA on the current backend: chunk vs recurrent, forward and forward+backward.

Prints one JSON line: times (ms), ratios, the chunk's achieved GFLOP/s and, measured in the same
run, the machine's float32 rate on a 2048x2048 matmul (the baseline the ratios refer to; the
better of a measurement before and one after the KDA timings).

    python tools/bench_kda.py [--B 1 --T 4096 --H 4 --K 64 --V 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from pallas_kernels.kda import kda


def best_time(fn, *args, repeats: int) -> float:
    """Best wall time in seconds over `repeats` runs, after one compile+warm-up run."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    t = best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / t / 1e9


def chunk_forward_flops(T: int, H: int, K: int, V: int, B: int, C: int = 64) -> float:
    """6C^2K + 4C^2V + 6CKV + (2/3)C^3 per chunk and head (the issue's count)."""
    per_chunk = 6 * C * C * K + 4 * C * C * V + 6 * C * K * V + (2 / 3) * C**3
    return per_chunk * (-(-T // C)) * H * B


def make_inputs(B, T, H, K, V, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K))) / 16
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    return q, k, v, g, beta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 1), ("T", 4096), ("H", 4), ("K", 64), ("V", 64), ("repeats", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)
    inputs = make_inputs(args.B, args.T, args.H, args.K, args.V)

    def forward(impl):
        return jax.jit(lambda *a: kda(*a, use_qk_l2norm=True, impl=impl)[0])

    def forward_backward(impl):
        loss = lambda *a: jnp.sum(kda(*a, use_qk_l2norm=True, impl=impl)[0] ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    # The matmul rate is measured before and after the KDA timings and the higher one kept: on a
    # shared machine a single measurement can land in a busy moment and flatter the ratios.
    mm_before = matmul_gflops()
    t = {}
    for impl in ("chunk", "recurrent"):
        t[f"{impl}_fwd_ms"] = 1e3 * best_time(forward(impl), *inputs, repeats=args.repeats)
        t[f"{impl}_fwdbwd_ms"] = 1e3 * best_time(
            forward_backward(impl), *inputs, repeats=max(1, args.repeats // 2)
        )
    flops = chunk_forward_flops(args.T, args.H, args.K, args.V, args.B)
    mm = max(mm_before, matmul_gflops())
    chunk_fwd_gflops = flops / (t["chunk_fwd_ms"] / 1e3) / 1e9
    chunk_fwdbwd_gflops = 3 * flops / (t["chunk_fwdbwd_ms"] / 1e3) / 1e9
    print(
        json.dumps(
            {
                "bench": "kda",
                "backend": jax.default_backend(),
                "device": str(jax.devices()[0]),
                "machine": platform.processor() or platform.machine(),
                "jax": jax.__version__,
                "shape": {k: getattr(args, k) for k in ("B", "T", "H", "K", "V")},
                "dtype": "float32",
                **{k: round(v, 3) for k, v in t.items()},
                "fwd_speedup_chunk_vs_recurrent": round(t["recurrent_fwd_ms"] / t["chunk_fwd_ms"], 2),
                "fwdbwd_speedup_chunk_vs_recurrent": round(
                    t["recurrent_fwdbwd_ms"] / t["chunk_fwdbwd_ms"], 2
                ),
                "chunk_fwd_gflops": round(chunk_fwd_gflops, 2),
                "chunk_fwdbwd_gflops": round(chunk_fwdbwd_gflops, 2),
                "matmul_2048_gflops": round(mm, 2),
                "chunk_fwd_frac_of_matmul": round(chunk_fwd_gflops / mm, 3),
                "chunk_fwdbwd_frac_of_matmul": round(chunk_fwdbwd_gflops / mm, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
