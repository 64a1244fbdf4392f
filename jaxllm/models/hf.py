"""Hugging Face interop for Kimi Linear: read and write `KimiLinearForCausalLM` checkpoints.

    model, params = jaxllm.load_hf_checkpoint("path/to/dir", dtype=jnp.bfloat16)
    logits = model.apply(params, input_ids)
    jaxllm.save_hf_checkpoint("out/dir", model, params)            # released layout

One declarative table (`TABLE`) maps every hub key to a parameter path and a transform; the loader
expands it for the config's layer kinds, reads single-file or sharded (`model.safetensors.index.json`)
safetensors shard by shard, and raises a `CheckpointError` naming every missing, unexpected or
mis-shaped key. Dense FFN layers are `mlp.*` in released checkpoints and `block_sparse_moe.*` in
checkpoints re-saved by transformers: both are accepted, the writer picks by `layout`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import CheckpointError
from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.kimi_linear import KimiLinear

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
KEEP_FLOAT32 = ("A_log", "dt_bias", "e_score_correction_bias")  # gates/router bias stay float32


# ------------------------------------------------------------------------------------ transforms
@dataclasses.dataclass(frozen=True)
class Identity:
    def hf_shape(self, shape):
        return tuple(shape)

    def to_ours(self, w, shape):
        return w.reshape(shape)

    def to_hf(self, p, shape):
        return p


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight [out, in] <-> our kernel [*in_dims(n_in), *out_dims]."""

    n_in: int = 1

    def hf_shape(self, shape):
        return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))

    def to_ours(self, w, shape):
        return w.T.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(math.prod(shape[: self.n_in]), -1).T


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch depthwise Conv1d weight [C, 1, W] <-> our [W, *channel_dims]."""

    def hf_shape(self, shape):
        return (math.prod(shape[1:]), 1, shape[0])

    def to_ours(self, w, shape):
        return w[:, 0, :].T.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(shape[0], -1).T[:, None, :]


@dataclasses.dataclass(frozen=True)
class Reshape:
    """Same values, different shape: `hf(shape)` gives the hub shape from ours."""

    hf: Callable

    def hf_shape(self, shape):
        return tuple(self.hf(shape))

    def to_ours(self, w, shape):
        return w.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(self.hf_shape(shape))


# ------------------------------------------------------------------------------------ the table
# (kind, hub key template, param path template, transform[, aliases]); {i} layer, {e} expert.
L = "model.layers.{i}."
P = "layers_{i}/"
TABLE = [
    ("global", "model.embed_tokens.weight", "embed_tokens", Identity()),
    ("global", "model.norm.weight", "norm/weight", Identity()),
    ("lm_head", "lm_head.weight", "lm_head", Linear()),
    ("layer", L + "input_layernorm.weight", P + "input_layernorm/weight", Identity()),
    ("layer", L + "post_attention_layernorm.weight", P + "post_attention_layernorm/weight", Identity()),
    # KDA
    *[("kda", L + f"self_attn.{n}_proj.weight", P + f"self_attn/{n}_proj", Linear()) for n in "qkv"],
    *[("kda", L + f"self_attn.{n}_conv1d.weight", P + f"self_attn/{n}_conv", Conv()) for n in "qkv"],
    ("kda", L + "self_attn.A_log", P + "self_attn/A_log", Reshape(lambda s: (1, 1, s[0], 1))),
    ("kda", L + "self_attn.dt_bias", P + "self_attn/dt_bias", Reshape(lambda s: (math.prod(s),))),
    *[
        ("kda", L + f"self_attn.{n}.weight", P + f"self_attn/{n}", Linear())
        for n in ("f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj")
    ],
    ("kda", L + "self_attn.o_norm.weight", P + "self_attn/o_norm", Identity()),
    ("kda", L + "self_attn.o_proj.weight", P + "self_attn/o_proj", Linear(2)),
    # MLA
    ("mla_q", L + "self_attn.q_proj.weight", P + "self_attn/q_proj", Linear()),
    ("mla_qlora", L + "self_attn.q_a_proj.weight", P + "self_attn/q_a_proj", Linear()),
    ("mla_qlora", L + "self_attn.q_a_layernorm.weight", P + "self_attn/q_a_layernorm", Identity()),
    ("mla_qlora", L + "self_attn.q_b_proj.weight", P + "self_attn/q_b_proj", Linear()),
    ("mla", L + "self_attn.kv_a_proj_with_mqa.weight", P + "self_attn/kv_a_proj_with_mqa", Linear()),
    ("mla", L + "self_attn.kv_a_layernorm.weight", P + "self_attn/kv_a_layernorm", Identity()),
    ("mla", L + "self_attn.kv_b_proj.weight", P + "self_attn/kv_b_proj", Linear()),
    ("mla", L + "self_attn.o_proj.weight", P + "self_attn/o_proj", Linear(2)),
    # dense FFN: released `mlp.*`, transformers re-save `block_sparse_moe.*`
    *[
        ("dense", L + f"mlp.{n}.weight", P + f"mlp/{n}", Linear(), (L + f"block_sparse_moe.{n}.weight",))
        for n in ("gate_proj", "up_proj", "down_proj")
    ],
    # MoE
    ("moe", L + "block_sparse_moe.gate.weight", P + "moe/router", Linear()),
    (
        "moe",
        L + "block_sparse_moe.gate.e_score_correction_bias",
        P + "moe/e_score_correction_bias",
        Identity(),
    ),
    *[
        ("expert", L + f"block_sparse_moe.experts.{{e}}.{n}.weight", P + f"moe/{n}", Linear())
        for n in ("w1", "w2", "w3")
    ],
    *[
        ("shared", L + f"block_sparse_moe.shared_experts.{n}.weight", P + f"moe/shared_{n}", Linear())
        for n in ("gate_proj", "up_proj", "down_proj")
    ],
]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    hf_key: str
    path: tuple[str, ...]
    transform: object
    expert: int | None = None
    aliases: tuple[str, ...] = ()


def key_specs(config: KimiLinearConfig) -> list[KeySpec]:
    """The table expanded for one config: every hub key the checkpoint must hold."""
    specs = []

    def add(entry, **fmt):
        kind, hf, path, tr = entry[:4]
        aliases = tuple(a.format(**fmt) for a in (entry[4] if len(entry) > 4 else ()))
        specs.append(
            KeySpec(hf.format(**fmt), tuple(path.format(**fmt).split("/")), tr, fmt.get("e"), aliases)
        )

    for entry in TABLE:
        kind = entry[0]
        if kind == "global" or (kind == "lm_head" and not config.tie_word_embeddings):
            add(entry)
    for i in range(config.num_hidden_layers):
        attn, ffn = config.layer_types[i], config.mlp_layer_types[i]
        kinds = {"layer", attn, ffn}
        if attn == "mla":
            kinds.add("mla_qlora" if config.q_lora_rank else "mla_q")
        if ffn == "moe":
            kinds.add("expert")
            if config.num_shared_experts:
                kinds.add("shared")
        for entry in TABLE:
            if entry[0] not in kinds:
                continue
            if entry[0] == "expert":
                for e in range(config.num_experts):
                    add(entry, i=i, e=e)
            else:
                add(entry, i=i)
    return specs


# ------------------------------------------------------------------------------------ helpers
def _abstract_params(model: KimiLinear):
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
    from safetensors import safe_open

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


# ------------------------------------------------------------------------------------ loader
def load_hf_checkpoint(
    path, dtype=jnp.float32, *, compute_dtype=None, param_shardings=None, **config_overrides
):
    """Load a KimiLinearForCausalLM checkpoint directory. Returns `(model, {"params": ...})`.

    dtype: parameter dtype (A_log, dt_bias and the router bias stay float32).
    compute_dtype: activation dtype (default: dtype); gates, norms, softmax and the KDA state are
    float32 regardless. config_overrides: runtime config fields (kda_impl, mla_impl, moe_dispatch).
    param_shardings: optional pytree (like the params) of `jax.sharding.Sharding` to place each
    parameter on as it is built.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    dtype = jnp.dtype(dtype)
    overrides = {
        "param_dtype": dtype.name,
        "dtype": jnp.dtype(compute_dtype if compute_dtype is not None else dtype).name,
    }
    overrides.update(config_overrides)
    config = KimiLinearConfig.from_file(path, **overrides)
    model = KimiLinear(config)
    abstract = _abstract_params(model)
    specs = key_specs(config)
    files = _checkpoint_files(path)

    resolved = {}  # hub key found -> spec
    missing = []
    for s in specs:
        key = next((k for k in (s.hf_key,) + s.aliases if k in files), None)
        if key is None:
            missing.append(s.hf_key)
        else:
            resolved[key] = s
    unexpected = sorted(set(files) - set(resolved))
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match the config:"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        raise CheckpointError("\n  ".join(msg))

    by_file = defaultdict(list)
    for key in resolved:
        by_file[files[key]].append(key)
    buffers, out, misshaped = {}, {}, []
    for fn in sorted(by_file):
        with safe_open(fn, "numpy") as f:
            for key in sorted(by_file[fn]):
                s = resolved[key]
                shape, full_shape = _shape_dtype_of(abstract, s)
                want = s.transform.hf_shape(shape)
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    misshaped.append(f"{key}: got {list(got)}, expected {list(want)}")
                    continue
                w = s.transform.to_ours(f.get_tensor(key), shape)
                keep32 = s.path[-1] in KEEP_FLOAT32
                w = np.asarray(w, np.float32 if keep32 else dtype)
                if s.expert is None:
                    out[s.path] = w
                else:
                    buf = buffers.get(s.path)
                    if buf is None:
                        buf = buffers[s.path] = np.zeros(full_shape, w.dtype)
                    buf[s.expert] = w
    if misshaped:
        raise CheckpointError(
            f"checkpoint {path}: mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped)
        )
    out.update(buffers)
    params = {}
    for p, w in out.items():
        sharding = None if param_shardings is None else _get(param_shardings, p)
        _set(params, p, jax.device_put(w, sharding) if sharding is not None else jnp.asarray(w))
    return model, {"params": params}


# ------------------------------------------------------------------------------------ writer
def save_hf_checkpoint(
    path,
    model: KimiLinear,
    params,
    *,
    layout: str = "released",
    max_shard_bytes: int | None = None,
    dtype=None,
):
    """Write `config.json` + safetensors in the hub key layout.

    layout: "released" (dense FFN under `mlp.`, `linear_attn_config`) or "transformers"
    (`block_sparse_moe.` dense keys, `layer_types`). max_shard_bytes: split into
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` when the total is larger.
    dtype: cast floating tensors on the way out (default: as stored).
    """
    from safetensors.numpy import save_file

    if layout not in ("released", "transformers"):
        raise ValueError(f"save_hf_checkpoint: layout must be 'released' or 'transformers', got {layout!r}")
    config = model.config
    params = nn.meta.unbox(params)
    if "params" in params:
        params = params["params"]
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    abstract = _abstract_params(model)
    tensors = {}
    for s in key_specs(config):
        key = s.aliases[0] if (layout == "transformers" and s.aliases) else s.hf_key
        try:
            p = np.asarray(_get(params, s.path))
        except KeyError:
            raise CheckpointError(f"params have no entry {'/'.join(s.path)} (for {key})") from None
        shape, full_shape = _shape_dtype_of(abstract, s)
        if p.shape != full_shape:
            raise CheckpointError(f"param {'/'.join(s.path)} has shape {p.shape}, expected {full_shape}")
        if s.expert is not None:
            p = p[s.expert]
        w = np.ascontiguousarray(s.transform.to_hf(p, shape))
        if dtype is not None and s.path[-1] not in KEEP_FLOAT32:
            w = w.astype(jnp.dtype(dtype))
        tensors[key] = w
    cfg = config.to_hf_config(layout)
    cfg["dtype"] = (
        str(np.asarray(_get(params, ("embed_tokens",))).dtype) if dtype is None else jnp.dtype(dtype).name
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    total = sum(w.nbytes for w in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(path, SAFE_SINGLE), metadata={"format": "pt"})
        return
    shards, cur, cur_bytes = [], {}, 0
    for k in tensors:  # table order keeps a layer's keys together
        if cur and cur_bytes + tensors[k].nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = tensors[k]
        cur_bytes += tensors[k].nbytes
    shards.append(cur)
    weight_map = {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(path, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
