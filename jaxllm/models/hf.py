"""Hugging Face interop for every registered architecture: read and write hub checkpoints.

    model, params = jaxllm.load_hf_checkpoint("path/to/dir")                 # params as stored
    out = model.apply(params, input_ids)                                      # models.base.ModelOutput
    jaxllm.save_hf_checkpoint("out/dir", model, params)

The folder's `config.json` names the `model_type`; the registry (`models/registry.py`) gives its
config class, model and hub-key table (`models/hf_keys.py`). The loader streams: it opens one
safetensors shard at a time, converts one tensor at a time and places it straight onto its
sharding (`jax.make_array_from_callback`). On several hosts each process reads from the files only
the part of each parameter its devices hold (`host_box`; the transforms read boxes, see
`models/hf_keys.py`), and experts held elsewhere are not read at all. Stacked MoE experts wait in
one host buffer per parameter until its last local expert is read. Host memory stays near the
largest tensor plus those expert buffers, not the whole model. Missing, unexpected or mis-shaped keys raise a `CheckpointError` naming every one.

An AutoDeco checkpoint (config.json `model_type: "autodeco"`, the official wrapper's config: every
base field plus `base_model_type`) loads as its base model: the config with `model_type =
base_model_type`, the base weights under the `llm.` prefix when the files hold them (merged
checkpoints), the heads' `temp_head.*` / `top_p_head.*` keys set aside (`models/autodeco_hf.py`
reads them).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.errors import CheckpointError
from jaxllm.models import registry

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
FALLBACK_LOAD_DTYPE = "bfloat16"  # when config.json names no dtype: what released checkpoints hold
AUTODECO = "autodeco"  # model_type of the official AutoDeco wrapper's config.json
AUTODECO_HEAD_PREFIXES = ("temp_head.", "top_p_head.")
AUTODECO_BASE_PREFIX = "llm."  # the wrapper holds the base model as `self.llm`
AUTODECO_HEADS_FILE = "autodeco_heads.safetensors"  # head-only checkpoints


# ------------------------------------------------------------------------------------ helpers
def _abstract_params(model):
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    return nn.meta.unbox(shapes)["params"]


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _shape_dtype_of(abstract, spec):
    leaf = _get(abstract, spec.path)
    shape = tuple(leaf.shape)
    return (shape[1:] if spec.expert is not None else shape), shape


def _list(keys, n=20):
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _checkpoint_files(path: str) -> dict[str, str]:
    """hub key -> file holding it."""
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        for fn in sorted(set(files.values())):
            if not os.path.exists(fn):
                raise CheckpointError(f"{index} names shard {os.path.basename(fn)}, which does not exist")
        return files
    if os.path.exists(single):
        with safe_open(single, "numpy") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"{path}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found")


def is_autodeco_config(hf_config: dict) -> bool:
    return hf_config.get("model_type") == AUTODECO


def autodeco_base_config(hf_config: dict, path) -> dict:
    """The base model's config dict inside an AutoDeco wrapper's: `model_type = base_model_type`.

    The wrapper copies every base field, so only model_type differs. Official configs re-saved
    before its fix_base_model_type_bug commit hold `base_model_type: "autodeco"`; that, like a
    missing field, is an error naming the field (the base architecture cannot be guessed).
    """
    base_type = hf_config.get("base_model_type")
    if not isinstance(base_type, str) or base_type in ("", AUTODECO):
        raise CheckpointError(
            f"{path}: config.json is an AutoDeco wrapper (model_type 'autodeco') but its base_model_type "
            f"is {base_type!r}; set base_model_type to the base model's model_type (known: "
            f"{', '.join(registry.model_types())}). Official configs re-saved before the "
            "fix_base_model_type_bug commit hold 'autodeco' there"
        )
    return {**hf_config, "model_type": base_type}


def _head_only_error(path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a head-only AutoDeco checkpoint (no base weights); load it with "
        "jaxllm.models.autodeco_hf.load_autodeco(path, base=BASE_DIR)"
    )


def _autodeco_base_keys(path, files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(hub key -> file, hub key -> key stored in the file) of the base inside an AutoDeco folder.

    Head keys are set aside; `llm.` is stripped where present (merged checkpoints).
    """
    files_out, stored = {}, {}
    for key, fn in files.items():
        if key.startswith(AUTODECO_HEAD_PREFIXES):
            continue
        name = key[len(AUTODECO_BASE_PREFIX) :] if key.startswith(AUTODECO_BASE_PREFIX) else key
        if name in stored:
            raise CheckpointError(f"checkpoint {path} holds both {stored[name]} and {key}")
        files_out[name], stored[name] = fn, key
    if not files_out:
        raise _head_only_error(path)
    return files_out, stored


# ------------------------------------------------------------------------------------ loader
def _resolve_keys(path, specs, files):
    """hub key found in the files -> its spec; raise naming every missing and unexpected key."""
    resolved, missing = {}, []
    for s in specs:
        key = next((k for k in (s.hf_key,) + s.aliases if k in files), None)
        if key is None:
            missing.append(s.hf_key)
        else:
            resolved[key] = s
    unexpected = sorted(set(files) - set(resolved))
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match its config:"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        raise CheckpointError("\n  ".join(msg))
    return resolved


def host_box(sharding, shape) -> tuple[tuple[int, int], ...]:
    """The part of a parameter this process's devices hold: the bounding box of their slices."""
    full = tuple((0, n) for n in shape)
    if sharding is None:
        return full
    indices = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
    box = []
    for d, n in enumerate(shape):
        spans = [idx[d].indices(n)[:2] for idx in indices]
        box.append((min(a for a, _ in spans), max(b for _, b in spans)))
    return tuple(box)


def _place(block, box, full_shape, sharding):
    """One parameter onto its sharding from the host `block` that holds `box` of it."""
    if sharding is None:
        return jax.device_put(block)

    def local(index):
        return block[_within_box(index, box, full_shape)]

    return jax.make_array_from_callback(tuple(full_shape), sharding, local)


def _within_box(index, box, full_shape):
    """A device's index (slices of the whole parameter) as indices into the block holding `box`."""
    out = []
    for sl, (start, _), n in zip(index, box, full_shape):
        a, b, _ = sl.indices(n)
        out.append(slice(a - start, b - start))
    return tuple(out)


def stored_dtype(hf_config: dict):
    """The parameter dtype a checkpoint's config.json declares (`dtype`, older `torch_dtype`)."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or FALLBACK_LOAD_DTYPE
    if name not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"config.json dtype {name!r} is not one of float32, bfloat16, float16")
    return jnp.dtype(name)


def load_hf_checkpoint(path, dtype=None, *, compute_dtype=None, param_shardings=None, **config_overrides):
    """Load a Hugging Face checkpoint folder of any registered `model_type`: `(model, {"params": ...})`.

    dtype: parameter dtype; default: the one config.json declares (bfloat16 for released checkpoints,
    bfloat16 when none is named). The architecture's `keep_float32` leaves (gates, router biases)
    stay float32. compute_dtype: activation dtype (default: dtype).
    config_overrides: runtime config fields (e.g. kda_impl, mla_impl, moe_dispatch).
    param_shardings: optional pytree like the params of `jax.sharding.Sharding`s; each parameter is
    placed on its sharding as soon as it is read.
    """
    path = os.fspath(path)
    hf_config = registry.read_hf_config(path)
    autodeco = is_autodeco_config(hf_config)
    if autodeco:
        hf_config = autodeco_base_config(hf_config, path)
    if autodeco and not any(os.path.exists(os.path.join(path, f)) for f in (SAFE_SINGLE, SAFE_INDEX)):
        raise _head_only_error(path)
    dtype = stored_dtype(hf_config) if dtype is None else jnp.dtype(dtype)
    overrides = {
        "param_dtype": dtype.name,
        "dtype": jnp.dtype(compute_dtype if compute_dtype is not None else dtype).name,
        **config_overrides,
    }
    config = registry.config_from_hf(hf_config, **overrides)
    arch = registry.of(config)
    model = registry.build(config)
    abstract = _abstract_params(model)
    files = _checkpoint_files(path)
    stored = {k: k for k in files}  # key as the files spell it (an AutoDeco base: under `llm.`)
    if autodeco:
        files, stored = _autodeco_base_keys(path, files)
    resolved = _resolve_keys(path, arch.hf_key_specs(config), files)

    def sharding_of(param_path):
        return None if param_shardings is None else _get(param_shardings, param_path)

    boxes = {}  # param path -> the box of it this process's devices hold
    for s in resolved.values():
        if s.path not in boxes:
            boxes[s.path] = host_box(sharding_of(s.path), _shape_dtype_of(abstract, s)[1])

    def is_local(s):  # an expert no local device holds is never read
        return s.expert is None or boxes[s.path][0][0] <= s.expert < boxes[s.path][0][1]

    by_file = defaultdict(list)
    for key in resolved:
        by_file[files[key]].append(key)
    experts_left = defaultdict(int)  # stacked param -> local experts not read yet
    for s in resolved.values():
        if s.expert is not None and is_local(s):
            experts_left[s.path] += 1
    params, buffers, misshaped = {}, {}, []

    def finish(param_path, block):
        full_shape = tuple(_get(abstract, param_path).shape)
        _set(params, param_path, _place(block, boxes[param_path], full_shape, sharding_of(param_path)))

    for fn in sorted(by_file):
        with safe_open(fn, "numpy") as f:
            for key in sorted(by_file[fn]):
                s = resolved[key]
                shape, full_shape = _shape_dtype_of(abstract, s)
                want = s.transform.hf_shape(shape)
                tensor = f.get_slice(stored[key])
                got = tuple(tensor.get_shape())
                if got != want:
                    misshaped.append(f"{stored[key]}: got {list(got)}, expected {list(want)}")
                    continue
                if not is_local(s):
                    continue
                target = np.float32 if s.path[-1] in arch.keep_float32 else dtype
                box = boxes[s.path]
                w = np.asarray(s.transform.read_box(tensor.__getitem__, shape, box[-len(shape) :]), target)
                if s.expert is None:
                    finish(s.path, w)
                    continue
                if s.path not in buffers:
                    buffers[s.path] = np.zeros([b - a for a, b in box], target)
                buffers[s.path][s.expert - box[0][0]] = w
                experts_left[s.path] -= 1
                if experts_left[s.path] == 0:
                    finish(s.path, buffers.pop(s.path))
    if misshaped:
        raise CheckpointError(
            f"checkpoint {path}: mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped)
        )
    return model, {"params": params}


# ------------------------------------------------------------------------------------ writer
def _plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """Hub keys grouped into shards of at most max_shard_bytes, in table order (a layer stays together)."""
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        return [list(sizes)]
    shards, cur, cur_bytes = [], [], 0
    for key, size in sizes.items():
        if cur and cur_bytes + size > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
        cur_bytes += size
    return shards + [cur]


def save_hf_checkpoint(
    path, model, params, *, layout: str | None = None, max_shard_bytes: int | None = None, dtype=None
):
    """Write `config.json` + safetensors in the hub key layout of the model's architecture.

    layout: a family's alternative layouts (Kimi Linear: "released", the default, or
    "transformers"). max_shard_bytes: split into `model-0000k-of-0000n.safetensors` +
    `model.safetensors.index.json` when the total is larger; tensors are gathered one shard at a
    time. dtype: cast floating tensors on the way out (default: as stored; `keep_float32` leaves stay).
    """
    config = model.config
    arch = registry.of(config)
    layouts = getattr(config, "HF_LAYOUTS", ())  # a family with several hub layouts lists them
    if layout is None:
        layout = layouts[0] if layouts else None
    elif layout not in layouts:
        raise ValueError(
            f"save_hf_checkpoint: layout must be one of {list(layouts)} for {config.model_type}, got {layout!r}"
        )
    params = nn.meta.unbox(params)
    if "params" in params:
        params = params["params"]
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    abstract = _abstract_params(model)
    out_dtype = None if dtype is None else jnp.dtype(dtype)

    specs = {}
    for s in arch.hf_key_specs(config):
        try:
            leaf = _get(params, s.path)
        except KeyError:
            raise CheckpointError(f"params have no entry {'/'.join(s.path)} (for {s.hf_key})") from None
        shape, full_shape = _shape_dtype_of(abstract, s)
        if tuple(leaf.shape) != full_shape:
            raise CheckpointError(
                f"param {'/'.join(s.path)} has shape {tuple(leaf.shape)}, expected {full_shape}"
            )
        key = s.aliases[0] if (layout == "transformers" and s.aliases) else s.hf_key
        specs[key] = (s, shape)
    keep32 = lambda s: s.path[-1] in arch.keep_float32

    def tensor(key):
        s, shape = specs[key]
        p = np.asarray(_get(params, s.path)[s.expert] if s.expert is not None else _get(params, s.path))
        w = np.ascontiguousarray(s.transform.to_hf(p, shape))
        return w if out_dtype is None or keep32(s) else w.astype(out_dtype)

    def nbytes(key):
        s, shape = specs[key]
        leaf = _get(params, s.path)
        itemsize = jnp.dtype(leaf.dtype if out_dtype is None or keep32(s) else out_dtype).itemsize
        return int(np.prod(shape)) * itemsize

    cfg = config.to_hf_config(layout) if layout is not None else config.to_hf_config()
    cfg["dtype"] = (out_dtype or jnp.dtype(_get(params, ("embed_tokens",)).dtype)).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    sizes = {key: nbytes(key) for key in specs}
    shards = _plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        save_file(
            {k: tensor(k) for k in shards[0]}, os.path.join(path, SAFE_SINGLE), metadata={"format": "pt"}
        )
        return
    weight_map = {}
    for j, keys in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensor(k) for k in keys}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    with open(os.path.join(path, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
