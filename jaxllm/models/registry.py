"""The one registration point for architectures, keyed by Hugging Face `model_type`.

    config = registry.config_from_file("path/to/checkpoint")     # reads config.json's model_type
    model = registry.build(config, remat="none")                  # a LanguageModel (models/base.py)

Each family module defines one `ARCHITECTURE = Architecture(...)`; `FAMILIES` below says which
module holds which `model_type` (imported on first use, so `import jaxllm.models` stays light).
`register(...)` adds an architecture from outside the package. Decode, training, the agent and
`load_hf_checkpoint` ask this module; nothing above `jaxllm.models` names an architecture.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

from jaxllm.errors import ConfigError

# model_type -> module defining ARCHITECTURE (or ARCHITECTURES, a dict by model_type)
FAMILIES = {
    "kimi_linear": "jaxllm.models.kimi_linear",
    "qwen3": "jaxllm.models.qwen",
    "qwen3_moe": "jaxllm.models.qwen",
    "qwen2": "jaxllm.models.qwen",
    "llama": "jaxllm.models.qwen",
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the rest of jaxllm needs to know about one `model_type`.

    config_cls: frozen dataclass with `from_hf_config(dict, **overrides)`, `to_hf_config(...)`,
      `replace(**kw)`, a `model_type` attribute and the fields `vocab_size`, `hidden_size`,
      `num_hidden_layers`, `compute_dtype`/`weight_dtype` (jnp dtypes).
    model_cls: Linen module `model_cls(config, remat=...)` implementing `models.base.LanguageModel`.
    hf_key_specs: config -> list of `models.hf_keys.KeySpec`, every hub key of a checkpoint.
    keep_float32: parameter leaf names that stay float32 whatever the load dtype (gates, biases
      of routers).
    run_defaults: optional `model_args -> model_args` filling family defaults for `jaxllm train`
      (e.g. Kimi Linear's 3:1 layer pattern from `num_hidden_layers`).
    """

    model_type: str
    config_cls: type
    model_cls: type
    hf_key_specs: Callable[[Any], list]
    keep_float32: tuple[str, ...] = ()
    run_defaults: Callable[[dict], dict] | None = None


_REGISTERED: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    _REGISTERED[arch.model_type] = arch


def model_types() -> list[str]:
    return sorted(set(FAMILIES) | set(_REGISTERED))


def get(model_type: str) -> Architecture:
    """The architecture registered for `model_type`; a ConfigError names the known ones."""
    if model_type not in _REGISTERED and model_type in FAMILIES:
        module = importlib.import_module(FAMILIES[model_type])
        archs = getattr(module, "ARCHITECTURES", None) or {
            module.ARCHITECTURE.model_type: module.ARCHITECTURE
        }
        for arch in archs.values():
            _REGISTERED.setdefault(arch.model_type, arch)
    if model_type not in _REGISTERED:
        raise ConfigError(
            f"model_type {model_type!r} is not a known architecture; known: {', '.join(model_types())}"
        )
    return _REGISTERED[model_type]


def of(config) -> Architecture:
    """The architecture of a config object (by its `model_type`)."""
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(f"{type(config).__name__} has no model_type; cannot find its architecture")
    return get(model_type)


def read_hf_config(path) -> dict:
    """config.json of a checkpoint folder (or the file itself) as a dict."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"{path}: no config.json")
    with open(file) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def config_from_hf(cfg: dict, **overrides):
    """Our config from a Hugging Face config dict, dispatched on its `model_type`."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"config has no 'model_type'; known: {', '.join(model_types())}")
    return get(model_type).config_cls.from_hf_config(cfg, **overrides)


def config_from_file(path, **overrides):
    return config_from_hf(read_hf_config(path), **overrides)


def build(config, remat: str = "none"):
    """The Linen module for `config`."""
    return of(config).model_cls(config, remat=remat)


def config_from_run_args(
    model_type: str, model_args: dict, *, vocab_size: int, compute_dtype: str, param_dtype: str
):
    """The config for `jaxllm train`'s `model` and `model_args`.

    `model_args` holds config fields, or `config_file` (a Hugging Face config.json or checkpoint
    folder) plus field overrides. A missing `vocab_size` is the tokenizer's; missing dtypes are the
    run's `compute_dtype` / `param_dtype`.
    """
    arch = get(model_type)
    fields = {f.name for f in dataclasses.fields(arch.config_cls) if f.init}
    args = dict(model_args)
    for key, value in (("dtype", compute_dtype), ("param_dtype", param_dtype)):
        if key in fields:
            args.setdefault(key, value)
    config_file = args.pop("config_file", None)
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ConfigError(
            f"model_args has unknown field(s) {unknown} for model {model_type!r}; allowed: "
            f"config_file, {', '.join(sorted(fields))}"
        )
    try:
        if config_file:
            hf = read_hf_config(config_file)
            if hf.get("model_type", model_type) != model_type:
                raise ConfigError(
                    f"config_file {config_file} is a {hf.get('model_type')!r} model, not {model_type!r}"
                )
            return arch.config_cls.from_hf_config(hf, **args)
        if "vocab_size" in fields:
            args.setdefault("vocab_size", vocab_size)
        if arch.run_defaults is not None:
            args = arch.run_defaults(args)
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
        return arch.config_cls(**args)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"model_args for {model_type!r}: {e}") from None
