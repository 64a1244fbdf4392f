"""Models for training: `jaxllm train`'s `model` is a registered `model_type` (see
`jaxllm.models.registry`: kimi_linear, qwen3, qwen3_moe, qwen2, llama, or one added with
`registry.register`), `model_args` its config fields.
"""

from __future__ import annotations

from jaxllm.models import registry


def build_model(
    name: str, model_args: dict, *, vocab_size: int, compute_dtype: str, param_dtype: str, remat: str
):
    config = registry.config_from_run_args(
        name, model_args, vocab_size=vocab_size, compute_dtype=compute_dtype, param_dtype=param_dtype
    )
    return registry.build(config, remat=remat)
