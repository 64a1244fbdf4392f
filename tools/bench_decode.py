#!/usr/bin/env python
"""Per-token decode latency and cache bytes vs context length: hybrid Kimi Linear vs all-MLA.

Both models share every setting of `--config` except the attention layer kinds (the all-MLA twin
has an MLA layer wherever the hybrid has KDA). For each context length L the decode caches are
built at capacity L + reps + 1, filled with random values and `pos = L` (a decode step's cost does
not depend on the cached values, so no L-token prefill is run), then one-token steps are timed
(jitted, cache donated, median of `--reps`). Prints one JSON line per length with both latencies,
their ratio (measured in the same run) and the cache bytes; writes a PNG plot.

    python tools/bench_decode.py --config configs/small.json --plot docs/bench_decode.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxllm.models.base import cache_bytes  # noqa: E402
from jaxllm.models.config import KimiLinearConfig  # noqa: E402
from jaxllm.models.kimi_linear import KimiLinear, init_cache  # noqa: E402


def _filled_cache(config, batch, length, capacity, key):
    cache = init_cache(config, batch, capacity)
    leaves, tree = jax.tree_util.tree_flatten(cache.layers)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        (0.1 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for k, x in zip(keys, leaves)
    ]
    return cache._replace(
        layers=jax.tree_util.tree_unflatten(tree, leaves), pos=jnp.full((batch,), length, jnp.int32)
    )


def _kda_bytes(config, cache):
    return int(
        sum(
            x.size * x.dtype.itemsize
            for i, lc in enumerate(cache.layers)
            if config.layer_types[i] == "kda"
            for x in lc
        )
    )


def time_decode(config, params, batch, length, reps, key):
    model = KimiLinear(config)
    cache = _filled_cache(config, batch, length, length + reps + 1, key)
    nbytes, kda_bytes = cache_bytes(cache), _kda_bytes(config, cache)

    @jax.jit
    def _step(p, tok, c):
        out = model.apply(p, tok[:, None], cache=c)
        return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

    step = jax.jit(_step, donate_argnums=(2,))
    tok = jnp.zeros((batch,), jnp.int32)
    tok, cache = step(params, tok, cache)  # compile + warm up
    jax.block_until_ready(tok)
    times = []
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        tok, cache = step(params, tok, cache)
        jax.block_until_ready(tok)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, nbytes, kda_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.json")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--plot", default="docs/bench_decode.png", help="PNG path ('' to skip)")
    args = ap.parse_args(argv)

    hybrid = KimiLinearConfig.from_file(args.config, dtype=args.dtype, param_dtype=args.dtype)
    all_mla = hybrid.replace(layer_types=("mla",) * hybrid.num_hidden_layers)
    ids = jnp.zeros((1, 1), jnp.int32)
    p_h = jax.jit(KimiLinear(hybrid).init)(jax.random.PRNGKey(0), ids)
    p_m = jax.jit(KimiLinear(all_mla).init)(jax.random.PRNGKey(0), ids)
    device = jax.devices()[0].device_kind
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        h_ms, h_bytes, h_kda = time_decode(hybrid, p_h, args.batch, L, args.reps, jax.random.PRNGKey(L))
        m_ms, m_bytes, _ = time_decode(all_mla, p_m, args.batch, L, args.reps, jax.random.PRNGKey(L))
        row = dict(
            bench="decode",
            config=os.path.basename(args.config),
            device=device,
            batch=args.batch,
            dtype=args.dtype,
            context=L,
            hybrid_ms_per_token=round(h_ms, 3),
            all_mla_ms_per_token=round(m_ms, 3),
            all_mla_over_hybrid=round(m_ms / h_ms, 3),
            hybrid_cache_bytes=h_bytes,
            hybrid_kda_state_bytes=h_kda,
            hybrid_mla_cache_bytes=h_bytes - h_kda,
            all_mla_cache_bytes=m_bytes,
            hybrid_mla_cache_fraction=round((h_bytes - h_kda) / m_bytes, 4),
            hybrid_cache_fraction=round(h_bytes / m_bytes, 4),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.plot:
        import matplotlib  # noqa: PLC0415 (only for --plot; Agg backend before pyplot)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)

        L = [r["context"] for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(L, [r["hybrid_ms_per_token"] for r in rows], "o-", label="hybrid (KDA:MLA 3:1)")
        a.plot(L, [r["all_mla_ms_per_token"] for r in rows], "s-", label="all MLA")
        a.set(
            xscale="log",
            xlabel="context length (tokens)",
            ylabel="ms / token (batch %d)" % args.batch,
            title="decode latency, %s, %s" % (os.path.basename(args.config), device),
        )
        b.plot(L, [r["hybrid_cache_bytes"] / 2**20 for r in rows], "o-", label="hybrid")
        b.plot(L, [r["all_mla_cache_bytes"] / 2**20 for r in rows], "s-", label="all MLA")
        b.set(
            xscale="log",
            yscale="log",
            xlabel="context length (tokens)",
            ylabel="cache MiB",
            title="decode cache size",
        )
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
