"""The one model contract every architecture implements and every caller uses.

    model = jaxllm.models.build(config)                       # a Flax Linen module
    out = model.apply(params, input_ids_BT)                   # -> ModelOutput
    out.logits, out.hidden, out.cache, out.aux_losses   # [B,T,V] f32, [B,T,D], cache, {name: loss}

    cache = model.init_cache(batch, capacity)                 # every row empty: cache.pos == 0
    out = model.apply(params, prompt_BT, cache=cache)         # prefill; out.cache.pos == T per row
    out = model.apply(params, token_B1, cache=out.cache)      # one more token per row

`__call__(input_ids_BT, *, positions=None, segment_ids=None, cache=None) -> ModelOutput`:
- `input_ids_BT` int32 [B,T].
- `segment_ids` [B,T] packs several documents per row; ids mark change points (a document starts
  wherever the id differs from the previous token's), so a reused id never joins an earlier one.
- `positions` [B,T] int32: each token's position for rotary embeddings. Default: without a cache,
  the position inside its document (0 at every document start); with a cache, `cache.pos[:, None]
  + arange(T)`. Models without positional encoding (Kimi Linear's NoPE MLA) accept and ignore it.
- `cache`: from `init_cache(batch, capacity, dtype)`, a pytree whose `pos` is int32 [B], the tokens
  already cached per row. The T new tokens of row b go to slots `pos[b] .. pos[b]+T-1` and attend
  to the row's cached tokens and causally to each other; the returned cache has `pos + T`.
  `segment_ids` and a cache do not combine.
- `lengths` int32 [B] (with a cache only): row b's real tokens are the first `lengths[b]` of its T
  (ragged prompts padded to one T, rows that are finished: 0). The others change nothing a later
  step reads: recurrent states and conv states stay, the returned `pos` is `pos + lengths`, so
  their attention-cache slots are free and overwritten by the next append. Their logits are junk.
  Slots pos[b] .. pos[b]+T-1 must fit in the capacity all the same. Default: all T.

Auxiliary losses (MoE balance, router z-loss) come back in `aux_losses` as float32 scalars already
scaled by their coefficients; the training step adds their sum to the objective.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn._params import param, project
from pallas_kernels.kda.common import document_index


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B,T,V] float32
    hidden: jax.Array  # [B,T,D] the final-norm hidden state the LM head reads (AutoDeco heads read it too)
    cache: Any = None  # the cache after these tokens, when one was given
    aux_losses: dict = dataclasses.field(default_factory=dict)  # name -> float32 scalar, scaled

    def aux_loss(self) -> jax.Array:
        """The sum of the auxiliary losses (0 when there are none)."""
        return sum(self.aux_losses.values(), jnp.zeros((), jnp.float32))


@runtime_checkable
class LanguageModel(Protocol):
    """What decode, training, AutoDeco and the agent rely on. A Linen module with a `config`."""

    config: Any

    def init_cache(self, batch: int, capacity: int, dtype=None) -> Any: ...

    def __call__(
        self, input_ids_BT, *, positions=None, segment_ids=None, cache=None, lengths=None
    ) -> ModelOutput: ...


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids"):
    """Raise ValueError naming the bad ids when they are concrete and outside [0, vocab_size)."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {type(input_ids).__name__} of dtype {dtype}")
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise ValueError(
            f"{name}: token ids must be in [0, {vocab_size}); got {ids[bad][:5].tolist()} at positions {where}"
        )


def check_inputs(input_ids_BT, vocab_size: int, *, positions=None, segment_ids=None, cache=None):
    """The checks every model runs at entry: ids, shapes of positions/segment ids, cache rows."""
    check_token_ids(input_ids_BT, vocab_size)
    if input_ids_BT.ndim != 2:
        raise ValueError(f"input_ids must be [B,T], got shape {input_ids_BT.shape}")
    for name, x in (("segment_ids", segment_ids), ("positions", positions)):
        if x is not None and x.shape != input_ids_BT.shape:
            raise ValueError(f"{name} must have input_ids' shape {input_ids_BT.shape}, got {x.shape}")
    if cache is not None:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a decode cache")
        pos = jnp.shape(cache.pos)
        if pos != (input_ids_BT.shape[0],):
            raise ValueError(
                f"cache.pos must be [B] = [{input_ids_BT.shape[0]}] (one length per row), got {pos}"
            )


def append_lengths(lengths_B, input_ids_BT, cache):
    """The real tokens per row of an append (`lengths` of the contract) as int32 [B], checked."""
    B, T = input_ids_BT.shape
    if lengths_B is None:
        return None
    if cache is None:
        raise ValueError("lengths (real tokens per row) applies to a cached append; give a cache")
    lengths_B = jnp.asarray(lengths_B)
    if lengths_B.shape != (B,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an integer array of shape [B] = [{B}], got {lengths_B.dtype}{lengths_B.shape}"
        )
    if not isinstance(lengths_B, jax.core.Tracer):
        bad = (np.asarray(lengths_B) < 0) | (np.asarray(lengths_B) > T)
        if bad.any():
            raise ValueError(f"lengths must be in [0, T={T}], got {np.asarray(lengths_B).tolist()}")
    return lengths_B.astype(jnp.int32)


def advanced_pos(cache, lengths_B, T: int):
    """`cache.pos` after an append of T tokens of which `lengths` (None: all) are real."""
    return cache.pos + (T if lengths_B is None else lengths_B)


def positions_in_document(segment_ids_BT):
    """0-based position of each token inside its document ([B,T] int32)."""
    doc = document_index(segment_ids_BT)
    T = doc.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), doc.shape)
    starts = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def default_positions(input_ids_BT, *, segment_ids=None, cache=None):
    """The positions the contract promises when the caller gives none (see the module docstring)."""
    B, T = input_ids_BT.shape
    if cache is not None:
        return cache.pos.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    if segment_ids is not None:
        return positions_in_document(segment_ids)
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))


def cache_bytes(cache) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)))


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts from `jax.eval_shape` of init (nothing allocated).

    total; active = used for one token (a routed MoE layer, any module named `moe` holding stacked
    experts `w1`/`w2`/`w3` [E, ...], contributes only `config.num_experts_per_token` of its E
    experts); active_without_embeddings = active minus the embedding and an untied LM head.
    """
    config = model.config
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    tree = nn.meta.unbox(shapes)["params"]
    size = lambda x: math.prod(x.shape)
    total = sum(size(x) for x in jax.tree_util.tree_leaves(tree))
    inactive = 0

    def visit(node):
        nonlocal inactive
        for name, sub in node.items():
            if not isinstance(sub, dict):
                continue
            if name == "moe" and all(k in sub for k in ("w1", "w2", "w3")):
                n_experts = sub["w1"].shape[0]
                per_expert = sum(math.prod(sub[k].shape[1:]) for k in ("w1", "w2", "w3"))
                inactive += (n_experts - config.num_experts_per_token) * per_expert
            else:
                visit(sub)

    visit(tree)
    embed = size(tree["embed_tokens"]) + (0 if "lm_head" not in tree else size(tree["lm_head"]))
    active = total - inactive
    return {"total": total, "active": active, "active_without_embeddings": active - embed}


# ------------------------------------------------------------------ pieces every decoder shares
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


def remat_layer(layer_cls, remat: str):
    """The decoder layer class under a rematerialisation policy: "none", "full" (the backward keeps
    only each layer's inputs) or "dots" (also its matmul outputs)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    return layer_cls if remat == "none" else nn.remat(layer_cls, policy=REMAT_POLICIES[remat])


def embed_tokens(module: nn.Module, config, input_ids_BT):
    """(the `embed_tokens` table [V,D], the ids embedded in the compute dtype [B,T,D])."""
    embed_VD = param(
        module,
        "embed_tokens",
        (config.vocab_size, config.hidden_size),
        ("vocab", "embed"),
        dtype=config.weight_dtype,
        init=nn.initializers.normal(0.02),
    )
    return embed_VD, jnp.take(embed_VD, input_ids_BT, axis=0).astype(config.compute_dtype)


def lm_head_logits(module: nn.Module, config, hidden_BTD, embed_VD):
    """float32 logits: `hidden @ embed^T` with tied embeddings, else a separate `lm_head` [D,V]."""
    if config.tie_word_embeddings:
        return project(hidden_BTD, embed_VD.T, out_dtype=jnp.float32)
    head_DV = param(
        module,
        "lm_head",
        (config.hidden_size, config.vocab_size),
        ("embed", "vocab"),
        dtype=config.weight_dtype,
        init=nn.initializers.normal(0.02),
    )
    return project(hidden_BTD, head_DV, out_dtype=jnp.float32)


def lm_head_kernel(params) -> jax.Array:
    """The [D,V] matrix `lm_head_logits` multiplies the final hidden state by, read from a model's
    variables (``{"params": ...}``, boxed or not): `lm_head` when the model has one, else the tied
    `embed_tokens` transposed. For losses that apply the head themselves (in token chunks)."""
    tree = nn.meta.unbox(params["params"])
    return tree["lm_head"] if "lm_head" in tree else tree["embed_tokens"].T
