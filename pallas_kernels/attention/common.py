"""Shared pieces of every attention implementation: argument checks, the visibility rule, the
online-softmax block step.

Shapes: q `[B,T,H,K]`, k `[B,S,G,K]` (or a tuple of key parts `[B,S,G,K_i]` whose features
concatenate to K), v `[B,S,G,V]`, H a multiple of G (query head h reads kv head h // (H // G)).
Keys and values may also come as `[B,S,K]` / `[B,S,V]`: one kv head (MQA) without a unit axis (a
reshape to `[B,S,1,K]` made XLA:CPU copy a whole decode cache into another layout).
Query t of row b sits at position `q_offset[b] + t`; key s at position s. Key s is visible to it
iff s < kv_length[b], s <= its position (causal), and both are in the same document: segment ids
`[B,S]` are the keys' (change points, compared through `document_index`) and query t's is that of
key position q_offset[b] + t (self-attention when S == T and no offset; a span of the sequence
against all of it under context parallelism). With `kv_rows` [B], query row b reads key
row kv_rows[b] of a `[B_kv,S,...]` buffer (a group of rows of a decode cache, read in place).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.kda.common import document_index

F32 = jnp.float32
NEG = float(jnp.finfo(jnp.float32).min)  # masked score: finite, so a fully masked row stays NaN-free


class Problem(NamedTuple):
    """Checked arguments, normalised: key parts as a tuple, per-row int32 offsets and lengths."""

    q: jax.Array  # [B,T,H,K]
    k_parts: tuple  # ([B,S,G,K_i], ...)
    v: jax.Array  # [B,S,G,V]
    q_offset_B: jax.Array  # int32 [B]
    kv_length_B: jax.Array  # int32 [B]
    kv_rows_B: jax.Array  # int32 [B]: the key/value row each query row reads
    q_doc_BT: jax.Array | None  # document index of each query (that of key q_offset + t) or None
    k_doc_BS: jax.Array | None  # document index of each key or None
    scale: float
    causal: bool


def key_parts(k) -> tuple:
    return tuple(k) if isinstance(k, (tuple, list)) else (k,)


def problem(q, k, v, *, scale, causal, segment_ids, q_offset, kv_length, kv_rows=None) -> Problem:
    """Raise ValueError naming the argument for any shape/dtype mismatch; return the Problem."""
    parts = key_parts(k)
    if q.ndim != 4:
        raise ValueError(f"attention: q must be [B,T,H,K], got shape {q.shape}")
    B, T, H, K = q.shape
    if v.ndim not in (3, 4) or (kv_rows is None and v.shape[0] != B):
        raise ValueError(
            f"attention: v must be [B,S,G,V] (or [B,S,V]: one kv head) with B={B}, got {v.shape}"
        )
    S, G = v.shape[1], (v.shape[2] if v.ndim == 4 else 1)
    for i, kp in enumerate(parts):
        if kp.ndim != v.ndim or kp.shape[:-1] != v.shape[:-1]:
            want = list(v.shape[:-1]) + ["K_i"]
            raise ValueError(f"attention: key part {i} must be {want} (v's leading dims), got {kp.shape}")
    if sum(kp.shape[-1] for kp in parts) != K:
        dims = [kp.shape[-1] for kp in parts]
        raise ValueError(f"attention: key feature dims {dims} must add up to q's head dim {K}")
    if G == 0 or H % G:
        raise ValueError(f"attention: q heads {H} must be a multiple of kv heads {G}")
    for name, x in (("q", q), ("v", v), *((f"k[{i}]", kp) for i, kp in enumerate(parts))):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"attention: {name} must be a floating array, got dtype {x.dtype}")
    offset = _per_row("q_offset", q_offset, B, 0)
    q_doc = k_doc = None
    if segment_ids is not None:
        if segment_ids.shape != (B, S):
            raise ValueError(
                f"attention: segment_ids must be [B,S] = {(B, S)} (the keys' ids; query t has that of "
                f"key q_offset + t), got {segment_ids.shape}"
            )
        if q_offset is None and S != T:
            raise ValueError(
                f"attention: segment_ids with T={T} queries != S={S} keys need q_offset (the queries' "
                "first position among the keys)"
            )
        k_doc = document_index(segment_ids)
        q_pos = jnp.clip(offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None], 0, S - 1)
        q_doc = jnp.take_along_axis(k_doc, q_pos, axis=1)
    if kv_rows is None:
        rows = jnp.arange(B, dtype=jnp.int32)
    else:
        if segment_ids is not None:
            raise ValueError("attention: segment_ids (self-attention) cannot be combined with kv_rows")
        rows = jnp.asarray(kv_rows)
        if rows.shape != (B,) or not jnp.issubdtype(rows.dtype, jnp.integer):
            raise ValueError(
                f"attention: kv_rows must be integer [B] = [{B}], got {rows.dtype}{list(rows.shape)}"
            )
        rows = rows.astype(jnp.int32)
    length = _per_row("kv_length", kv_length, B, S)
    scale = 1.0 / math.sqrt(K) if scale is None else float(scale)
    return Problem(q, parts, v, offset, length, rows, q_doc, k_doc, scale, bool(causal))


def _per_row(name, x, B, default):
    if x is None:
        return jnp.full((B,), default, jnp.int32)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"attention: {name} must be integer, got {x.dtype}")
    if x.ndim > 1 or (x.ndim == 1 and x.shape[0] not in (1, B)):
        raise ValueError(f"attention: {name} must be a scalar or [B] = [{B}], got shape {x.shape}")
    return jnp.broadcast_to(x.astype(jnp.int32).reshape(-1), (B,))


def visible(q_pos, k_pos, kv_len, q_doc, k_doc, *, causal):
    """Boolean mask (broadcasting): key at k_pos visible to the query at q_pos."""
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos)
    if q_doc is not None:
        mask = mask & (q_doc == k_doc)
    return mask


def keys_needed(q_offset, q_end, kv_len, *, causal):
    """Exclusive bound on the keys any of the queries q_offset+[0, q_end) can see (per row)."""
    return jnp.minimum(kv_len, q_offset + q_end) if causal else kv_len


def online_step(s, mask, m, l, acc, pv):
    """One key block of the online softmax (float32 statistics).

    s: scores [..., r, c]; mask broadcastable to s; m, l: [..., r, 1]; acc: [..., r, V];
    pv(p) -> [..., r, V] the weighted values of this block. Masked keys get weight exactly 0.
    """
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)  # rescale what earlier blocks summed against the old max
    return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv(p)


def finish(m, l, acc):
    """Output and log-sum-exp of the accumulated blocks; rows that saw no key give 0 (lse NEG: no
    weight when spans of keys are combined by their lse)."""
    seen = l > 0
    o = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
    return o, lse


def document_indices(q_doc, k_doc, B, T, S):
    """Check the (q_doc [B,T], k_doc [B,S]) document indices of a span of keys (both or neither;
    equal index = same document) and return them as int32."""
    if (q_doc is None) != (k_doc is None):
        raise ValueError("attention: q_doc and k_doc go together (both None: one document)")
    if q_doc is None:
        return None, None
    if q_doc.shape != (B, T) or k_doc.shape != (B, S):
        raise ValueError(
            f"attention: q_doc must be [B,T] = {(B, T)} and k_doc [B,S] = {(B, S)}, "
            f"got {q_doc.shape} and {k_doc.shape}"
        )
    return q_doc.astype(jnp.int32), k_doc.astype(jnp.int32)
