"""Dense softmax attention: the ground truth every blockwise path is tested against.

Materialises the `[B,H,T,S]` scores (float32), so it is for tests and small shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import common as c
from pallas_kernels.kda.common import document_index


def attention_reference(
    q, k, v, *, scale=None, causal=True, segment_ids=None, q_offset=None, kv_length=None, kv_rows=None
):
    """softmax(q k^T * scale, visible) v; see `pallas_kernels.attention.attention`. o in v's dtype."""
    pb = c.problem(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        segment_ids=segment_ids,
        q_offset=q_offset,
        kv_length=kv_length,
        kv_rows=kv_rows,
    )
    v = v[pb.kv_rows_B]  # each query row's keys and values (small shapes only)
    pb = pb._replace(k_parts=tuple(kp[pb.kv_rows_B] for kp in pb.k_parts))
    B, T, H, _ = q.shape
    if v.ndim == 3:  # one kv head
        pb = pb._replace(k_parts=tuple(kp[:, :, None] for kp in pb.k_parts))
        v = v[:, :, None]
    S, G = v.shape[1], v.shape[2]
    k_BSGK = jnp.concatenate([kp.astype(c.F32) for kp in pb.k_parts], axis=-1)
    q_BTGRK = q.astype(c.F32).reshape(B, T, G, H // G, -1)
    s = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, precision="highest") * pb.scale
    # the mask written out here, not through common.visible, so a bug there shows against it
    q_pos_BT1 = (pb.q_offset_B[:, None] + jnp.arange(T)[None])[:, :, None]
    k_pos_11S = jnp.arange(S)[None, None, :]
    mask_BTS = k_pos_11S < pb.kv_length_B[:, None, None]
    if pb.causal:
        mask_BTS &= k_pos_11S <= q_pos_BT1
    if segment_ids is not None:  # keys' documents; query t's is that of key q_offset + t
        doc_BS = document_index(segment_ids)
        q_doc_BT = jnp.take_along_axis(doc_BS, jnp.clip(q_pos_BT1[..., 0], 0, S - 1), axis=1)
        mask_BTS &= q_doc_BT[:, :, None] == doc_BS[:, None, :]
    mask = mask_BTS[:, None, None]
    s = jnp.where(mask, s, c.NEG)
    p = jnp.where(mask, jnp.exp(s - jnp.max(s, -1, keepdims=True)), 0.0)
    denom = jnp.sum(p, -1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # rows with no visible key give 0
    o = jnp.einsum("bgrts,bsgv->btgrv", p, v.astype(c.F32), precision="highest")
    return o.reshape(B, T, H, -1).astype(v.dtype)


attention_reference = jax.jit(attention_reference, static_argnames=("scale", "causal"))
