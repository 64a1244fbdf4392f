"""Model registry for training: name -> factory building a Flax Linen LM.

A trainable model is any Linen module whose ``apply(variables, input_ids_BT,
segment_ids=segment_ids_BT)`` returns ``logits_BTV`` (or ``(logits_BTV, aux_loss)``)
and whose params carry logical axis names (``nn.with_logical_partitioning``).
Register more with ``register_model(name, factory)``; a factory takes
``(model_args: dict, *, vocab_size, compute_dtype, param_dtype, remat)``.
"""

from __future__ import annotations

from typing import Any, Callable

from jaxllm.train.config import ConfigError

MODELS: dict[str, Callable[..., Any]] = {}


def register_model(name: str, factory: Callable[..., Any]) -> None:
    MODELS[name] = factory


def build_model(
    name: str, model_args: dict, *, vocab_size: int, compute_dtype: str, param_dtype: str, remat: str
):
    if name not in MODELS:
        raise ConfigError(f"model={name!r} is not a known model; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](
        dict(model_args),
        vocab_size=vocab_size,
        compute_dtype=compute_dtype,
        param_dtype=param_dtype,
        remat=remat,
    )


def default_layer_types(num_layers: int, mla_every: int = 4) -> tuple[str, ...]:
    """Kimi Linear's 3:1 hybrid: every ``mla_every``-th layer is MLA, the rest KDA."""
    return tuple("mla" if (i + 1) % mla_every == 0 else "kda" for i in range(num_layers))


def kimi_config(model_args: dict, *, vocab_size: int, compute_dtype: str, param_dtype: str):
    """A ``KimiLinearConfig`` from run-config ``model_args``.

    ``model_args`` holds ``KimiLinearConfig`` fields, or ``config_file`` (a Hugging Face
    config.json, either layout) plus field overrides. Missing ``vocab_size`` = the
    tokenizer's; missing ``layer_types`` = 3 KDA : 1 MLA; missing ``mlp_layer_types`` =
    first layer dense, the rest MoE when ``num_experts`` > 0.
    """
    import dataclasses

    from jaxllm.models.config import ConfigError as ModelConfigError
    from jaxllm.models.config import KimiLinearConfig

    args = dict(model_args)
    args.setdefault("dtype", compute_dtype)
    args.setdefault("param_dtype", param_dtype)
    config_file = args.pop("config_file", None)
    known = {f.name for f in dataclasses.fields(KimiLinearConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(
            f"model_args has unknown field(s) {unknown} for model 'kimi_linear'; allowed: "
            f"config_file, {', '.join(sorted(known))}"
        )
    try:
        if config_file:
            return KimiLinearConfig.from_file(config_file, **args)
        args.setdefault("vocab_size", vocab_size)
        n = args.get("num_hidden_layers")
        if isinstance(n, int) and n > 0:
            args.setdefault("layer_types", default_layer_types(n))
            moe = args.get("num_experts", 0) > 0
            args.setdefault("mlp_layer_types", tuple("moe" if moe and i > 0 else "dense" for i in range(n)))
        for key in ("layer_types", "mlp_layer_types"):
            if key in args and isinstance(args[key], list):
                args[key] = tuple(args[key])
        return KimiLinearConfig(**args)
    except (ModelConfigError, TypeError) as e:
        raise ConfigError(f"model_args for 'kimi_linear': {e}") from None


def _kimi_linear(model_args: dict, *, vocab_size: int, compute_dtype: str, param_dtype: str, remat: str):
    from jaxllm.models.kimi_linear import KimiLinear

    return KimiLinear(
        kimi_config(model_args, vocab_size=vocab_size, compute_dtype=compute_dtype, param_dtype=param_dtype),
        remat=remat,
    )


register_model("kimi_linear", _kimi_linear)
