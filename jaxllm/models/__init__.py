"""Models. Names resolve lazily:

from jaxllm.models import KimiLinear, KimiLinearConfig
"""

import importlib

_LAZY = {
    "KimiLinear": "jaxllm.models.kimi_linear",
    "ModelCache": "jaxllm.models.kimi_linear",
    "init_cache": "jaxllm.models.kimi_linear",
    "count_params": "jaxllm.models.kimi_linear",
    "KimiLinearConfig": "jaxllm.models.config",
    "ConfigError": "jaxllm.models.config",
    "load_hf_checkpoint": "jaxllm.models.hf",
    "save_hf_checkpoint": "jaxllm.models.hf",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxllm.models' has no attribute {name!r}")
