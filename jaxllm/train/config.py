"""Run configuration: one frozen dataclass, loaded from JSON plus ``field=value`` overrides.

Every field is validated when the config is built; a bad field fails with a message
naming the field and what is allowed. ``model_args.<name>=value`` sets one entry of the
model's own config (validated by the model's config class when the model is built).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from typing import Any, Mapping, Sequence

from jaxllm.errors import ConfigError

_CHOICES = {
    "param_dtype": ("float32", "bfloat16"),
    "compute_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots"),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. Steps count optimizer updates."""

    # Model: a registered model_type (``jaxllm.models.registry``) and the arguments of its config.
    model: str = "kimi_linear"
    model_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Fine-tune: a Hugging Face checkpoint folder whose weights start the run (its config.json is the
    # model's; ``model`` must be its model_type; model_args override runtime fields). Resuming from
    # this run's own checkpoints takes precedence.
    init_from: str = ""
    # Data.
    dataset: str = "stdlib"  # 'stdlib' | 'files:<paths>' | 'tfds:<name>'
    data_dir: str = ""  # where TFDS array_record files live; '' = $JAXLLM_DATA_DIR or ~/.cache/jaxllm/tfds
    text_key: str = "text"
    tokenizer: str = "byte"  # 'byte' | 'hf:<tokenizer.json>' | 'spm:<model>'
    seq_len: int = 128
    batch_size: int = 8  # global rows per optimizer step (all hosts, all microbatches)
    grad_accum: int = 1  # microbatches per step
    seed: int = 0
    # Optimizer: AdamW, linear warmup then cosine decay to lr * min_lr_ratio, global-norm clipping.
    steps: int = 100
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # MoE aux-loss-free balancing (DeepSeek-V3): after each step every expert's e_score_correction_bias
    # moves by this rate * sign(mean load - its load); 0 = off (DeepSeek-V3 used 1e-3).
    moe_bias_update_rate: float = 0.0
    # Numerics and memory.
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "float32"  # weights are cast to this inside the step
    remat: str = "none"  # rematerialisation policy passed to the model
    # Cross-entropy over chunks of this many positions (every row), the LM head applied per chunk and
    # recomputed in the backward, so the [batch, seq_len, vocab] logits are never held; 0 = off.
    loss_chunk: int = 0
    # Mesh: -1 = all remaining devices. The product must equal the device count.
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    mesh_expert: int = 1
    mesh_context: int = 1  # context parallelism: the sequence split over this many devices (divides seq_len)
    # Checkpoints: under checkpoint_dir ('' = <workdir>/checkpoints); a multi-host run needs a directory every
    # host sees (a shared mount, or gs://bucket/... with gcsfs installed).
    checkpoint_dir: str = ""
    save_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # Logging.
    log_every: int = 1
    progress: bool = True
    peak_tflops: float = 0.0  # per device; 0 = known accelerator table, or measured matmul peak on CPU
    tensorboard: bool = False  # also write TensorBoard scalars to <workdir>/tensorboard (needs tensorboardX)
    # Validation: every eval_every steps (0 = never; when > 0 also at the last step), the mean token loss over
    # the first eval_batches batches of the held-out split (the same batches every time).
    eval_every: int = 0
    eval_batches: int = 4
    eval_split: str = "validation"
    # Samples printed at the end of training.
    num_samples: int = 3
    sample_prompt: str = "def "
    sample_tokens: int = 64
    sample_temperature: float = 0.8  # 0 = greedy
    sample_top_p: float = 0.95

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_type(f))
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not allowed; allowed values: {', '.join(allowed)}"
                )
        positive = (
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "save_every",
            "keep_checkpoints",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.eval_batches < 1:
            raise ConfigError(f"eval_batches={self.eval_batches} must be a positive integer")
        if not self.eval_split or self.eval_split == "train":
            raise ConfigError(
                f"eval_split={self.eval_split!r} is not allowed; allowed: a held-out split name of the "
                "dataset other than 'train' (e.g. validation, test)"
            )
        if self.loss_chunk < 0 or (self.loss_chunk and self.seq_len % self.loss_chunk):
            raise ConfigError(
                f"loss_chunk={self.loss_chunk} must be 0 (off) or a positive divisor of seq_len={self.seq_len}"
            )
        for name in ("warmup_steps", "num_samples", "sample_tokens", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.sample_temperature < 0 or not 0 < self.sample_top_p <= 1:
            raise ConfigError(
                f"sample_temperature={self.sample_temperature} must be >= 0 and "
                f"sample_top_p={self.sample_top_p} in (0, 1]"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0 <= self.moe_bias_update_rate < float("inf"):
            raise ConfigError(
                f"moe_bias_update_rate={self.moe_bias_update_rate} must be a finite number >= 0 (0 = off)"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"b1={self.b1}, b2={self.b2} must be in [0, 1)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}"
            )
        for name in ("mesh_data", "mesh_fsdp", "mesh_tensor", "mesh_expert", "mesh_context"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ConfigError(
                    f"{name}={v} is not allowed; allowed: a positive integer or -1 (all remaining devices)"
                )
        object.__setattr__(self, "model_args", dict(self.model_args))

    def to_dict(self) -> dict:
        return {
            f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
            for f in dataclasses.fields(self)
        }


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(RunConfig)
    return hints[f.name]


def _check_type(name: str, value: Any, typ) -> None:
    origin = typing.get_origin(typ)
    if origin is not None:  # Mapping[str, Any]
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a JSON object (mapping), got {type(value).__name__}")
        return
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {typ.__name__}")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, FIELD_NAMES, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config field {name!r}{hint}; allowed fields: {', '.join(FIELD_NAMES)}")


def _parse_value(name: str, text: str, typ) -> Any:
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={text!r} is not a boolean; allowed: true, false")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not a number") from None
    return text


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def from_dict(values: Mapping[str, Any]) -> RunConfig:
    for k in values:
        if k not in FIELD_NAMES:
            raise _unknown(k)
    return RunConfig(**values)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a JSON run config (or defaults) and applies ``field=value`` overrides."""
    values: dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path!r} must hold a JSON object")
        for k in values:
            if k not in FIELD_NAMES:
                raise _unknown(k)
    return apply_overrides(from_dict(values), overrides)


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    values = config.to_dict()
    hints = typing.get_type_hints(RunConfig)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like field=value")
        if key.startswith("model_args."):
            values["model_args"] = {**values["model_args"], key[len("model_args.") :]: _json_value(text)}
            continue
        if key not in FIELD_NAMES:
            raise _unknown(key)
        typ = hints[key]
        if typing.get_origin(typ) is not None:
            parsed = _json_value(text)
        else:
            parsed = _parse_value(key, text, typ)
        values[key] = parsed
    return RunConfig(**values)


def save_config(config: RunConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
