#!/usr/bin/env python3
"""KDA on a TPU: check the Pallas TPU kernel against the XLA path, then time it against it.

Run from the repository root on a TPU VM (one host; jax[tpu] installed):

    python tools/device/kda_tpu.py --quick         # check + T=2048 only (run this first)
    python tools/device/kda_tpu.py                 # check + full timing table
    python tools/device/kda_tpu.py --budget-s 300  # stop starting new timings after 300 s
    python tools/device/kda_tpu.py --smoke         # CPU smoke test of the script (interpret mode)

1. Correctness: `kda(..., impl="pallas_tpu")` (compiled by Mosaic, not interpreted) against the
   pure-JAX chunk path (`impl="chunk"`, XLA) for outputs, final state and all six gradients;
   float32 (bound 1e-4) and bfloat16 q/k/v (bound 1e-2), and bf16 q/k/v with the kernel's bf16
   matmul operands (`precision="default"`, bound 1e-2); plain (initial state), varlen
   (`cu_seqlens`) and segment ids. Accuracy as rms(ref - impl) / rms(ref).
2. Timing, B=8, H=16, K=V=128, bf16 q/k/v (f32 g, beta, state), T in 2048, 8192, 32768: forward
   and forward+backward, Pallas kernel (`precision="highest"` and `"default"`) vs chunk path,
   median of `--reps` runs after warm-up
   (`block_until_ready`), and the compiled temporaries of each (`memory_analysis()`).
   fla's `chunk_kda` is Triton (GPU only), so the TPU baseline is our XLA path.

Prints one JSON line with every figure and the ratios measured in this run, then a short table
last. A configuration that fails (compile error, OOM) is reported and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pallas_kernels.kda import kda  # noqa: E402 - after sys.path gets the repository root

B, H, K, V = 8, 16, 128, 128
T_FULL = (2048, 8192, 32768)
TOL_F32, TOL_BF16 = 1e-4, 1e-2
# timed: the Pallas kernel with float32 and with bf16 matmul operands (precision="default"), the chunk path
VARIANTS = ("pallas_tpu", "pallas_tpu_default", "chunk")


def rel(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.sqrt(np.mean((ref - got) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-30))


def inputs(key, b, t, h, k, v, dtype, n_state):
    ks = jax.random.split(key, 7)
    q = jax.random.normal(ks[0], (b, t, h, k)).astype(dtype)
    kk = jax.random.normal(ks[1], (b, t, h, k)).astype(dtype)
    vv = jax.random.normal(ks[2], (b, t, h, v)).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h, k))) * 0.5
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    h0 = jax.random.normal(ks[5], (n_state, h, k, v)) * 0.1
    do = jax.random.normal(ks[6], (b, t, h, v))
    return (q, kk, vv, g, beta, h0), do


def check(smoke: bool):
    """rms-rel errors of the Pallas TPU kernel vs the chunk path, per case and output."""
    t = 96 if smoke else 1000  # not a multiple of the 64-token chunk
    h, k = (2, 32) if smoke else (4, 128)
    rows = []
    variants = ((jnp.float32, TOL_F32, "highest"), (jnp.bfloat16, TOL_BF16, "highest"))
    for dtype, tol, precision in variants + ((jnp.bfloat16, TOL_BF16, "default"),):
        for mode in ("plain", "cu_seqlens", "segment_ids"):
            b = 1 if mode == "cu_seqlens" else 2
            extra = {}
            n = b
            if mode == "cu_seqlens":
                cuts = [0, t // 3, t // 3 + 1, t]  # includes a 1-token sequence
                extra["cu_seqlens"] = jnp.asarray(cuts, jnp.int32)
                n = len(cuts) - 1
            if mode == "segment_ids":
                ids = (jnp.arange(t)[None] >= jnp.asarray([[t // 2], [64]])).astype(jnp.int32)
                extra["segment_ids"] = ids
            args, do = inputs(jax.random.PRNGKey(0), b, t, h, k, k, dtype, n)

            def loss(impl, *a):
                prec = precision if impl == "pallas_tpu" else "highest"
                o, ht = kda(
                    *a[:5], initial_state=a[5], output_final_state=True, use_qk_l2norm=True, impl=impl,
                    interpret=smoke and impl == "pallas_tpu", precision=prec, **extra,
                )  # fmt: skip
                return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht), (o, ht)

            res = {}
            for impl in ("chunk", "pallas_tpu"):
                fn = jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=range(6), has_aux=True))
                grads, (o, ht) = fn(*args)
                res[impl] = [o.astype(jnp.float32), ht, *grads]
            names = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")
            errs = {nm: rel(a, b) for nm, a, b in zip(names, res["chunk"], res["pallas_tpu"])}
            worst = max(errs.values())
            rows.append(
                {
                    "dtype": jnp.dtype(dtype).name,
                    "precision": precision,
                    "mode": mode,
                    "tol": tol,
                    "worst": worst,
                    "ok": worst <= tol,
                    **errs,
                }
            )
    return rows


def timing(T_list, reps, budget_s, smoke: bool):
    b, h, k = (1, 2, 32) if smoke else (B, H, K)
    t_start = time.perf_counter()
    out = {}
    for T in T_list:
        if time.perf_counter() - t_start > budget_s:
            out[str(T)] = {"skipped": f"budget {budget_s} s spent"}
            continue
        args, do = inputs(jax.random.PRNGKey(1), b, T, h, k, k, jnp.bfloat16, b)
        row = {}
        for label in VARIANTS:
            impl = "chunk" if label == "chunk" else "pallas_tpu"
            kw = dict(use_qk_l2norm=True, impl=impl, interpret=smoke and impl == "pallas_tpu")
            kw.update(precision="default" if label == "pallas_tpu_default" else "highest")
            fwd = jax.jit(lambda *a, kw=kw: kda(*a[:5], initial_state=a[5], output_final_state=True, **kw))
            grad = jax.jit(
                jax.grad(
                    lambda *a, kw=kw: jnp.sum(
                        kda(*a[:5], initial_state=a[5], **kw)[0].astype(jnp.float32) * do
                    ),
                    argnums=range(6),
                )
            )
            for name, fn in (("fwd", fwd), ("fwd_bwd", grad)):
                try:
                    compiled = fn.lower(*args).compile()
                    temp = compiled.memory_analysis().temp_size_in_bytes
                    for _ in range(2):
                        jax.block_until_ready(compiled(*args))
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        jax.block_until_ready(compiled(*args))
                        times.append((time.perf_counter() - t0) * 1e3)
                    row[f"{label}_{name}_ms"] = statistics.median(times)
                    row[f"{label}_{name}_temp_mib"] = temp / 2**20
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[f"{label}_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for name in ("fwd", "fwd_bwd"):
            for label, suffix in (("pallas_tpu", ""), ("pallas_tpu_default", "_default")):
                a, c = row.get(f"{label}_{name}_ms"), row.get(f"chunk_{name}_ms")
                if a and c:
                    row[f"speedup{suffix}_{name}"] = c / a  # > 1: the Pallas kernel is faster
        out[str(T)] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="timing at T=2048 only")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Pallas in interpret mode")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=1800.0)
    a = ap.parse_args(argv)
    backend = jax.default_backend()
    if backend != "tpu" and not a.smoke:
        print(
            f"kda_tpu.py: the default backend is {backend!r}, not a TPU (use --smoke on CPU)", file=sys.stderr
        )
        return 2
    result = {
        "backend": backend,
        "devices": [d.device_kind for d in jax.devices()][:1],
        "jax": jax.__version__,
    }
    try:
        result["check"] = check(a.smoke)
    except Exception:  # noqa: BLE001
        result["check_error"] = traceback.format_exc()[-2000:]
    T_list = (256,) if a.smoke else (T_FULL[:1] if a.quick else T_FULL)
    result["timing"] = timing(T_list, 2 if a.smoke else a.reps, a.budget_s, a.smoke)
    print(json.dumps(result), flush=True)
    print(f"\nKDA on {result['devices']} (jax {jax.__version__})")
    for r in result.get("check", []):
        print(
            f"check {r['dtype']:8s} {r['precision']:8s} {r['mode']:12s} worst rms-rel {r['worst']:.2e}  "
            f"{'ok' if r['ok'] else 'FAIL'}"
        )
    print("ms and compiled temporaries (MiB); speedup = chunk ms / Pallas ms; bf16dots = precision='default'")
    print(
        f"{'T':>6s} {'pass':8s} {'pallas ms':>10s} {'bf16dots ms':>12s} {'chunk ms':>10s} {'speedup':>8s} "
        f"{'bf16dots':>9s} {'pallas MiB':>11s} {'bf16dots MiB':>13s} {'chunk MiB':>10s}"
    )
    for T, row in result["timing"].items():
        for name in ("fwd", "fwd_bwd"):
            cell = lambda key, fmt: format(row[key], fmt) if key in row else "-"  # noqa: E731
            print(
                f"{T:>6s} {name:8s} {cell(f'pallas_tpu_{name}_ms', '10.2f'):>10s} "
                f"{cell(f'pallas_tpu_default_{name}_ms', '12.2f'):>12s} {cell(f'chunk_{name}_ms', '10.2f'):>10s} "
                f"{cell(f'speedup_{name}', '8.2f'):>8s} {cell(f'speedup_default_{name}', '9.2f'):>9s} "
                f"{cell(f'pallas_tpu_{name}_temp_mib', '11.1f'):>11s} "
                f"{cell(f'pallas_tpu_default_{name}_temp_mib', '13.1f'):>13s} {cell(f'chunk_{name}_temp_mib', '10.1f'):>10s}"
            )
    ok = "check_error" not in result and all(r["ok"] for r in result.get("check", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
