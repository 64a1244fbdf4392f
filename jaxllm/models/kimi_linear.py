"""The Kimi Linear hybrid stack: KDA / MLA (NoPE) attention layers, dense or MoE feed-forward.

    x = embed(ids)
    for each layer: x = x + Attn(RMSNorm(x));  x = x + FFN(RMSNorm(x))
    logits = lm_head(RMSNorm(x))            (float32)

`KimiLinear(config)` implements the model contract of `jaxllm.models.base` (`ModelOutput`,
`init_cache`, per-row cache positions, segment ids as change points). No positional encoding:
`positions` is accepted and ignored. The hub-key table of the released checkpoints is `HF_TABLE`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import sharding as shd
from jaxllm.models import base, registry
from jaxllm.models.base import ModelOutput, cache_bytes, check_inputs, count_params
from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.hf_keys import Conv, Identity, Linear, Reshape, expand_table
from jaxllm.nn.kda_attention import KDACache, KimiDeltaAttention, init_kda_cache
from jaxllm.nn.mla import MLA, MLACache, init_mla_cache
from jaxllm.nn.mlp import MLP
from jaxllm.nn.moe import MoE
from jaxllm.nn.norms import RMSNorm
from pallas_kernels.kda.common import document_index


class ModelCache(NamedTuple):
    layers: tuple  # per layer: KDACache (KDA layers) or MLACache (MLA layers)
    pos: jax.Array  # int32 [B]: tokens already in the cache, per row


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
    return ModelCache(tuple(layers), jnp.zeros((batch,), jnp.int32))


class DecoderLayer(nn.Module):
    config: KimiLinearConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x, *, segment_ids=None, cache=None, pos=None, lengths=None):
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
            y, new_cache = attn(h, segment_ids=segment_ids, cache=cache, lengths=lengths)
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
        aux = {}
        if c.mlp_layer_types[self.layer_idx] == "dense":
            f = MLP(c.hidden_size, c.intermediate_size, dtype=cd, param_dtype=pd, name="mlp")(h)
        else:
            f, aux = MoE(
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
                expert_parallel=c.moe_expert_parallel,
                capacity_factor=c.moe_capacity_factor,
                expert_exchange=c.moe_expert_exchange,
                return_aux_losses=True,
                balance_loss_alpha=c.seq_balance_loss_alpha if cache is None else 0.0,
                router_z_loss_coef=c.router_z_loss_coef if cache is None else 0.0,
                dtype=cd,
                param_dtype=pd,
                name="moe",
            )(h)
        return x + f.astype(x.dtype), new_cache, aux


class KimiLinear(nn.Module):
    """The hybrid stack. `remat`: rematerialise each decoder layer in the backward pass —
    "none", "full" (save only layer inputs) or "dots" (also save matmul outputs)."""

    config: KimiLinearConfig
    remat: str = "none"

    def init_cache(self, batch: int, capacity: int, dtype=None) -> ModelCache:
        return init_cache(self.config, batch, capacity, dtype)

    @nn.compact
    def __call__(
        self,
        input_ids_BT,
        *,
        positions=None,
        segment_ids=None,
        cache: ModelCache | None = None,
        lengths=None,
    ) -> ModelOutput:
        del positions  # NoPE: no layer reads positions; the MLA cache slot comes from cache.pos
        c = self.config
        pd = c.weight_dtype
        check_inputs(input_ids_BT, c.vocab_size, segment_ids=segment_ids, cache=cache)
        lengths = base.append_lengths(lengths, input_ids_BT, cache)
        if segment_ids is not None:
            # once, here: every layer then compares document indices (each consumer converts too)
            segment_ids = document_index(segment_ids)
        if cache is not None and len(cache.layers) != c.num_hidden_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {c.num_hidden_layers}")
        embed, x = base.embed_tokens(self, c, input_ids_BT)
        # activations at layer boundaries: rows over the batch axes, the sequence over `context`
        act = lambda x: shd.constrain(x, ("batch", "length", "act_embed"))  # noqa: E731
        x = act(x)
        layer_cls = base.remat_layer(DecoderLayer, self.remat)
        new_layers, aux_losses = [], {}
        pos = None if cache is None else cache.pos
        for i in range(c.num_hidden_layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, nc, aux = layer_cls(c, i, name=f"layers_{i}")(
                x, segment_ids=segment_ids, cache=layer_cache, pos=pos, lengths=lengths
            )
            x = act(x)
            new_layers.append(nc)
            for name, value in aux.items():  # MoE losses: the sum over layers
                aux_losses[name] = aux_losses.get(name, 0.0) + value
        hidden = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="norm")(x)
        logits = shd.constrain(base.lm_head_logits(self, c, hidden, embed), ("batch", "length", "vocab"))
        new_cache = None
        if cache is not None:
            new_cache = ModelCache(
                tuple(new_layers), base.advanced_pos(cache, lengths, input_ids_BT.shape[1])
            )
        return ModelOutput(logits.astype(jnp.float32), hidden, new_cache, aux_losses)


# ------------------------------------------------------------------------------------ hub keys
# (kind, hub key template, param path template, transform[, aliases]); {i} layer, {e} expert.
L = "model.layers.{i}."
P = "layers_{i}/"
HF_TABLE = [
    ("global", "model.embed_tokens.weight", "embed_tokens", Identity()),
    ("global", "model.norm.weight", "norm/weight", Identity()),
    ("lm_head", "lm_head.weight", "lm_head", Linear()),
    ("layer", L + "input_layernorm.weight", P + "input_layernorm/weight", Identity()),
    ("layer", L + "post_attention_layernorm.weight", P + "post_attention_layernorm/weight", Identity()),
    # KDA
    *[("kda", L + f"self_attn.{n}_proj.weight", P + f"self_attn/{n}_proj", Linear()) for n in "qkv"],
    *[("kda", L + f"self_attn.{n}_conv1d.weight", P + f"self_attn/{n}_conv", Conv()) for n in "qkv"],
    ("kda", L + "self_attn.A_log", P + "self_attn/A_log", Reshape(lambda s: (1, 1, s[0], 1))),
    ("kda", L + "self_attn.dt_bias", P + "self_attn/dt_bias", Reshape(lambda s: (math.prod(s),))),
    *[
        ("kda", L + f"self_attn.{n}.weight", P + f"self_attn/{n}", Linear())
        for n in ("f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj")
    ],
    ("kda", L + "self_attn.o_norm.weight", P + "self_attn/o_norm", Identity()),
    ("kda", L + "self_attn.o_proj.weight", P + "self_attn/o_proj", Linear(2)),
    # MLA
    ("mla_q", L + "self_attn.q_proj.weight", P + "self_attn/q_proj", Linear()),
    ("mla_qlora", L + "self_attn.q_a_proj.weight", P + "self_attn/q_a_proj", Linear()),
    ("mla_qlora", L + "self_attn.q_a_layernorm.weight", P + "self_attn/q_a_layernorm", Identity()),
    ("mla_qlora", L + "self_attn.q_b_proj.weight", P + "self_attn/q_b_proj", Linear()),
    ("mla", L + "self_attn.kv_a_proj_with_mqa.weight", P + "self_attn/kv_a_proj_with_mqa", Linear()),
    ("mla", L + "self_attn.kv_a_layernorm.weight", P + "self_attn/kv_a_layernorm", Identity()),
    ("mla", L + "self_attn.kv_b_proj.weight", P + "self_attn/kv_b_proj", Linear()),
    ("mla", L + "self_attn.o_proj.weight", P + "self_attn/o_proj", Linear(2)),
    # dense FFN: released `mlp.*`, transformers re-save `block_sparse_moe.*`
    *[
        ("dense", L + f"mlp.{n}.weight", P + f"mlp/{n}", Linear(), (L + f"block_sparse_moe.{n}.weight",))
        for n in ("gate_proj", "up_proj", "down_proj")
    ],
    # MoE
    ("moe", L + "block_sparse_moe.gate.weight", P + "moe/router", Linear()),
    (
        "moe",
        L + "block_sparse_moe.gate.e_score_correction_bias",
        P + "moe/e_score_correction_bias",
        Identity(),
    ),
    *[
        ("expert", L + f"block_sparse_moe.experts.{{e}}.{n}.weight", P + f"moe/{n}", Linear())
        for n in ("w1", "w2", "w3")
    ],
    *[
        ("shared", L + f"block_sparse_moe.shared_experts.{n}.weight", P + f"moe/shared_{n}", Linear())
        for n in ("gate_proj", "up_proj", "down_proj")
    ],
]


def hf_key_specs(config: KimiLinearConfig):
    """Every hub key a checkpoint of this config holds."""
    layer_kinds = []
    for attn, ffn in zip(config.layer_types, config.mlp_layer_types):
        kinds = {"layer", attn, ffn}
        if attn == "mla":
            kinds.add("mla_qlora" if config.q_lora_rank else "mla_q")
        if ffn == "moe":
            kinds.add("expert")
            if config.num_shared_experts:
                kinds.add("shared")
        layer_kinds.append(kinds)
    global_kinds = {"global"} if config.tie_word_embeddings else {"global", "lm_head"}
    return expand_table(
        HF_TABLE, global_kinds=global_kinds, layer_kinds=layer_kinds, num_experts=config.num_experts
    )


def default_layer_types(num_layers: int, mla_every: int = 4) -> tuple[str, ...]:
    """Kimi Linear's 3:1 hybrid: every `mla_every`-th layer is MLA, the rest KDA."""
    return tuple("mla" if (i + 1) % mla_every == 0 else "kda" for i in range(num_layers))


def run_defaults(args: dict) -> dict:
    """`jaxllm train` model_args: missing `layer_types` = 3 KDA : 1 MLA; missing `mlp_layer_types` =
    first layer dense, the rest MoE when `num_experts` > 0."""
    args = dict(args)
    n = args.get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        args.setdefault("layer_types", default_layer_types(n))
        moe = args.get("num_experts", 0) > 0
        args.setdefault("mlp_layer_types", tuple("moe" if moe and i > 0 else "dense" for i in range(n)))
    return args


ARCHITECTURE = registry.Architecture(
    "kimi_linear",
    KimiLinearConfig,
    KimiLinear,
    hf_key_specs,
    keep_float32=("A_log", "dt_bias", "e_score_correction_bias"),  # gates and the router bias
    run_defaults=run_defaults,
)

__all__ = [
    "KimiLinear",
    "KimiLinearConfig",
    "ModelCache",
    "init_cache",
    "cache_bytes",
    "count_params",
    "ARCHITECTURE",
    "KDACache",
    "MLACache",
]
