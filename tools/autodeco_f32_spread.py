"""How far a float32 evaluation of the AutoDeco statistics, losses and gradients can land from the
float64 golden values (tests/golden/autodeco/*.npz): the measurement behind the float32 bounds in
tests/ops/test_autodeco.py::test_golden_float32.

For each golden case it evaluates, in float32 as the test does, at the golden inputs rounded to
float32 and at --seeds other float32 inputs within one float32 ulp of the float64 ones (each input
scaled by 1 + u, |u| <= 2^-23, then rounded), and prints the test's error measure (max |a - e| /
max |e|) against the float64 golden: the test-input value, the median, p99 and max over seeds.
Then the same perturbed inputs in float64 arithmetic: the part of the spread that comes from
rounding the inputs alone (the conditioning of the function), not from float32 arithmetic.
Prints one JSON line per case last: the max per quantity over both parts.

    python tools/autodeco_f32_spread.py --seeds 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops import autodeco as A

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "autodeco"
CASES = ["autodeco_small", "autodeco_vocab300"]
NAMES = [
    "prob_stats0",
    "prob_stats1",
    "prob_stats2",
    "prob_stats3",
    "top_p_loss",
    "dtop_p_loss_dT",
    "dtop_p_loss_dP",
    "temp_loss",
    "dtemp_loss_dT",
]


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@jax.jit
def evaluate(L, T, P, y, r):
    stats = A.prob_stats(L, T)
    tp, (gT, gP) = jax.value_and_grad(lambda t, p: A.soft_top_p_loss(L, t, p, y), (0, 1))(T, P)
    tl, gT2 = jax.value_and_grad(lambda t: A.temperature_loss(L, t, y, r))(T)
    return [stats[..., i] for i in range(4)] + [tp, gT, gP, tl, gT2]


def load(case):
    with np.load(GOLDEN / f"{case}.npz") as z:
        d = {k: z[k] for k in z.files}
    want = [d["prob_stats"][..., i] for i in range(4)] + [
        d[k] for k in ("top_p_loss", "dtop_p_loss_dT", "dtop_p_loss_dP", "temp_loss", "dtemp_loss_dT")
    ]
    return d, want


def perturbed(d, rng):
    return [
        (d[k] * (1 + 2.0**-23 * rng.uniform(-1, 1, d[k].shape))).astype(np.float32)
        for k in ("logits", "T", "P")
    ]


def errors(d, want, LTP, dtype):
    y = jnp.asarray(d["labels"])
    r = jnp.asarray(d["rand_vals"].astype(np.float32).astype(dtype))  # as the test rounds them
    out = evaluate(*(jnp.asarray(a.astype(dtype)) for a in LTP), y, r)
    return np.array([rel(o, w) for o, w in zip(out, want)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1000)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {args.seeds} perturbed inputs per case")
    summary = {}
    for case in CASES:
        d, want = load(case)
        base = errors(d, want, [d[k].astype(np.float32) for k in ("logits", "T", "P")], np.float32)
        rng = np.random.default_rng(0)
        f32 = np.array([errors(d, want, perturbed(d, rng), np.float32) for _ in range(args.seeds)])
        with jax.enable_x64(True):
            rng = np.random.default_rng(0)
            f64 = np.array([errors(d, want, perturbed(d, rng), np.float64) for _ in range(args.seeds)])
        print(f"{case}: float32 arithmetic | float64 arithmetic on the same float32 inputs")
        for i, n in enumerate(NAMES):
            print(
                f"  {n:15s} test input {base[i]:.2e}  median {np.median(f32[:, i]):.2e}  "
                f"p99 {np.quantile(f32[:, i], 0.99):.2e}  max {f32[:, i].max():.2e} | "
                f"max {f64[:, i].max():.2e}"
            )
        summary[case] = {
            n: float(max(base[i], f32[:, i].max(), f64[:, i].max())) for i, n in enumerate(NAMES)
        }
    for case, s in summary.items():
        print(
            json.dumps(
                {
                    "case": case,
                    "jax": jax.__version__,
                    "seeds": args.seeds,
                    "max_rel_err": {k: float(f"{v:.3g}") for k, v in s.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
