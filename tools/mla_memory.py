"""Compiled memory of one MLA layer (and, for the cached append, one KDA layer) at a model's widths
(XLA's `memory_analysis()`, CPU; nothing is run, so the 48B widths compile on a laptop).

Prints one JSON line per measurement:
- `train`: forward + backward (gradients of params and input) of one layer over B x T tokens,
  for each T; the blockwise attention (impl="auto") and, where it still compiles in reasonable
  time, the dense expanded form (impl="expanded", the code before issue 16: [B,H,T,T] scores);
  `per_token` = temporaries / T, flat when memory grows linearly.
- `append`: appending a T-token chunk to a B-row, S-capacity cache (the cache donated, as the
  decode engine does): impl="expanded" is the old path (per-head K/V expanded over the whole
  capacity), impl="auto" the absorbed blockwise one; `budget` = 2 x the bytes the chunk adds to
  the cache + the layer's weights (issue 15's goal), `within_budget` says whether temporaries fit.
  `layer="kda"`: the same append through one KDA layer (chunk op from the cached state, conv state
  taken at each row's length); its cache is a fixed-size state, so its budget is 2 x the state.
- `context` (with `--context-topology`, needs libtpu): MLA's expanded attention alone under
  context parallelism (`mla_sharded_expanded`, one span of keys expanded at a time, the Pallas
  TPU kernels), forward + backward of q, latent, rope key and kv_b weights, bf16, compiled for a
  TPU topology (libtpu AOT) with the sequence over all of its chips; temporaries per device.

    python tools/mla_memory.py [--config configs/kimi_linear_48b_a3b.json] [--T 2048 4096 ...]
        [--dense-max-T 4096] [--batch 1] [--append-batch 64 --append-T 32 --capacity 32768]
        [--dtype float32]
    python tools/mla_memory.py --context-topology v5e:2x2 --context-T 32768 131072  # only that
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as shd
from jaxllm.models.config import KimiLinearConfig
from jaxllm.nn.kda_attention import KimiDeltaAttention
from jaxllm.nn.mla import MLA, mla_sharded_expanded

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30


def mla_layer(config, impl, dtype, **kw) -> MLA:
    return MLA(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        q_lora_rank=config.q_lora_rank,
        impl=impl,
        dtype=dtype,
        param_dtype=dtype,
        **kw,
    )


def abstract_params(layer, x):
    return jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x), x)


def nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))


def train_temp_bytes(layer, B, T, dtype) -> int:
    """Temporaries of forward + backward (grads of params and x) of `layer` on [B,T,D] input."""
    x = jax.ShapeDtypeStruct((B, T, layer.hidden_size), dtype)
    params = abstract_params(layer, x)

    def loss(p, x):
        y, _ = layer.apply(p, x)
        return jnp.sum(y.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def append_temp_bytes(layer, B, T, S, dtype) -> tuple[int, int, int]:
    """(temporaries, chunk bytes added to the cache, weight bytes) of one cached T-token append."""
    x = jax.ShapeDtypeStruct((B, T, layer.hidden_size), dtype)
    params = abstract_params(layer, x)
    cache = jax.eval_shape(lambda: layer.init_cache(B, S, dtype))
    pos = jax.ShapeDtypeStruct((B,), jnp.int32)
    step = jax.jit(lambda p, x, c, pos: layer.apply(p, x, cache=c, pos=pos), donate_argnums=(2,))
    compiled = step.lower(params, x, cache, pos).compile()
    chunk = B * T * (layer.kv_lora_rank + layer.qk_rope_head_dim) * jnp.dtype(dtype).itemsize
    return compiled.memory_analysis().temp_size_in_bytes, chunk, nbytes(params)


def kda_append_temp_bytes(config, B, T, dtype) -> tuple[int, int, int]:
    """(temporaries, cache bytes, weight bytes) of one KDA layer's cached T-token ragged append."""
    layer = KimiDeltaAttention(
        config.hidden_size, config.kda_num_heads, config.kda_head_dim, config.kda_conv_kernel, dtype=dtype
    )
    x = jax.ShapeDtypeStruct((B, T, config.hidden_size), dtype)
    params = abstract_params(layer, x)
    cache = jax.eval_shape(lambda: layer.init_cache(B, dtype))
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    step = jax.jit(lambda p, x, c, n: layer.apply(p, x, cache=c, lengths=n), donate_argnums=(2,))
    compiled = step.lower(params, x, cache, lengths).compile()
    return compiled.memory_analysis().temp_size_in_bytes, nbytes(cache), nbytes(params)


def context_temp_bytes(config, topology: str, B: int, T: int) -> tuple[int, int]:
    """(per-device temporaries, devices) of MLA's expanded attention, forward + backward, with the
    sequence split over every chip of a TPU `topology` (libtpu compile-only devices)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = shd.make_mesh(shd.MeshConfig(data=1, context=len(devices)), devices)
    H, N, R = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    L, V, bf = config.kv_lora_rank, config.v_head_dim, jnp.bfloat16
    tokens, whole = NamedSharding(mesh, P(None, "context")), NamedSharding(mesh, P())
    sds = jax.ShapeDtypeStruct
    args = (
        sds((B, T, H, N + R), bf, sharding=tokens),
        sds((B, T, L), bf, sharding=tokens),
        sds((B, T, R), bf, sharding=tokens),
        sds((L, H, N + V), bf, sharding=whole),
        sds((B, T), jnp.int32, sharding=tokens),
    )

    def loss(q, latent, k_rope, w, seg):
        o = mla_sharded_expanded(
            mesh, q, latent, k_rope, w, seg, nope=N, scale=(N + R) ** -0.5, impl="pallas_tpu"
        )
        return jnp.sum(o.astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes, len(devices)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "kimi_linear_48b_a3b.json"))
    p.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dense-max-T", type=int, default=4096, help="largest T to compile the dense form at")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--append-batch", type=int, default=64)
    p.add_argument("--append-T", type=int, default=32)
    p.add_argument("--capacity", type=int, default=32768)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-append", action="store_true")
    p.add_argument("--context-topology", help="measure context parallelism on this TPU topology only")
    p.add_argument("--context-T", type=int, nargs="+", default=[32768, 131072])
    args = p.parse_args(argv)
    config = KimiLinearConfig.from_file(args.config)
    dtype = jnp.dtype(args.dtype)
    if args.context_topology:
        for T in args.context_T:
            temp, n = context_temp_bytes(config, args.context_topology, args.batch, T)
            line = dict(what="context", topology=args.context_topology, context=n, B=args.batch, T=T)
            print(json.dumps(dict(line, temp_bytes=temp, temp_gb=round(temp / 1e9, 3))), flush=True)
        return
    widths = dict(
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_lora_rank=config.kv_lora_rank,
        nope=config.qk_nope_head_dim,
        rope=config.qk_rope_head_dim,
        v=config.v_head_dim,
    )
    for T in args.T:
        for impl in ("auto", "expanded"):
            if impl == "expanded" and T > args.dense_max_T:
                continue
            temp = train_temp_bytes(mla_layer(config, impl, dtype), args.batch, T, dtype)
            line = dict(what="train", impl=impl, B=args.batch, T=T, dtype=args.dtype, temp_bytes=temp)
            line.update(temp_gib=round(temp / GIB, 4), per_token=round(temp / (args.batch * T)), **widths)
            print(json.dumps(line), flush=True)
    if args.skip_append:
        return
    B, T, S = args.append_batch, args.append_T, args.capacity
    for impl in ("expanded", "auto"):
        temp, chunk, weights = append_temp_bytes(mla_layer(config, impl, dtype), B, T, S, dtype)
        head = dict(what="append", layer="mla", impl=impl, B=B, T=T, capacity=S, dtype=args.dtype)
        print_append(head, temp, chunk_bytes=chunk, weight_bytes=weights)
    temp, state, weights = kda_append_temp_bytes(config, B, T, dtype)
    print_append(
        dict(what="append", layer="kda", B=B, T=T, dtype=args.dtype),
        temp,
        state_bytes=state,
        weight_bytes=weights,
    )


def print_append(head: dict, temp: int, *, weight_bytes: int, **cache_bytes) -> None:
    """One JSON line: an append's temporaries against 2 x the cache bytes it touches + the weights."""
    ((name, touched),) = cache_bytes.items()
    budget = 2 * touched + weight_bytes
    line = dict(head, temp_bytes=temp, temp_gib=round(temp / GIB, 4), **{name: touched})
    line.update(
        weight_bytes=weight_bytes,
        budget_bytes=budget,
        temp_over_budget=round(temp / budget, 3),
        within_budget=temp <= budget,
    )
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
