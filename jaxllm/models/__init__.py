"""Models: one contract (`base`), one registry keyed by Hugging Face `model_type` (`registry`).
Names resolve lazily:

    from jaxllm.models import KimiLinear, KimiLinearConfig, ModelOutput, registry
"""

import importlib

_LAZY = {
    "ModelOutput": "jaxllm.models.base",
    "LanguageModel": "jaxllm.models.base",
    "count_params": "jaxllm.models.base",
    "cache_bytes": "jaxllm.models.base",
    "KimiLinear": "jaxllm.models.kimi_linear",
    "ModelCache": "jaxllm.models.kimi_linear",
    "init_cache": "jaxllm.models.kimi_linear",
    "KimiLinearConfig": "jaxllm.models.config",
    "ConfigError": "jaxllm.errors",
    "load_hf_checkpoint": "jaxllm.models.hf",
    "save_hf_checkpoint": "jaxllm.models.hf",
}


def __getattr__(name):
    if name == "registry":
        return importlib.import_module("jaxllm.models.registry")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxllm.models' has no attribute {name!r}")
