"""The Kimi Linear hybrid stack: KDA / MLA (NoPE) attention layers, dense or MoE feed-forward.

    x = embed(ids)
    for each layer: x = x + Attn(RMSNorm(x));  x = x + FFN(RMSNorm(x))
    logits = lm_head(RMSNorm(x))            (float32)

`KimiLinear(config).apply(params, input_ids_BT, segment_ids=None, cache=None, return_hidden=False)`:
- no cache: returns `logits_BTV` (or `(logits_BTV, hidden_BTD)` with return_hidden);
- with a `ModelCache` (see `init_cache`): runs the T tokens after the cached ones and returns
  `(logits_BTV, new_cache)` (or `(logits_BTV, new_cache, hidden_BTD)`).
`segment_ids` [B,T] packs several documents per row: KDA state and short convs reset where the id
changes, MLA attends within a document only. Ids mark change points: a document starts wherever
the id differs from the previous token's, so `[0,0,1,1,0,0]` is three documents (a reused id never
joins an earlier one).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.config import KimiLinearConfig
from jaxllm.nn._params import param, project
from jaxllm.nn.kda_attention import KDACache, KimiDeltaAttention, init_kda_cache
from jaxllm.nn.mla import MLA, MLACache, init_mla_cache
from jaxllm.nn.mlp import MLP
from jaxllm.nn.moe import MoE
from jaxllm.nn.norms import RMSNorm
from pallas_kernels.kda.common import document_index


class ModelCache(NamedTuple):
    layers: tuple  # per layer: KDACache (KDA layers) or MLACache (MLA layers)
    pos: jax.Array  # int32 scalar: tokens already in the cache


def init_cache(config: KimiLinearConfig, batch: int, capacity: int, dtype=None) -> ModelCache:
    """Empty decode cache: KDA state float32 [B,H,K,V] + conv state, MLA latent cache [B,capacity,...]."""
    dtype = dtype or config.compute_dtype
    layers = []
    for t in config.layer_types:
        if t == "kda":
            layers.append(
                init_kda_cache(
                    batch, config.kda_num_heads, config.kda_head_dim, config.kda_conv_kernel, dtype
                )
            )
        else:
            layers.append(
                init_mla_cache(batch, capacity, config.kv_lora_rank, config.qk_rope_head_dim, dtype)
            )
    return ModelCache(tuple(layers), jnp.zeros((), jnp.int32))


def cache_bytes(cache: ModelCache) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache.layers)))


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids"):
    """Raise ValueError naming the bad ids when they are concrete and outside [0, vocab_size)."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {type(input_ids).__name__} of dtype {dtype}")
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise ValueError(
            f"{name}: token ids must be in [0, {vocab_size}); got {ids[bad][:5].tolist()} "
            f"at positions {where}"
        )


def count_params(config: KimiLinearConfig) -> dict[str, int]:
    """Parameter counts from `jax.eval_shape` of init (nothing allocated).

    total; active = parameters used for one token (routed experts: only num_experts_per_token of
    num_experts per MoE layer); active_without_embeddings = active minus embedding and lm_head.
    """
    import math

    model = KimiLinear(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    tree = nn.meta.unbox(shapes)["params"]
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    inactive = 0
    for i, t in enumerate(config.mlp_layer_types):
        if t == "moe":
            moe = tree[f"layers_{i}"]["moe"]
            per_expert = sum(math.prod(moe[n].shape[1:]) for n in ("w1", "w2", "w3"))
            inactive += (config.num_experts - config.num_experts_per_token) * per_expert
    embed = math.prod(tree["embed_tokens"].shape) + (
        0 if config.tie_word_embeddings else math.prod(tree["lm_head"].shape)
    )
    active = total - inactive
    return {"total": total, "active": active, "active_without_embeddings": active - embed}


class DecoderLayer(nn.Module):
    config: KimiLinearConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x, *, segment_ids=None, cache=None, pos=None):
        c = self.config
        cd, pd = c.compute_dtype, c.weight_dtype
        h = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="input_layernorm")(x)
        if c.layer_types[self.layer_idx] == "kda":
            attn = KimiDeltaAttention(
                c.hidden_size,
                c.kda_num_heads,
                c.kda_head_dim,
                c.kda_conv_kernel,
                norm_eps=c.rms_norm_eps,
                impl=c.kda_impl,
                dtype=cd,
                param_dtype=pd,
                name="self_attn",
            )
            y, new_cache = attn(h, segment_ids=segment_ids, cache=cache)
        else:
            attn = MLA(
                c.hidden_size,
                c.num_attention_heads,
                c.kv_lora_rank,
                c.qk_nope_head_dim,
                c.qk_rope_head_dim,
                c.v_head_dim,
                q_lora_rank=c.q_lora_rank,
                impl=c.mla_impl,
                dtype=cd,
                param_dtype=pd,
                name="self_attn",
            )
            y, new_cache = attn(h, segment_ids=segment_ids, cache=cache, pos=pos)
        x = x + y.astype(x.dtype)
        h = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="post_attention_layernorm")(x)
        if c.mlp_layer_types[self.layer_idx] == "dense":
            f = MLP(c.hidden_size, c.intermediate_size, dtype=cd, param_dtype=pd, name="mlp")(h)
        else:
            f = MoE(
                c.hidden_size,
                c.num_experts,
                c.num_experts_per_token,
                c.moe_intermediate_size,
                num_shared_experts=c.num_shared_experts,
                n_group=c.num_expert_group,
                topk_group=c.topk_group,
                renormalize=c.moe_renormalize,
                routed_scaling_factor=c.routed_scaling_factor,
                router_activation=c.moe_router_activation_func,
                dispatch=c.moe_dispatch,
                dtype=cd,
                param_dtype=pd,
                name="moe",
            )(h)
        return x + f.astype(x.dtype), new_cache


REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class KimiLinear(nn.Module):
    """The hybrid stack. `remat`: rematerialise each decoder layer in the backward pass —
    "none", "full" (save only layer inputs) or "dots" (also save matmul outputs)."""

    config: KimiLinearConfig
    remat: str = "none"

    def init_cache(self, batch: int, capacity: int, dtype=None) -> ModelCache:
        return init_cache(self.config, batch, capacity, dtype)

    @nn.compact
    def __call__(
        self, input_ids_BT, *, segment_ids=None, cache: ModelCache | None = None, return_hidden: bool = False
    ):
        c = self.config
        cd, pd = c.compute_dtype, c.weight_dtype
        check_token_ids(input_ids_BT, c.vocab_size)
        if input_ids_BT.ndim != 2:
            raise ValueError(f"input_ids must be [B,T], got shape {input_ids_BT.shape}")
        if segment_ids is not None and segment_ids.shape != input_ids_BT.shape:
            raise ValueError(
                f"segment_ids must have input_ids' shape {input_ids_BT.shape}, got {segment_ids.shape}"
            )
        if segment_ids is not None:
            # once, here: every layer then compares document indices (each consumer converts too)
            segment_ids = document_index(segment_ids)
        if cache is not None and len(cache.layers) != c.num_hidden_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {c.num_hidden_layers}")
        embed = param(
            self,
            "embed_tokens",
            (c.vocab_size, c.hidden_size),
            ("vocab", "embed"),
            dtype=pd,
            init=nn.initializers.normal(0.02),
        )
        x = jnp.take(embed, input_ids_BT, axis=0).astype(cd)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        layer_cls = (
            DecoderLayer
            if self.remat == "none"
            else nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat])
        )
        new_layers = []
        pos = None if cache is None else cache.pos
        for i in range(c.num_hidden_layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, nc = layer_cls(c, i, name=f"layers_{i}")(
                x, segment_ids=segment_ids, cache=layer_cache, pos=pos
            )
            new_layers.append(nc)
        hidden = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="norm")(x)
        if c.tie_word_embeddings:
            logits = project(hidden, embed.T, out_dtype=jnp.float32)
        else:
            head = param(
                self,
                "lm_head",
                (c.hidden_size, c.vocab_size),
                ("embed", "vocab"),
                dtype=pd,
                init=nn.initializers.normal(0.02),
            )
            logits = project(hidden, head, out_dtype=jnp.float32)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return (logits, hidden) if return_hidden else logits
        new_cache = ModelCache(tuple(new_layers), cache.pos + input_ids_BT.shape[1])
        return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)


__all__ = [
    "KimiLinear",
    "KimiLinearConfig",
    "ModelCache",
    "init_cache",
    "cache_bytes",
    "count_params",
    "KDACache",
    "MLACache",
]
