"""AutoDeco checkpoints in the official released formats: read and write.

    model, params, heads, heads_params = load_autodeco("AutoDeco-R1-Distill-Qwen-7B")        # merged
    model, params, heads, heads_params = load_autodeco("heads_dir", base="R1-Distill-Qwen-7B")  # head-only
    out = model.apply(params, ids)                        # models.base.ModelOutput
    T, P = heads.apply(heads_params, out.hidden, out.logits)
    save_autodeco("out", model, params, heads_params, merged=True)

Both formats carry the official wrapper's config.json (`AutoDecoModelForCausalLMConfig` in
Zacks917/AutoDeco `model/templlm_auto.py`): every field of the base config, `model_type:
"autodeco"`, `base_model_type`, `base_model_name_or_path`, `enable_temperature_head`,
`enable_top_p_head`, `use_enhanced_features`.

- merged (`script/merge_autodeco.py merge`): `model.safetensors` (or shards + index) with the base
  weights under `llm.` and the heads' `temp_head.mlp.{0,2}.*`, `top_p_head.mlp.{0,2}.*`.
- head-only: config.json + `autodeco_heads.safetensors` (the wrapper's own save) or a
  `model.safetensors` holding only head keys (`merge_autodeco.py split`); the base model is another
  folder: `base=` or the config's `base_model_name_or_path` when that is a local folder. Nothing is
  ever downloaded.

The base loads through `load_hf_checkpoint` (which knows the wrapper's config and the `llm.`
prefix); the heads through `nn.autodeco.heads_from_official`, in float32 whatever `dtype` is.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxllm.errors import CheckpointError
from jaxllm.models import hf, registry
from jaxllm.nn.autodeco import heads_from_official, heads_to_official

HEAD_FLAGS = ("enable_temperature_head", "enable_top_p_head")
ARCHITECTURE_NAME = "AutoDecoModelForCausalLM"


# ------------------------------------------------------------------------------------ reading
def _is_head_key(key: str) -> bool:
    return key.startswith(hf.AUTODECO_HEAD_PREFIXES)


def _weight_files(path: str) -> dict[str, str]:
    """key -> file for every safetensors file the official loader reads heads from (any `*.safetensors`)."""
    keys = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        fn = os.path.join(path, name)
        with safe_open(fn, "numpy") as f:
            for key in f.keys():
                if key in keys:
                    raise CheckpointError(f"{path}: key {key} is in both {keys[key]} and {name}")
                keys[key] = name
    return keys


def _is_merged(keys: dict[str, str]) -> bool:
    # A merged folder holds base weights beside the heads; a head-only one holds nothing else.
    return any(not _is_head_key(k) for k in keys)


def is_merged(path) -> bool:
    """Whether an AutoDeco folder holds its base weights (merged) or only the heads."""
    return _is_merged(_weight_files(os.fspath(path)))


def _read_heads(path: str, keys: dict[str, str]) -> dict[str, np.ndarray]:
    """The head tensors (official keys, torch layout), read one file at a time."""
    out = {}
    for name in sorted({fn for k, fn in keys.items() if _is_head_key(k)}):
        with safe_open(os.path.join(path, name), "numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if _is_head_key(k)})
    if not out:
        raise CheckpointError(
            f"{path}: no AutoDeco head keys (temp_head.*, top_p_head.*) in its safetensors files"
        )
    return out


def check_head_flags(cfg: dict, path) -> None:
    """Both heads must have been trained: the official code keeps a disabled head at its random
    init and vLLM still applies it, so sampling with one would use a random T or P."""
    for flag in HEAD_FLAGS:
        value = cfg.get(flag, True)  # the official config's default is True
        if value is not True:
            raise CheckpointError(
                f"{path}: config.json has {flag}={json.dumps(value)}; that head was not trained, and "
                "jaxllm loads only AutoDeco checkpoints whose two heads are (every released one)"
            )


def resolve_base(path: str, cfg: dict, base=None) -> str:
    """The base model folder of a head-only checkpoint: `base`, else a local `base_model_name_or_path`."""
    if base is not None:
        base = os.fspath(base)
        if not os.path.isdir(base):
            raise CheckpointError(f"base={base!r} is not a folder (a Hugging Face base model checkpoint)")
        return base
    name = cfg.get("base_model_name_or_path")
    if isinstance(name, str) and os.path.isdir(name):
        return name
    raise CheckpointError(
        f"{path} is a head-only AutoDeco checkpoint and its base_model_name_or_path {name!r} is not a "
        "local folder; pass base=DIR (`--base DIR` on the command line) with the base model "
        "(jaxllm never downloads)"
    )


def _check_base_type(path: str, cfg: dict, base_config) -> None:
    # A known base_model_type that disagrees with the base folder means the wrong base was given.
    want = cfg.get("base_model_type")
    if want in registry.model_types() and want != base_config.model_type:
        raise CheckpointError(
            f"{path}: its heads were trained on a {want!r} model (base_model_type) but the base is a "
            f"{base_config.model_type!r} model"
        )


def _heads(path: str, state_dict: dict, cfg: dict, hidden_size: int):
    """(module, variables) from the head tensors; head width and features checked against the base."""
    try:
        module, variables = heads_from_official(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: AutoDeco heads do not fit together: {e}") from None
    width = state_dict["temp_head.mlp.0.weight"].shape[1]
    if width != hidden_size:
        raise CheckpointError(
            f"{path}: the AutoDeco heads take hidden size {width} (temp_head.mlp.0.weight "
            f"{list(state_dict['temp_head.mlp.0.weight'].shape)}) but the base model has "
            f"hidden_size {hidden_size}; they were trained on another base"
        )
    enhanced = cfg.get("use_enhanced_features", True)
    if enhanced != module.use_enhanced_features:
        raise CheckpointError(
            f"{path}: config.json has use_enhanced_features={json.dumps(enhanced)} but "
            f"top_p_head.mlp.0.weight {list(state_dict['top_p_head.mlp.0.weight'].shape)} is built "
            f"{'with' if module.use_enhanced_features else 'without'} the 4 statistics"
        )
    return module, variables


def load_autodeco(path, base=None, dtype=None):
    """`(model, params, heads_module, heads_params)` from a merged or head-only AutoDeco folder.

    base: the base model folder of a head-only checkpoint (default: the config's
    `base_model_name_or_path` when it is a local folder); refused for a merged one, which holds its
    base. dtype: the base model's parameter dtype (default: what config.json declares); the heads
    are float32. Errors (`CheckpointError`) name the file or config field at fault.
    """
    path = os.fspath(path)
    cfg = registry.read_hf_config(path)
    if not hf.is_autodeco_config(cfg):
        raise CheckpointError(
            f"{path}: config.json has model_type {cfg.get('model_type')!r}, not 'autodeco'; it is no "
            "AutoDeco checkpoint (load a plain model with jaxllm.load_hf_checkpoint)"
        )
    check_head_flags(cfg, path)
    keys = _weight_files(path)
    if _is_merged(keys):
        if base is not None:
            raise CheckpointError(
                f"{path} is a merged AutoDeco checkpoint (it holds its base); drop base= (--base)"
            )
        model, params = hf.load_hf_checkpoint(path, dtype)
    else:
        base_dir = resolve_base(path, cfg, base)
        model, params = hf.load_hf_checkpoint(base_dir, dtype)
        _check_base_type(path, cfg, model.config)
    module, variables = _heads(path, _read_heads(path, keys), cfg, model.config.hidden_size)
    return model, params, module, variables


# ------------------------------------------------------------------------------------ writing
def base_hf_config(model, params) -> dict:
    """The base config.json `save_hf_checkpoint` writes for `model` (default layout, stored dtype)."""
    config = model.config
    layouts = getattr(config, "HF_LAYOUTS", ())
    cfg = config.to_hf_config(layouts[0]) if layouts else config.to_hf_config()
    inner = nn.meta.unbox(params)
    inner = inner.get("params", inner)
    cfg["dtype"] = jnp.dtype(inner["embed_tokens"].dtype).name
    return cfg


def autodeco_hf_config(base_cfg: dict, heads_state: dict, base_model_name_or_path=None) -> dict:
    """The wrapper's config.json as the official code writes it: base fields + the AutoDeco fields."""
    hidden = int(heads_state["temp_head.mlp.0.weight"].shape[1])
    enhanced = int(heads_state["top_p_head.mlp.0.weight"].shape[1]) == hidden + 5
    return {
        **base_cfg,
        "architectures": [ARCHITECTURE_NAME],
        "model_type": hf.AUTODECO,
        "base_model_type": base_cfg["model_type"],
        "base_model_name_or_path": base_model_name_or_path,
        "enable_temperature_head": True,
        "enable_top_p_head": True,
        "use_enhanced_features": enhanced,
        "temperature_hidden_size": hidden,
        "top_p_hidden_size": hidden,
    }


def _prefix_base_keys(path: str, heads_state: dict) -> None:
    """Rename the base keys `save_hf_checkpoint` wrote to `llm.*` and add the heads, one shard at a
    time (host memory stays near one shard); the heads join the last shard, as the index says."""
    index_file = os.path.join(path, hf.SAFE_INDEX)
    if os.path.exists(index_file):
        with open(index_file) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
    else:
        index, shards = None, [hf.SAFE_SINGLE]
    for j, name in enumerate(shards):
        fn = os.path.join(path, name)
        tensors = {hf.AUTODECO_BASE_PREFIX + k: v for k, v in load_file(fn).items()}
        if j == len(shards) - 1:
            tensors.update(heads_state)
        save_file(tensors, fn, metadata={"format": "pt"})
    if index is not None:
        weight_map = {hf.AUTODECO_BASE_PREFIX + k: v for k, v in index["weight_map"].items()}
        weight_map.update({k: shards[-1] for k in heads_state})
        index["weight_map"] = weight_map
        with open(index_file, "w") as f:
            json.dump(index, f, indent=2)


def save_autodeco(
    path,
    model,
    params,
    heads_params,
    *,
    merged: bool,
    base_model_name_or_path: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write an AutoDeco checkpoint in the official layout.

    merged=True: config.json + the base under `llm.` and the heads in `model.safetensors` (or
    shards of at most max_shard_bytes + index), like `merge_autodeco.py merge`. merged=False:
    config.json + `autodeco_heads.safetensors` only (load it with `base=`, or record the base folder
    in base_model_name_or_path). Heads keep their dtype (float32), the base its stored one.
    """
    path = os.fspath(path)
    heads_state = {k: np.ascontiguousarray(v) for k, v in heads_to_official(heads_params).items()}
    hidden = model.config.hidden_size
    if heads_state["temp_head.mlp.0.weight"].shape[1] != hidden:
        raise CheckpointError(
            f"save_autodeco: heads take hidden size {heads_state['temp_head.mlp.0.weight'].shape[1]}, "
            f"the model has hidden_size {hidden}"
        )
    cfg = autodeco_hf_config(base_hf_config(model, params), heads_state, base_model_name_or_path)
    os.makedirs(path, exist_ok=True)
    if merged:
        hf.save_hf_checkpoint(path, model, params, max_shard_bytes=max_shard_bytes)
        _prefix_base_keys(path, heads_state)
    else:
        save_file(heads_state, os.path.join(path, hf.AUTODECO_HEADS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
