"""Flax Linen layers (thin wrappers over pure functions). Names resolve lazily.

from jaxllm.nn import MLA, Attention, KimiDeltaAttention, MoE, MLP, RMSNorm
"""

import importlib

_LAZY = {
    "RMSNorm": "jaxllm.nn.norms",
    "rms_norm": "jaxllm.nn.norms",
    "gated_rms_norm": "jaxllm.nn.norms",
    "causal_conv": "jaxllm.nn.conv",
    "causal_conv_step": "jaxllm.nn.conv",
    "KimiDeltaAttention": "jaxllm.nn.kda_attention",
    "KDACache": "jaxllm.nn.kda_attention",
    "kda_gate": "jaxllm.nn.kda_attention",
    "MLA": "jaxllm.nn.mla",
    "MLACache": "jaxllm.nn.mla",
    "mla_expanded": "jaxllm.nn.mla",
    "mla_absorbed": "jaxllm.nn.mla",
    "Attention": "jaxllm.nn.attention",
    "KVCache": "jaxllm.nn.attention",
    "attend": "jaxllm.nn.attention",
    "apply_rope": "jaxllm.nn.rope",
    "inverse_frequencies": "jaxllm.nn.rope",
    "MoE": "jaxllm.nn.moe",
    "route": "jaxllm.nn.moe",
    "moe_experts": "jaxllm.nn.moe",
    "MLP": "jaxllm.nn.mlp",
    "swiglu": "jaxllm.nn.mlp",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxllm.nn' has no attribute {name!r}")
