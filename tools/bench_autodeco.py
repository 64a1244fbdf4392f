#!/usr/bin/env python
"""Decode-step latency with and without the AutoDeco heads, measured in the same run.

Both steps run the same model (random init of `--config`, vocab raised to `--vocab` when the
config's is smaller), the same cache (capacity context + reps + 2, filled with random values and
`pos = context`; a step's cost does not depend on the cached values) and the same sampler pipeline:

* baseline: one-token decode step, then `sample_next` in mode "sample" (temperature 0.8,
  top-p 0.9: the same sort-based top-p as AutoDeco's mode, so only the heads differ);
* autodeco: the same step, plus `AutoDecoHeads` on the last hidden state and logits (T head,
  the four softmax statistics over the vocabulary, top-p head), then `sample_next` in mode
  "autodeco" with the per-row T and P.

Each is one `jax.jit` with the cache donated. The two are timed interleaved (A, B, A, B, ...)
so that machine noise hits both alike; the figures are medians over `--reps`. The heads alone
(jitted on the same inputs) are timed too. Prints one JSON line:
`base_ms`, `autodeco_ms`, `overhead` (= autodeco_ms / base_ms - 1; the paper reports 1-2%,
the target is <= 0.02 at vocab >= 32K), `overhead_paired` (median of per-pair ratios - 1) and
`overhead_paired_ci95` (a bootstrap interval of that median: the noise this run leaves open),
`heads_ms` (the heads alone, jitted) and `heads_share` (= heads_ms / base_ms).

    python tools/bench_autodeco.py --config configs/small.json --vocab 32768 --context 1024 --reps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxllm.models.base import count_params  # noqa: E402
from jaxllm.models.config import KimiLinearConfig  # noqa: E402
from jaxllm.models.kimi_linear import KimiLinear, init_cache  # noqa: E402
from jaxllm.nn.autodeco import AutoDecoHeads  # noqa: E402
from jaxllm.ops.sampling import SamplingConfig, sample_next  # noqa: E402


def filled_cache(config, batch, length, capacity, key):
    cache = init_cache(config, batch, capacity)
    leaves, tree = jax.tree_util.tree_flatten(cache.layers)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        (0.1 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for k, x in zip(keys, leaves)
    ]
    return cache._replace(
        layers=jax.tree_util.tree_unflatten(tree, leaves), pos=jnp.full((batch,), length, jnp.int32)
    )


def _bootstrap_ci(x, n=2000, seed=0):
    """95% bootstrap interval of the median of ``x`` (how much the machine's noise leaves open)."""
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(n, len(x)), replace=True), axis=1)
    return [round(float(v), 5) for v in np.percentile(meds, [2.5, 97.5])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.json")
    ap.add_argument(
        "--vocab", type=int, default=32768, help="minimum vocabulary (raised if the config's is smaller)"
    )
    ap.add_argument("--context", type=int, default=1024, help="tokens already in the cache")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200, help="timed steps per variant (interleaved)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if args.reps < 3 or args.context < 1 or args.batch < 1:
        ap.error("--reps must be >= 3, --context and --batch >= 1")

    config = KimiLinearConfig.from_file(args.config, dtype=args.dtype, param_dtype=args.dtype)
    if config.vocab_size < args.vocab:
        config = config.replace(vocab_size=args.vocab)
    model = KimiLinear(config)
    key = jax.random.PRNGKey(0)
    params = jax.jit(model.init)(key, jnp.zeros((1, 1), jnp.int32))
    B, V, H = args.batch, config.vocab_size, config.hidden_size
    heads = AutoDecoHeads()
    heads_params = heads.init(
        jax.random.PRNGKey(1), jnp.zeros((B, H), jnp.float32), jnp.zeros((B, V), jnp.float32)
    )

    base_cfg = SamplingConfig(mode="sample", temperature=0.8, top_p=0.9)
    ad_cfg = SamplingConfig(mode="autodeco", temperature=1.0, top_p=1.0)

    def base_step(p, tok, cache, rng):
        out = model.apply(p, tok[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        return sample_next(out.logits[:, -1], sub, base_cfg), out.cache, rng

    def ad_step(p, hp, tok, cache, rng):
        out = model.apply(p, tok[:, None], cache=cache)
        logits, cache = out.logits, out.cache
        t, pp = heads.apply(hp, out.hidden[:, -1], logits[:, -1])
        rng, sub = jax.random.split(rng)
        tok = sample_next(logits[:, -1], sub, ad_cfg, temperature_B=t.reshape(-1), top_p_B=pp.reshape(-1))
        return tok, cache, rng

    base = jax.jit(base_step, donate_argnums=(2,))
    ad = jax.jit(ad_step, donate_argnums=(3,))
    heads_only = jax.jit(heads.apply)

    capacity = args.context + args.reps + 2
    cache_a = filled_cache(config, B, args.context, capacity, jax.random.PRNGKey(2))
    cache_b = filled_cache(config, B, args.context, capacity, jax.random.PRNGKey(2))
    tok_a = tok_b = jnp.zeros((B,), jnp.int32)
    rng_a = rng_b = jax.random.PRNGKey(3)
    # Compile and warm up both.
    tok_a, cache_a, rng_a = base(params, tok_a, cache_a, rng_a)
    tok_b, cache_b, rng_b = ad(params, heads_params, tok_b, cache_b, rng_b)
    jax.block_until_ready((tok_a, tok_b))

    ta, tb = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        tok_a, cache_a, rng_a = base(params, tok_a, cache_a, rng_a)
        jax.block_until_ready(tok_a)
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok_b, cache_b, rng_b = ad(params, heads_params, tok_b, cache_b, rng_b)
        jax.block_until_ready(tok_b)
        tb.append(time.perf_counter() - t0)

    h = jax.random.normal(jax.random.PRNGKey(4), (B, H), jnp.float32)
    lg = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (B, V), jnp.float32)
    jax.block_until_ready(heads_only(heads_params, h, lg))
    th = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(heads_only(heads_params, h, lg))
        th.append(time.perf_counter() - t0)

    ta, tb = np.asarray(ta), np.asarray(tb)
    base_ms, ad_ms = float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3
    rec = {
        "bench": "autodeco_decode_step",
        "config": args.config,
        "vocab_size": V,
        "hidden_size": H,
        "params": int(count_params(model)["total"]),
        "batch": B,
        "context": args.context,
        "dtype": args.dtype,
        "reps": args.reps,
        "base_ms": round(base_ms, 4),
        "autodeco_ms": round(ad_ms, 4),
        "overhead": round(ad_ms / base_ms - 1.0, 5),
        "overhead_paired": round(float(np.median(tb / ta)) - 1.0, 5),
        "overhead_paired_ci95": _bootstrap_ci(tb / ta - 1.0),
        "heads_ms": round(float(np.median(th)) * 1e3, 4),
        "heads_share": round(float(np.median(th)) / float(np.median(ta)), 5),
        "base_ms_iqr": [round(float(x) * 1e3, 3) for x in np.percentile(ta, [25, 75])],
        "autodeco_ms_iqr": [round(float(x) * 1e3, 3) for x in np.percentile(tb, [25, 75])],
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
    }
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
