"""Shared pieces of every KDA implementation: argument checks, q/k L2 norm, varlen layout.

Shapes: q,k,g `[B,T,H,K]`, v `[B,T,H,V]`, beta `[B,T,H]`, state `[N,H,K,V]` (float32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

L2NORM_EPS = 1e-6  # added to the *sum* of squares, as fla and the checkpoints do


def l2_normalize(x):
    """`x / sqrt(sum(x^2) + 1e-6)` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def validate_inputs(q, k, v, g, beta, initial_state, cu_seqlens, segment_ids):
    """Raise ValueError naming the argument for any shape/dtype mismatch. Returns N (sequences)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"kda: {name} must be a floating array, got dtype {x.dtype}")
    if q.ndim != 4:
        raise ValueError(f"kda: q must be [B,T,H,K], got shape {q.shape}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"kda: k must have q's shape {q.shape}, got {k.shape}")
    if g.shape != q.shape:
        raise ValueError(f"kda: g must have q's shape {q.shape} (per key channel), got {g.shape}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"kda: v must be [B,T,H,V] = [{B},{T},{H},V], got {v.shape}")
    if beta.shape != (B, T, H):
        raise ValueError(f"kda: beta must be [B,T,H] = {(B, T, H)}, got {beta.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"kda: q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if cu_seqlens is not None and segment_ids is not None:
        raise ValueError("kda: give cu_seqlens or segment_ids, not both")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"kda: with cu_seqlens the batch size must be 1 (packed), got B={B}")
        if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"kda: cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {cu_seqlens.shape}"
            )
        if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
            raise ValueError(f"kda: cu_seqlens must be integer, got {cu_seqlens.dtype}")
        n_seq = cu_seqlens.shape[0] - 1
        if _is_concrete(cu_seqlens):
            cu = np.asarray(cu_seqlens)
            if cu[0] != 0:
                raise ValueError(f"kda: cu_seqlens must start at 0, got {cu[0]}")
            if np.any(np.diff(cu) < 0):
                raise ValueError(f"kda: cu_seqlens must be non-decreasing, got {cu.tolist()}")
            if cu[-1] != T:
                raise ValueError(f"kda: cu_seqlens must end at T={T}, got {cu[-1]}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"kda: segment_ids must be [B,T] = {(B, T)}, got {segment_ids.shape}")
    V = v.shape[-1]
    if initial_state is not None:
        if initial_state.shape != (n_seq, H, K, V):
            what = "number of sequences len(cu_seqlens)-1" if cu_seqlens is not None else "batch size"
            raise ValueError(
                f"kda: initial_state must be [N,H,K,V] = {(n_seq, H, K, V)} (N = {what}), "
                f"got {initial_state.shape}"
            )
    return n_seq


def default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


class VarlenLayout(NamedTuple):
    """Where each packed token goes in a chunk-aligned stream (every sequence starts a new chunk)."""

    dest: jax.Array  # [T] int32: position of token t in the padded stream
    chunk_seq: jax.Array  # [NC] int32: sequence each chunk belongs to
    chunk_start: jax.Array  # [NC] bool: chunk is the first of its sequence (state := h0[seq])
    chunk_end: jax.Array  # [NC] bool: chunk is the last of its sequence (ht[seq] := state)
    num_chunks: int  # static NC


def varlen_layout(cu_seqlens, total_len: int, chunk: int) -> VarlenLayout:
    """Chunk-aligned layout for packed sequences; works on traced cu_seqlens (static shapes)."""
    cu = cu_seqlens.astype(jnp.int32)
    n_seq = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    n_chunks = (lens + chunk - 1) // chunk
    chunk_end_excl = jnp.cumsum(n_chunks)
    chunk_begin = chunk_end_excl - n_chunks
    num_chunks = max(1, (total_len + n_seq * (chunk - 1)) // chunk)
    t = jnp.arange(total_len, dtype=jnp.int32)
    seq_of_t = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, n_seq - 1)
    dest = chunk_begin[seq_of_t] * chunk + t - cu[seq_of_t]
    c = jnp.arange(num_chunks, dtype=jnp.int32)
    seq_of_c = jnp.clip(jnp.searchsorted(chunk_end_excl, c, side="right"), 0, n_seq - 1)
    used = c < chunk_end_excl[-1]
    start = used & (c == chunk_begin[seq_of_c])
    end = used & (c == chunk_end_excl[seq_of_c] - 1)
    return VarlenLayout(dest, seq_of_c.astype(jnp.int32), start, end, num_chunks)


def segment_resets(segment_ids):
    """[B,T] bool: token t starts a new segment (state resets to zero before it); never at t=0.

    Segment ids mean change points: a new document starts wherever the id differs from the
    previous token's, so an id may come back later in the row as another document
    (`[0,0,1,1,0,0]` is three documents)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def document_index(segment_ids):
    """[B,T] int32: the row's document of each token, 0, 1, 2, ... (count of change points up to
    and including it). Two tokens of a row are in the same document iff their indices are equal,
    which raw ids do not tell when an id is reused; idempotent."""
    return jnp.cumsum(segment_resets(segment_ids).astype(jnp.int32), axis=1)
