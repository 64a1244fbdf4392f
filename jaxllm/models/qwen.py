"""The Qwen3 / Qwen3-MoE / Qwen2 / Llama family: pre-norm decoders with GQA + RoPE and SwiGLU or MoE.

    x = embed(ids)
    for each layer: x = x + Attention(RMSNorm(x), positions);  x = x + FFN(RMSNorm(x))
    hidden = RMSNorm(x);  logits = lm_head(hidden)             (float32; lm_head = embed^T when tied)

The four `model_type`s differ only in switches of one config (`QwenConfig`):
- qwen3:     per-head q/k RMSNorm, separate head_dim, attention_bias usually off;
- qwen3_moe: qwen3 + softmax top-k MoE (no shared expert) in every `decoder_sparse_step`-th layer
             outside `mlp_only_layers`; norm_topk_prob; load-balancing loss (`router_aux_loss_coef`,
             returned in `aux_losses` when `output_router_logits`, as transformers adds it);
- qwen2:     biases on the q/k/v projections (never on o);
- llama:     Llama-3 `rope_scaling` (rope_type "llama3"), optional biases on q/k/v/o.
The model follows the contract of `models/base.py`; `init_cache` gives a `QwenCache` of per-layer
`KVCache`s and per-row lengths `pos` [B].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.errors import ConfigError
from jaxllm.models import base, registry
from jaxllm.models.hf_keys import Identity, Linear, Reshape, expand_table
from jaxllm.nn.attention import Attention, KVCache, init_kv_cache
from jaxllm.nn.mlp import MLP
from jaxllm.nn.moe import MoE
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import LLAMA3_KEYS, ROPE_TYPES
from pallas_kernels.kda.common import document_index

MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2", "llama")
MOE_DISPATCHES = ("auto", "onehot", "gather", "ragged", "blocked")
MOE_EXCHANGES = ("dense", "ragged")  # jaxllm.nn.moe_parallel.EXCHANGES
DTYPES = ("float32", "bfloat16", "float16")
_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


# ------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class QwenConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    # attention
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (qwen3, qwen3_moe)
    qkv_bias: bool = False  # biases on q/k/v_proj (qwen2 always; attention_bias elsewhere)
    o_bias: bool = False  # bias on o_proj (attention_bias in qwen3 / llama; never in qwen2)
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "llama3"
    rope_scaling: tuple = ()  # sorted ((key, value), ...): llama3's factor, low/high_freq_factor, ...
    max_position_embeddings: int = 2048
    # MoE (qwen3_moe)
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_token: int = 1
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False  # transformers adds the balance loss only then; so do we
    # misc
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # runtime choices (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    moe_dispatch: str = "auto"
    moe_expert_parallel: bool = True  # under a mesh: expert-parallel all-to-all / per-device dispatch
    moe_capacity_factor: float | None = None  # expert-parallel capacity per device pair; None = dropless
    moe_expert_exchange: str = "dense"  # or "ragged": dropless ragged_all_to_all (not on CPU)

    def __post_init__(self):
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        object.__setattr__(self, "eos_token_id", norm(self.eos_token_id))
        scaling = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
        object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in scaling)))
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self):
        def bad(field, msg):
            raise ConfigError(f"QwenConfig.{field}: {msg}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"got {self.model_type!r}; allowed: {MODEL_TYPES}")
        for f in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts_per_token",
            "decoder_sparse_step",
            "max_position_embeddings",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"must be a positive int, got {v!r}")
        for f in ("intermediate_size", "moe_intermediate_size", "num_experts"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f, f"must be a non-negative int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}",
            )
        if self.head_dim % 2:
            bad("head_dim", f"must be even (rotary halves), got {self.head_dim}")
        if not self.rope_theta > 0:
            bad("rope_theta", f"must be > 0, got {self.rope_theta!r}")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"got {self.rope_type!r}; allowed: {ROPE_TYPES}")
        scaling = dict(self.rope_scaling)
        if self.rope_type == "llama3":
            missing = [k for k in LLAMA3_KEYS if k not in scaling]
            if missing:
                bad("rope_scaling", f"rope_type 'llama3' needs {missing}, got {scaling}")
            if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
                bad("rope_scaling", f"high_freq_factor must exceed low_freq_factor, got {scaling}")
        elif scaling:
            bad("rope_scaling", f"must be empty for rope_type 'default', got {scaling}")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            bad("qkv_bias", "qwen2 has biases on q/k/v_proj and none on o_proj (qkv_bias=True, o_bias=False)")
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            # one switch, attention_bias, sets all four projections' biases in the hub config
            bad(
                "o_bias",
                f"{self.model_type} ties o_proj's bias to q/k/v's (attention_bias); got {self.o_bias}",
            )
        if self.model_type != "qwen3_moe" and self.num_experts:
            bad("num_experts", f"must be 0 for model_type {self.model_type!r}, got {self.num_experts}")
        if "dense" in self.mlp_layer_types and self.intermediate_size < 1:
            bad("intermediate_size", "must be >= 1 when some layer has a dense FFN")
        if "moe" in self.mlp_layer_types:
            if self.moe_intermediate_size < 1:
                bad("moe_intermediate_size", "must be >= 1 when some layer is MoE")
            if self.num_experts_per_token > self.num_experts:
                bad("num_experts_per_token", f"{self.num_experts_per_token} > num_experts {self.num_experts}")
        for i in self.mlp_only_layers:
            if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                bad("mlp_only_layers", f"entry {i!r} outside 0..{self.num_hidden_layers - 1}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            bad("moe_capacity_factor", f"must be > 0 or null (dropless), got {self.moe_capacity_factor}")
        if self.moe_expert_exchange == "ragged" and self.moe_capacity_factor is not None:
            bad("moe_expert_exchange", "'ragged' is dropless: set moe_capacity_factor to null")
        for f, allowed in (
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("moe_dispatch", MOE_DISPATCHES),
            ("moe_expert_exchange", MOE_EXCHANGES),
        ):
            if getattr(self, f) not in allowed:
                bad(f, f"got {getattr(self, f)!r}; allowed: {allowed}")

    # ---------------------------------------------------------------- helpers
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def mlp_layer_types(self) -> tuple[str, ...]:
        """Per layer "dense" | "moe" (transformers' Qwen3MoeDecoderLayer rule)."""
        return tuple(
            "moe"
            if self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            else "dense"
            for i in range(self.num_hidden_layers)
        )

    def replace(self, **kw) -> "QwenConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- HF interop
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], **overrides) -> "QwenConfig":
        """From a config.json dict: released layout (`rope_theta`, `rope_scaling`) or transformers 5's
        (`rope_parameters`). Features we do not implement raise a ConfigError naming the field."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"QwenConfig.model_type: got {model_type!r}; allowed: {MODEL_TYPES}")

        def need(key):
            if cfg.get(key) is None:
                raise ConfigError(f"QwenConfig.{key}: missing from the HF config")
            return cfg[key]

        # what we do not implement, refused rather than silently ignored
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"QwenConfig.hidden_act: only 'silu' is implemented, got {cfg['hidden_act']!r}")
        if cfg.get("use_sliding_window"):
            raise ConfigError("QwenConfig.use_sliding_window: sliding-window attention is not implemented")
        layer_types = cfg.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ConfigError(
                f"QwenConfig.layer_types: only 'full_attention' layers are implemented, got {sorted(set(layer_types))}"
            )
        if cfg.get("mlp_bias"):
            raise ConfigError("QwenConfig.mlp_bias: biases in the MLP are not implemented")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(
                f"QwenConfig.pretraining_tp: only 1 is implemented, got {cfg['pretraining_tp']!r}"
            )

        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None)
        theta = cfg.get("rope_theta", 10000.0) if theta is None else theta
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError("QwenConfig.partial_rotary_factor: only 1.0 (full rotary) is implemented")
        if rope_type == "default":
            rope = {}  # transformers ignores stray keys for the default type
        elif rope_type == "llama3":
            rope = {k: rope[k] for k in LLAMA3_KEYS if k in rope}
        else:
            raise ConfigError(f"QwenConfig.rope_type: got {rope_type!r}; allowed: {ROPE_TYPES}")

        heads = need("num_attention_heads")
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias, o_bias = (True, False) if model_type == "qwen2" else (attention_bias, attention_bias)
        is_moe = model_type == "qwen3_moe"
        num_experts = (cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if is_moe else 0
        eos = cfg.get("eos_token_id")
        kw = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
            intermediate_size=cfg.get("intermediate_size") or 0,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling=tuple(rope.items()),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            moe_intermediate_size=(cfg.get("moe_intermediate_size") or 0) if is_moe else 0,
            num_experts=num_experts,
            num_experts_per_token=cfg.get("num_experts_per_tok", 1) if is_moe else 1,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if is_moe else True,
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
            output_router_logits=bool(cfg.get("output_router_logits", False)),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=cfg.get("pad_token_id"),
        )
        kw.update(overrides)
        try:
            return cls(**kw)
        except TypeError as e:  # an unknown override
            raise ConfigError(f"QwenConfig: {e}") from None

    def to_hf_config(self, layout: str = "released") -> dict[str, Any]:
        """The released checkpoints' config.json layout (`rope_theta` + `rope_scaling`)."""
        if layout != "released":
            raise ValueError(f"QwenConfig.to_hf_config: layout must be 'released', got {layout!r}")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        cfg = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": self.rope_type, **dict(self.rope_scaling)}
            if self.rope_type != "default"
            else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = False
        else:
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
        if self.model_type == "qwen3_moe":
            cfg.update(
                moe_intermediate_size=self.moe_intermediate_size,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_token,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=self.output_router_logits,
            )
        return cfg

    @classmethod
    def from_file(cls, path, **overrides) -> "QwenConfig":
        """From a checkpoint folder's config.json (or the file), or one of our configs/*.json."""
        return cls.from_hf_config(registry.read_hf_config(path), **overrides)


# ------------------------------------------------------------------------------------ model
class QwenCache(NamedTuple):
    layers: tuple  # per layer: KVCache [B,S,K,D]
    pos: jax.Array  # int32 [B]: tokens already cached per row


def init_cache(config: QwenConfig, batch: int, capacity: int, dtype=None) -> QwenCache:
    dtype = dtype or config.compute_dtype
    layer = lambda: init_kv_cache(batch, capacity, config.num_key_value_heads, config.head_dim, dtype)
    return QwenCache(tuple(layer() for _ in range(config.num_hidden_layers)), jnp.zeros((batch,), jnp.int32))


class DecoderLayer(nn.Module):
    """Returns (x, new KVCache or None, MoE `load_balance_stats` or None)."""

    config: QwenConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x, positions, *, segment_ids=None, cache: KVCache | None = None, pos=None):
        c = self.config
        cd, pd = c.compute_dtype, c.weight_dtype
        h = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="input_layernorm")(x)
        y, new_cache = Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            rope_theta=c.rope_theta,
            rope_type=c.rope_type,
            rope_scaling=c.rope_scaling,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_bias,
            qk_norm=c.qk_norm,
            norm_eps=c.rms_norm_eps,
            dtype=cd,
            param_dtype=pd,
            name="self_attn",
        )(h, positions, segment_ids=segment_ids, cache=cache, pos=pos)
        x = x + y.astype(x.dtype)
        h = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="post_attention_layernorm")(x)
        stats = None
        if c.mlp_layer_types[self.layer_idx] == "dense":
            f = MLP(c.hidden_size, c.intermediate_size, dtype=cd, param_dtype=pd, name="mlp")(h)
        else:
            f, stats = MoE(
                c.hidden_size,
                c.num_experts,
                c.num_experts_per_token,
                c.moe_intermediate_size,
                num_shared_experts=0,
                renormalize=c.norm_topk_prob,
                router_activation="softmax",
                dispatch=c.moe_dispatch,
                expert_parallel=c.moe_expert_parallel,
                capacity_factor=c.moe_capacity_factor,
                expert_exchange=c.moe_expert_exchange,
                correction_bias=False,
                return_router_stats=True,
                dtype=cd,
                param_dtype=pd,
                name="moe",
            )(h)
        return x + f.astype(x.dtype), new_cache, stats


def load_balance_loss(stats, num_experts: int):
    """transformers' `load_balancing_loss_func`: E * sum_e routed_e * prob_e, each a mean over the
    tokens of every MoE layer together (not a mean of per-layer losses)."""
    routed_E = jnp.mean(jnp.stack([r for r, _ in stats]), axis=0)
    prob_E = jnp.mean(jnp.stack([p for _, p in stats]), axis=0)
    return num_experts * jnp.sum(routed_E * prob_E)


class Qwen(nn.Module):
    """Qwen3 / Qwen3-MoE / Qwen2 / Llama decoder (contract: `models/base.py`). `remat`: rematerialise
    each decoder layer in the backward pass — "none", "full" (save only layer inputs) or "dots"
    (also save matmul outputs)."""

    config: QwenConfig
    remat: str = "none"

    def init_cache(self, batch: int, capacity: int, dtype=None) -> QwenCache:
        return init_cache(self.config, batch, capacity, dtype)

    @nn.compact
    def __call__(
        self, input_ids_BT, *, positions=None, segment_ids=None, cache: QwenCache | None = None, lengths=None
    ):
        c = self.config
        pd = c.weight_dtype
        base.check_inputs(
            input_ids_BT, c.vocab_size, positions=positions, segment_ids=segment_ids, cache=cache
        )
        T = input_ids_BT.shape[1]
        lengths = base.append_lengths(lengths, input_ids_BT, cache)  # attention needs only the new pos
        if cache is not None:
            if len(cache.layers) != c.num_hidden_layers:
                raise ValueError(f"cache has {len(cache.layers)} layers, the model {c.num_hidden_layers}")
            _check_capacity(cache, T)
        if positions is None:
            positions = base.default_positions(input_ids_BT, segment_ids=segment_ids, cache=cache)
        if segment_ids is not None:
            segment_ids = document_index(segment_ids)  # once here; the layers compare indices
        layer_cls = base.remat_layer(DecoderLayer, self.remat)
        embed, x = base.embed_tokens(self, c, input_ids_BT)
        pos = None if cache is None else cache.pos
        new_layers, stats = [], []
        for i in range(c.num_hidden_layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, nc, st = layer_cls(c, i, name=f"layers_{i}")(
                x, positions, segment_ids=segment_ids, cache=layer_cache, pos=pos
            )
            new_layers.append(nc)
            if st is not None:
                stats.append(st)
        hidden = RMSNorm(c.rms_norm_eps, param_dtype=pd, name="norm")(x)
        logits = base.lm_head_logits(self, c, hidden, embed)
        aux = {}
        if stats and cache is None and c.output_router_logits:
            aux["load_balance"] = c.router_aux_loss_coef * load_balance_loss(stats, c.num_experts)
        new_cache = (
            None if cache is None else QwenCache(tuple(new_layers), base.advanced_pos(cache, lengths, T))
        )
        return base.ModelOutput(logits=logits, hidden=hidden, cache=new_cache, aux_losses=aux)


def _check_capacity(cache: QwenCache, T: int):
    """A row past the buffer's end would be written at a clamped offset: refuse when we can see it."""
    if isinstance(cache.pos, jax.core.Tracer):
        return
    capacity = cache.layers[0].k.shape[1] if cache.layers else 0
    longest = int(jnp.max(cache.pos)) + T
    if longest > capacity:
        raise ValueError(f"cache capacity {capacity} is too small: a row would reach {longest} tokens")


# ------------------------------------------------------------------------------------ hub keys
# (kind, hub key template, param path template, transform); {i} layer, {e} expert.
_L = "model.layers.{i}."
_P = "layers_{i}/"
_flat = Reshape(lambda s: (math.prod(s),))
TABLE = [
    ("global", "model.embed_tokens.weight", "embed_tokens", Identity()),
    ("global", "model.norm.weight", "norm/weight", Identity()),
    ("lm_head", "lm_head.weight", "lm_head", Linear()),
    ("layer", _L + "input_layernorm.weight", _P + "input_layernorm/weight", Identity()),
    ("layer", _L + "post_attention_layernorm.weight", _P + "post_attention_layernorm/weight", Identity()),
    *[("layer", _L + f"self_attn.{n}_proj.weight", _P + f"self_attn/{n}_proj", Linear()) for n in "qkv"],
    ("layer", _L + "self_attn.o_proj.weight", _P + "self_attn/o_proj", Linear(2)),
    *[("qkv_bias", _L + f"self_attn.{n}_proj.bias", _P + f"self_attn/{n}_bias", _flat) for n in "qkv"],
    ("o_bias", _L + "self_attn.o_proj.bias", _P + "self_attn/o_bias", Identity()),
    *[
        ("qk_norm", _L + f"self_attn.{n}_norm.weight", _P + f"self_attn/{n}_norm/weight", Identity())
        for n in "qk"
    ],
    *[
        ("dense", _L + f"mlp.{n}.weight", _P + f"mlp/{n}", Linear())
        for n in ("gate_proj", "up_proj", "down_proj")
    ],
    ("moe", _L + "mlp.gate.weight", _P + "moe/router", Linear()),
    *[
        ("expert", _L + f"mlp.experts.{{e}}.{hub}.weight", _P + f"moe/{ours}", Linear())
        for hub, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
    ],
]


def hf_key_specs(config: QwenConfig):
    """Every hub key of a checkpoint of this config (see `models/hf_keys.py`)."""
    switches = {"qkv_bias": config.qkv_bias, "o_bias": config.o_bias, "qk_norm": config.qk_norm}
    common = {"layer"} | {k for k, on in switches.items() if on}
    layer_kinds = [
        common | ({"dense"} if t == "dense" else {"moe", "expert"}) for t in config.mlp_layer_types
    ]
    global_kinds = {"global"} | (set() if config.tie_word_embeddings else {"lm_head"})
    return expand_table(
        TABLE, global_kinds=global_kinds, layer_kinds=layer_kinds, num_experts=config.num_experts
    )


ARCHITECTURES = {
    t: registry.Architecture(t, QwenConfig, Qwen, hf_key_specs, keep_float32=()) for t in MODEL_TYPES
}

__all__ = ["ARCHITECTURES", "Qwen", "QwenCache", "QwenConfig", "hf_key_specs", "init_cache"]
