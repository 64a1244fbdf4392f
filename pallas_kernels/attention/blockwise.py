"""Blockwise (flash-style) attention in pure JAX, forward and backward in O(T) memory.

Forward: one loop step per (row, query block); an inner loop runs over the key blocks that row's
queries can see (causal / `kv_length` bound: key blocks past it are never read) and keeps the
online-softmax statistics (running max m, sum l, float32) and the weighted-value accumulator.
It stores the output and the row log-sum-exp `lse` only.

Backward (`jax.custom_vjp`): one loop step per (row, key block); an inner loop over the query
blocks that can see it recomputes `p = exp(s - lse)` and accumulates dk, dv for the key block and
dq (a float32 buffer of q's size) for the query block. Nothing of size T x S is ever live: the
largest temporary is one `[G, block_q, R, block_k]` score block.

Key blocks are read in place: a ragged last block starts at S - block_k (never past the buffer)
and masks the keys an earlier block already covered, so a large key buffer (a decode cache) is
never padded or copied. Queries are padded to a multiple of block_q (they are the small side).

`blockwise_attention_lse` also returns each query's log-sum-exp, differentiable (d lse / d s = p,
so its cotangent folds into the backward's rowsum term): attention over several spans of keys then
combines exactly, each span's output weighted by softmax over the spans' lse.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.attention import common as c

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


class _Cfg(NamedTuple):  # static (hashable) settings of one call
    scale: float
    causal: bool
    bq: int
    bk: int
    T: int  # queries before padding


def _cdiv(a, b):
    return -(-a // b)


def blockwise_attention(
    q,
    k,
    v,
    *,
    scale=None,
    causal=True,
    segment_ids=None,
    q_offset=None,
    kv_length=None,
    kv_rows=None,
    block_q=DEFAULT_BLOCK_Q,
    block_k=DEFAULT_BLOCK_K,
):
    """Blockwise attention; arguments as `pallas_kernels.attention.attention`. o [B,T,H,V] in v's dtype."""
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
    return _attend(pb, pb.q_doc_BT, pb.k_doc_BS, block_q, block_k)[0]


def blockwise_attention_lse(
    q,
    k,
    v,
    *,
    q_doc=None,
    k_doc=None,
    scale=None,
    causal=True,
    q_offset=None,
    block_q=DEFAULT_BLOCK_Q,
    block_k=DEFAULT_BLOCK_K,
):
    """(o [B,T,H,V] in v's dtype, lse [B,T,H] float32): `blockwise_attention` of q over one span of
    keys, and the log-sum-exp of each query's visible scores (`common.NEG` where it sees none),
    both differentiable. Documents are given as indices, not ids: `q_doc` [B,T] and `k_doc` [B,S]
    (equal index = same document, e.g. slices of `document_index` of the whole sequence's ids),
    since a span of keys does not hold the queries' own ids. Spans j of one sequence combine as
    `sum_j softmax_j(lse_j) * o_j` (context parallelism: one span's K/V at a time)."""
    pb = c.problem(q, k, v, scale=scale, causal=causal, segment_ids=None, q_offset=q_offset, kv_length=None)
    q_doc, k_doc = c.document_indices(q_doc, k_doc, q.shape[0], q.shape[1], v.shape[1])
    return _attend(pb, q_doc, k_doc, block_q, block_k)


def _attend(pb: c.Problem, q_doc, k_doc, block_q, block_k):
    """(o [B,T,H,V] in v's dtype, lse [B,T,H] float32) of a checked problem: queries padded to whole
    blocks (document -1: they see nothing), then `_flash`."""
    q, v = pb.q, pb.v
    B, T, H, K = q.shape
    S, G = v.shape[1], (v.shape[2] if v.ndim == 4 else 1)
    if T == 0 or S == 0:
        return jnp.zeros((B, T, H, v.shape[-1]), v.dtype), jnp.full((B, T, H), c.NEG, c.F32)
    bq, bk = max(1, min(int(block_q), T)), max(1, min(int(block_k), S))
    Tp = _cdiv(T, bq) * bq
    q5 = jnp.pad(q.reshape(B, T, G, H // G, K), ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
    if q_doc is not None:
        q_doc = jnp.pad(q_doc, ((0, 0), (0, Tp - T)), constant_values=-1)
    cfg = _Cfg(pb.scale, pb.causal, bq, bk, T)
    o5, lse = _flash(cfg, q5, pb.k_parts, v, pb.q_offset_B, pb.kv_length_B, pb.kv_rows_B, q_doc, k_doc)
    return o5[:, :T].reshape(B, T, H, -1), lse[:, :T].reshape(B, T, H)


def _key_block(k_parts, v, b, j, bk):
    """Key block j of row b read in place: (start, k [bk,G,K], v [bk,G,V])."""
    S = v.shape[1]
    s0 = jnp.minimum(j * bk, S - bk)

    def take(x):  # [bk,G,*] (a one-head [B,S,*] buffer gets its head axis per block, not as a whole)
        # one slice of the whole buffer (no row-sized operand left outside the key loop). XLA:CPU
        # of jax 0.10 still converts a bf16 buffer sliced in a loop to f32 once, outside it (a
        # float32 copy of a bf16 cache); jax 0.12's does not (docs/kernels.md)
        blk = jax.lax.dynamic_slice(x, (b, s0) + (0,) * (x.ndim - 2), (1, bk) + x.shape[2:])[0]
        return blk if x.ndim == 4 else blk[:, None]

    k_blk = jnp.concatenate([take(kp) for kp in k_parts], axis=-1) if len(k_parts) > 1 else take(k_parts[0])
    return s0, k_blk, take(v)


def _mask(cfg, b, i, j, s0, off, kv_len, q_doc, k_doc):
    """[bq, bk] visibility of key block j (read from s0) to query block i of row b."""
    t = i * cfg.bq + jnp.arange(cfg.bq)
    k_pos = s0 + jnp.arange(cfg.bk)
    qd = kd = None
    if q_doc is not None:
        qd = jax.lax.dynamic_slice_in_dim(q_doc[b], i * cfg.bq, cfg.bq)[:, None]
        kd = jax.lax.dynamic_slice_in_dim(k_doc[b], s0, cfg.bk)[None, :]
    mask = c.visible((off[b] + t)[:, None], k_pos[None, :], kv_len[b], qd, kd, causal=cfg.causal)
    return mask & (t < cfg.T)[:, None] & (k_pos >= j * cfg.bk)[None, :]  # padded rows; keys seen before


def _scores(cfg, q_blk, k_blk):
    """[G, bq, R, bk] float32 scores of q_blk [bq,G,R,K] against k_blk [bk,G,K]."""
    s = jnp.einsum("qgrk,sgk->gqrs", q_blk, k_blk.astype(q_blk.dtype), preferred_element_type=c.F32)
    return s * cfg.scale


def _forward(cfg, q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc):
    B, Tp, G, R, _ = q5.shape
    S, V = v.shape[1], v.shape[-1]
    nq, nk = Tp // cfg.bq, _cdiv(S, cfg.bk)

    def query_block(n, carry):
        o, lse = carry
        b, i = n // nq, n % nq
        q_blk = jax.lax.dynamic_slice_in_dim(q5[b], i * cfg.bq, cfg.bq, axis=0)
        hi = c.keys_needed(off[b], jnp.minimum((i + 1) * cfg.bq, cfg.T), kv_len[b], causal=cfg.causal)
        n_blocks = jnp.clip(_cdiv(hi, cfg.bk), 0, nk)

        def key_block(j, st):
            s0, k_blk, v_blk = _key_block(k_parts, v, kv_rows[b], j, cfg.bk)
            mask = _mask(cfg, b, i, j, s0, off, kv_len, q_doc, k_doc)[None, :, None, :]
            pv = lambda p: jnp.einsum(
                "gqrs,sgv->gqrv", p.astype(v.dtype), v_blk, preferred_element_type=c.F32
            )
            return c.online_step(_scores(cfg, q_blk, k_blk), mask, *st, pv)

        init = (jnp.full((G, cfg.bq, R, 1), c.NEG, c.F32), jnp.zeros((G, cfg.bq, R, 1), c.F32))
        m, l, acc = jax.lax.fori_loop(0, n_blocks, key_block, (*init, jnp.zeros((G, cfg.bq, R, V), c.F32)))
        o_blk, lse_blk = c.finish(m, l, acc)
        o = jax.lax.dynamic_update_slice(
            o, jnp.swapaxes(o_blk, 0, 1)[None].astype(o.dtype), (b, i * cfg.bq, 0, 0, 0)
        )
        lse = jax.lax.dynamic_update_slice(
            lse, jnp.swapaxes(lse_blk[..., 0], 0, 1)[None], (b, i * cfg.bq, 0, 0)
        )
        return o, lse

    o0 = jnp.zeros((B, Tp, G, R, V), v.dtype)
    return jax.lax.fori_loop(0, B * nq, query_block, (o0, jnp.zeros((B, Tp, G, R), c.F32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc):
    """(o5, lse), both differentiable."""
    return _forward(cfg, q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc)


def _flash_fwd(cfg, q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc):
    o5, lse = _forward(cfg, q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc)
    return (o5, lse), (q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc, o5, lse)


def _add_at(buf, upd, b, start):
    """buf[b, start:start+len(upd)] += upd (upd float32, without the batch axis)."""
    idx = (b, start) + (0,) * (buf.ndim - 2)
    cur = jax.lax.dynamic_slice(buf, idx, (1,) + upd.shape)
    return jax.lax.dynamic_update_slice(buf, cur + upd[None], idx)


def _flash_bwd(cfg, res, cts):
    q5, k_parts, v, off, kv_len, kv_rows, q_doc, k_doc, o5, lse = res
    do5, dlse = cts
    B, Tp, G, R, K = q5.shape
    Bk, S, V = v.shape[0], v.shape[1], v.shape[-1]
    nq, nk = Tp // cfg.bq, _cdiv(S, cfg.bk)
    # ds = p * (dp - rowsum(dO * O)) from o, plus p * dlse from lse (d lse / d s = p): one term
    delta = jnp.sum(do5.astype(c.F32) * o5.astype(c.F32), axis=-1) - dlse  # [B,Tp,G,R]

    def key_block(n, carry):
        dq, dk, dv = carry
        b, j = n // nk, n % nk
        s0, k_blk, v_blk = _key_block(k_parts, v, kv_rows[b], j, cfg.bk)
        live = j * cfg.bk < c.keys_needed(off[b], cfg.T, kv_len[b], causal=cfg.causal)
        first = (
            jnp.clip((j * cfg.bk - off[b]) // cfg.bq, 0, nq) if cfg.causal else 0
        )  # earlier blocks can't see it
        last = jnp.where(live, nq, first)

        def query_block(i, st):
            dq, dk_j, dv_j = st
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x[b], i * cfg.bq, cfg.bq, axis=0)
            q_blk, do_blk = sl(q5), sl(do5)
            lse_blk = jnp.swapaxes(sl(lse), 0, 1)[..., None]  # [G,bq,R,1]
            delta_blk = jnp.swapaxes(sl(delta), 0, 1)[..., None]
            mask = _mask(cfg, b, i, j, s0, off, kv_len, q_doc, k_doc)[None, :, None, :]
            p = jnp.where(mask, jnp.exp(_scores(cfg, q_blk, k_blk) - lse_blk), 0.0)
            dv_j += jnp.einsum("gqrs,qgrv->sgv", p.astype(do_blk.dtype), do_blk, preferred_element_type=c.F32)
            dp = jnp.einsum(
                "qgrv,sgv->gqrs", do_blk, v_blk.astype(do_blk.dtype), preferred_element_type=c.F32
            )
            ds = p * (dp - delta_blk) * cfg.scale
            dq_blk = jnp.einsum(
                "gqrs,sgk->qgrk", ds.astype(q5.dtype), k_blk.astype(q5.dtype), preferred_element_type=c.F32
            )
            dk_j += jnp.einsum("gqrs,qgrk->sgk", ds.astype(q5.dtype), q_blk, preferred_element_type=c.F32)
            return _add_at(dq, dq_blk, b, i * cfg.bq), dk_j, dv_j

        zeros = (jnp.zeros((cfg.bk, G, K), c.F32), jnp.zeros((cfg.bk, G, V), c.F32))
        dq, dk_j, dv_j = jax.lax.fori_loop(first, last, query_block, (dq, *zeros))
        return dq, _add_at(dk, dk_j, kv_rows[b], s0), _add_at(dv, dv_j, kv_rows[b], s0)

    init = (jnp.zeros(q5.shape, c.F32), jnp.zeros((Bk, S, G, K), c.F32), jnp.zeros((Bk, S, G, V), c.F32))
    dq, dk, dv = jax.lax.fori_loop(0, B * nk, key_block, init)
    dk_parts, at = [], 0
    for kp in k_parts:
        dk_parts.append(dk[..., at : at + kp.shape[-1]].reshape(kp.shape).astype(kp.dtype))
        at += kp.shape[-1]
    return (
        dq.astype(q5.dtype),
        tuple(dk_parts),
        dv.reshape(v.shape).astype(v.dtype),
        None,
        None,
        None,
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
