"""`KimiLinearConfig`: a frozen, validated description of a Kimi Linear model.

Reads both Hugging Face `config.json` layouts (`from_hf_config`):
- transformers style: `layer_types` ("linear_attention" | "full_attention"), `mlp_layer_types`
  ("dense" | "sparse"), `linear_num_heads`, `linear_head_dim`, `linear_conv_kernel_dim`;
- released style: `linear_attn_config = {kda_layers, full_attn_layers (1-indexed), num_heads,
  head_dim, short_conv_kernel_size}`, `first_k_dense_replace`, `moe_layer_freq`.
Writes either back (`to_hf_config(layout=...)`). Our own fields: `layer_types` in {"kda","mla"},
`mlp_layer_types` in {"dense","moe"}, plus runtime choices (dtype, kernel/dispatch implementations).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax.numpy as jnp

from jaxllm.errors import ConfigError
from jaxllm.models import registry

LAYER_TYPES = ("kda", "mla")
MLP_TYPES = ("dense", "moe")
KDA_IMPLS = ("auto", "recurrent", "chunk")
MLA_IMPLS = ("auto", "expanded", "absorbed")
MOE_DISPATCHES = ("auto", "onehot", "gather", "ragged", "blocked")
MOE_EXCHANGES = ("dense", "ragged")  # jaxllm.nn.moe_parallel.EXCHANGES
DTYPES = ("float32", "bfloat16", "float16")
ROUTER_ACTIVATIONS = ("sigmoid", "softmax")

_HF_LAYER = {"linear_attention": "kda", "full_attention": "mla", "kda": "kda", "mla": "mla"}
_HF_MLP = {"dense": "dense", "sparse": "moe", "moe": "moe"}


@dataclasses.dataclass(frozen=True)
class KimiLinearConfig:
    model_type: ClassVar[str] = "kimi_linear"  # the Hugging Face model_type (the registry's key)
    HF_LAYOUTS: ClassVar[tuple[str, ...]] = ("released", "transformers")  # config.json/key layouts we write

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]  # per layer: "kda" | "mla"
    mlp_layer_types: tuple[str, ...]  # per layer: "dense" | "moe"
    # KDA
    kda_num_heads: int
    kda_head_dim: int
    kda_conv_kernel: int = 4
    # MLA (NoPE)
    num_attention_heads: int = 1
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # FFN / MoE
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_token: int = 1
    num_shared_experts: int = 0
    num_expert_group: int = 1
    topk_group: int = 1
    moe_renormalize: bool = True
    routed_scaling_factor: float = 1.0
    moe_router_activation_func: str = "sigmoid"
    # misc
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # runtime choices (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    kda_impl: str = "auto"
    mla_impl: str = "auto"
    moe_dispatch: str = "auto"
    moe_expert_parallel: bool = True  # under a mesh: expert-parallel all-to-all / per-device dispatch
    moe_capacity_factor: float | None = None  # expert-parallel capacity per device pair; None = dropless
    moe_expert_exchange: str = "dense"  # or "ragged": dropless ragged_all_to_all (not on CPU)
    # training-only MoE losses (0 = off), returned in ModelOutput.aux_losses without a cache
    seq_balance_loss_alpha: float = 0.0  # DeepSeek-V3's sequence-wise balance loss weight
    router_z_loss_coef: float = 0.0  # ST-MoE's router z-loss weight

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self):
        def bad(field, msg):
            raise ConfigError(f"KimiLinearConfig.{field}: {msg}")

        for f in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "kda_num_heads",
            "kda_head_dim",
            "kda_conv_kernel",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "num_experts_per_token",
            "num_expert_group",
            "topk_group",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"must be a positive int, got {v!r}")
        for f in (
            "qk_rope_head_dim",
            "intermediate_size",
            "moe_intermediate_size",
            "num_experts",
            "num_shared_experts",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f, f"must be a non-negative int, got {v!r}")
        for f in ("seq_balance_loss_alpha", "router_z_loss_coef"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                bad(f, f"must be a finite number >= 0 (0 = off), got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad("q_lora_rank", f"must be None or a positive int, got {self.q_lora_rank!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            bad(
                "layer_types",
                f"has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}",
            )
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                bad("layer_types", f"entry {i} is {t!r}; allowed: {LAYER_TYPES}")
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            bad(
                "mlp_layer_types",
                f"has {len(self.mlp_layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}",
            )
        for i, t in enumerate(self.mlp_layer_types):
            if t not in MLP_TYPES:
                bad("mlp_layer_types", f"entry {i} is {t!r}; allowed: {MLP_TYPES}")
        if "dense" in self.mlp_layer_types and self.intermediate_size < 1:
            bad("intermediate_size", "must be >= 1 when some layer has a dense FFN")
        if "moe" in self.mlp_layer_types:
            if self.num_experts < 1:
                bad("num_experts", "must be >= 1 when some layer is MoE")
            if self.moe_intermediate_size < 1:
                bad("moe_intermediate_size", "must be >= 1 when some layer is MoE")
            if self.num_experts_per_token > self.num_experts:
                bad("num_experts_per_token", f"{self.num_experts_per_token} > num_experts {self.num_experts}")
            if self.num_experts % self.num_expert_group:
                bad(
                    "num_expert_group",
                    f"{self.num_expert_group} does not divide num_experts {self.num_experts}",
                )
            if self.topk_group > self.num_expert_group:
                bad("topk_group", f"{self.topk_group} > num_expert_group {self.num_expert_group}")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            bad("moe_capacity_factor", f"must be > 0 or null (dropless), got {self.moe_capacity_factor}")
        if self.moe_expert_exchange == "ragged" and self.moe_capacity_factor is not None:
            bad("moe_expert_exchange", "'ragged' is dropless: set moe_capacity_factor to null")
        for f, allowed in (
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("kda_impl", KDA_IMPLS),
            ("mla_impl", MLA_IMPLS),
            ("moe_dispatch", MOE_DISPATCHES),
            ("moe_expert_exchange", MOE_EXCHANGES),
            ("moe_router_activation_func", ROUTER_ACTIVATIONS),
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
    def kda_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "kda")

    @property
    def mla_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "mla")

    def replace(self, **kw) -> "KimiLinearConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- HF interop
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], **overrides) -> "KimiLinearConfig":
        """Build from a Hugging Face config.json dict (transformers or released layout)."""
        cfg = dict(cfg)
        if "num_hidden_layers" not in cfg:
            raise ConfigError("KimiLinearConfig.num_hidden_layers: missing from the HF config")
        n = cfg["num_hidden_layers"]
        lac = cfg.get("linear_attn_config")
        if lac is not None:  # released layout
            kda_l = list(lac.get("kda_layers") or [])
            full_l = list(lac.get("full_attn_layers") or [])
            for name, lst in (("kda_layers", kda_l), ("full_attn_layers", full_l)):
                for v in lst:
                    if not isinstance(v, int) or not 1 <= v <= n:
                        raise ConfigError(
                            f"KimiLinearConfig.layer_types: linear_attn_config.{name} "
                            f"entry {v!r} outside 1..{n} (lists are 1-indexed)"
                        )
            if set(kda_l) & set(full_l):
                raise ConfigError(
                    f"KimiLinearConfig.layer_types: layers {sorted(set(kda_l) & set(full_l))}"
                    " are in both kda_layers and full_attn_layers"
                )
            if len(kda_l) + len(full_l) != n:
                missing = sorted(set(range(1, n + 1)) - set(kda_l) - set(full_l))
                raise ConfigError(
                    f"KimiLinearConfig.layer_types: 1-indexed layers {missing} are in "
                    "neither kda_layers nor full_attn_layers"
                )
            layer_types = ["kda" if (i + 1) in kda_l else "mla" for i in range(n)]
            kda_heads = lac.get("num_heads")
            kda_dim = lac.get("head_dim")
            conv = lac.get("short_conv_kernel_size", 4)
        else:  # transformers layout
            lt = cfg.get("layer_types")
            if lt is None:
                raise ConfigError(
                    "KimiLinearConfig.layer_types: the HF config has neither "
                    "`linear_attn_config` nor `layer_types`"
                )
            try:
                layer_types = [_HF_LAYER[t] for t in lt]
            except KeyError as e:
                raise ConfigError(
                    f"KimiLinearConfig.layer_types: unknown entry {e.args[0]!r}; allowed: {tuple(_HF_LAYER)}"
                ) from None
            kda_heads = cfg.get("linear_num_heads", cfg.get("num_attention_heads"))
            kda_dim = cfg.get("linear_head_dim", cfg.get("head_dim"))
            conv = cfg.get("linear_conv_kernel_dim", 4)
        num_experts = cfg.get("num_experts") or 0
        if cfg.get("mlp_layer_types") is not None:
            try:
                mlp_types = [_HF_MLP[t] for t in cfg["mlp_layer_types"]]
            except KeyError as e:
                raise ConfigError(
                    f"KimiLinearConfig.mlp_layer_types: unknown entry {e.args[0]!r}; "
                    f"allowed: {tuple(_HF_MLP)}"
                ) from None
        else:
            first_dense = cfg.get("first_k_dense_replace", 0) or 0
            freq = cfg.get("moe_layer_freq", 1) or 1
            mlp_types = [
                "moe" if (num_experts and i >= first_dense and i % freq == 0) else "dense" for i in range(n)
            ]
        use_grouped = cfg.get("use_grouped_topk", True)
        kw = dict(
            vocab_size=cfg.get("vocab_size"),
            hidden_size=cfg.get("hidden_size"),
            num_hidden_layers=n,
            layer_types=tuple(layer_types),
            mlp_layer_types=tuple(mlp_types),
            kda_num_heads=kda_heads,
            kda_head_dim=kda_dim,
            kda_conv_kernel=conv,
            num_attention_heads=cfg.get("num_attention_heads"),
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg.get("kv_lora_rank"),
            qk_nope_head_dim=cfg.get("qk_nope_head_dim"),
            qk_rope_head_dim=cfg.get("qk_rope_head_dim", 0),
            v_head_dim=cfg.get("v_head_dim"),
            intermediate_size=cfg.get("intermediate_size", 0) or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size", 0) or 0,
            num_experts=num_experts,
            num_experts_per_token=cfg.get("num_experts_per_token", 1),
            num_shared_experts=cfg.get("num_shared_experts", 0) or 0,
            num_expert_group=(cfg.get("num_expert_group", 1) or 1) if use_grouped else 1,
            topk_group=(cfg.get("topk_group", 1) or 1) if use_grouped else 1,
            moe_renormalize=bool(cfg.get("moe_renormalize", True)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            moe_router_activation_func=cfg.get("moe_router_activation_func", "sigmoid"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
        )
        if cfg.get("mla_use_nope") is False:
            raise ConfigError("KimiLinearConfig.mla_use_nope: only NoPE MLA (mla_use_nope=true) is supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self, layout: str = "released") -> dict[str, Any]:
        """A config.json dict in the released (`linear_attn_config`) or transformers layout."""
        if layout not in ("released", "transformers"):
            raise ConfigError(f"to_hf_config: layout must be 'released' or 'transformers', got {layout!r}")
        out = dict(
            architectures=["KimiLinearForCausalLM"],
            model_type="kimi_linear",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_token=self.num_experts_per_token,
            num_shared_experts=self.num_shared_experts,
            num_expert_group=self.num_expert_group,
            topk_group=self.topk_group,
            use_grouped_topk=True,
            moe_renormalize=self.moe_renormalize,
            routed_scaling_factor=self.routed_scaling_factor,
            moe_router_activation_func=self.moe_router_activation_func,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            mla_use_nope=True,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if layout == "released":
            mt = self.mlp_layer_types
            first_dense = next((i for i, t in enumerate(mt) if t == "moe"), len(mt))
            if any(t != "moe" for t in mt[first_dense:]):
                raise ConfigError(
                    "to_hf_config: mlp_layer_types is not 'first k dense, rest MoE'; use "
                    "layout='transformers'"
                )
            out.update(
                first_k_dense_replace=first_dense,
                moe_layer_freq=1,
                linear_attn_config=dict(
                    kda_layers=[i + 1 for i in self.kda_layers],
                    full_attn_layers=[i + 1 for i in self.mla_layers],
                    num_heads=self.kda_num_heads,
                    head_dim=self.kda_head_dim,
                    short_conv_kernel_size=self.kda_conv_kernel,
                ),
            )
        else:
            out.update(
                layer_types=[
                    "linear_attention" if t == "kda" else "full_attention" for t in self.layer_types
                ],
                mlp_layer_types=["dense" if t == "dense" else "sparse" for t in self.mlp_layer_types],
                linear_num_heads=self.kda_num_heads,
                linear_head_dim=self.kda_head_dim,
                linear_conv_kernel_dim=self.kda_conv_kernel,
            )
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "KimiLinearConfig":
        """Read a config.json (HF style, either layout) or a directory holding one."""
        return cls.from_hf_config(registry.read_hf_config(path), **overrides)
