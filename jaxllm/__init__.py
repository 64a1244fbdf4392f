"""jaxllm: Kimi Linear, AutoDeco and a DeepResearch-style agent in JAX/Flax.

Top-level names are resolved lazily so that `import jaxllm.ops...` stays light.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "complete": ("jaxllm.decode", "complete"),
    "generate": ("jaxllm.decode", "generate"),
    "load_hf_checkpoint": ("jaxllm.models.hf", "load_hf_checkpoint"),
    "save_hf_checkpoint": ("jaxllm.models.hf", "save_hf_checkpoint"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
