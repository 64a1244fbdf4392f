"""Attention as Pallas TPU (Mosaic) kernels: flash-style forward, dk/dv and dq backward kernels.

    from pallas_kernels.attention.tpu import attention_pallas_tpu
    o = attention_pallas_tpu(q, k, v, causal=True, segment_ids=seg)
    o = attention_pallas_tpu(..., interpret=True)    # any backend, Pallas TPU interpret mode

Layout: the R = H // G query heads that share a kv head are folded into the query rows
(`[B,G,T*R,K]`, row m = token m // R), so an MQA cache (G = 1, absorbed MLA) is read once for all
heads and a short cached append still fills the MXU rows. Key parts stay separate inputs
(`[B,G,S,K_i]`; scores are the sum of one matmul per part), so a cache split into latent and rope
is never concatenated.

Forward grid `(B, G, query blocks, key blocks)`, the key axis "arbitrary": running max, sum
(float32) and accumulator live in VMEM scratch across it. Per-row offsets and key lengths come
by scalar prefetch (SMEM) and decide, per (row, query block), the last key block anyone can see:
later steps skip their compute (`pl.when`) and their index maps repeat the last needed block, so
no DMA is issued for keys past every query's reach. The kernel stores o and the row
log-sum-exp, which `attention_pallas_tpu_lse` returns too (differentiable: its cotangent joins
the backward's rowsum term). Backward: a dk/dv kernel (grid over key blocks, query blocks "arbitrary", starting
at the first query block that can see the key block) and a dq kernel (same grid as the forward),
both recomputing `p = exp(s - lse)` per block.

Blocks: query rows `block_q * R`, keys `block_k`; the last two dims of every block are full array
dims or the block sizes (multiples of 8 / 128 at the defaults), so they tile on hardware.
Interpret mode checks semantics and DMAs, not Mosaic layouts or VMEM limits (docs/kernels.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention import common as c

__all__ = ["attention_pallas_tpu", "attention_pallas_tpu_lse"]

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512
MAX_BLOCK_ROWS = 512  # query rows (tokens x folded heads) per block: 2048 x 192 overflowed the
# dq kernel's 16 MiB scoped VMEM on v5e (libtpu AOT compile, GQA with 8 heads per kv head)
_TRANS_B = (((1,), (1,)), ((), ()))  # a @ b.T
_TRANS_A = (((0,), (0,)), ((), ()))  # a.T @ b


class _Cfg(NamedTuple):
    scale: float
    causal: bool
    bm: int  # query rows per block (block_q tokens x R heads)
    bk: int
    R: int
    T: int
    segmented: bool
    nk: int
    nm: int


def _interpret_arg(interpret):
    if interpret is True:
        return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
    return interpret


def _cdiv(a, b):
    return -(-a // b)


def _div(a, b: int):
    """a // b for a >= 0 (truncating division: floor division of signed ints lowers through
    `sign`, which Mosaic lowers only knowing the chip)."""
    return jax.lax.div(a, jnp.int32(b)) if isinstance(a, jax.Array) else a // b


# ---------------------------------------------------------------------------- block bounds
def _last_key_block(cfg, off_ref, len_ref, b, i):
    """Index of the last key block query block i of row b can see (-1: none)."""
    t_end = jnp.minimum(_div((i + 1) * cfg.bm - 1, cfg.R) + 1, cfg.T)
    hi = c.keys_needed(off_ref[b], t_end, len_ref[b], causal=cfg.causal)
    return jnp.minimum(_div(hi + cfg.bk - 1, cfg.bk), cfg.nk) - 1


def _first_query_block(cfg, off_ref, len_ref, b, j):
    """Index of the first query block of row b that can see key block j (nm: none)."""
    live = j * cfg.bk < c.keys_needed(off_ref[b], cfg.T, len_ref[b], causal=cfg.causal)
    first = _div(jnp.maximum(j * cfg.bk - off_ref[b], 0) * cfg.R, cfg.bm) if cfg.causal else 0
    first = jnp.minimum(first, cfg.nm)
    return jnp.where(live, first, cfg.nm)


def _mask(cfg, off_ref, len_ref, qdoc_ref, kdoc_ref, b, i, j):
    rows = jax.lax.broadcasted_iota(jnp.int32, (cfg.bm, cfg.bk), 0) + i * cfg.bm
    t = _div(rows, cfg.R)
    k_pos = jax.lax.broadcasted_iota(jnp.int32, (cfg.bm, cfg.bk), 1) + j * cfg.bk
    qd = kd = None
    if cfg.segmented:
        qd, kd = qdoc_ref[...], kdoc_ref[...]  # (bm, 1), (1, bk)
    mask = c.visible(off_ref[b] + t, k_pos, len_ref[b], qd, kd, causal=cfg.causal)
    return mask & (t < cfg.T)


def _scores(cfg, q_refs, k_refs):
    s = None
    for q_ref, k_ref in zip(q_refs, k_refs):
        part = jax.lax.dot_general(q_ref[...], k_ref[...], _TRANS_B, preferred_element_type=c.F32)
        s = part if s is None else s + part
    return s * cfg.scale


def _split_refs(refs, n_parts, segmented):
    q_refs, refs = refs[:n_parts], refs[n_parts:]
    k_refs, refs = refs[:n_parts], refs[n_parts:]
    v_ref, refs = refs[0], refs[1:]
    if segmented:
        (qdoc_ref, kdoc_ref), refs = refs[:2], refs[2:]
    else:
        qdoc_ref = kdoc_ref = None
    return q_refs, k_refs, v_ref, qdoc_ref, kdoc_ref, refs


# ---------------------------------------------------------------------------- forward
def _fwd_kernel(off_ref, len_ref, rows_ref, *refs, cfg, n_parts):
    q_refs, k_refs, v_ref, qdoc_ref, kdoc_ref, refs = _split_refs(refs, n_parts, cfg.segmented)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, c.NEG, c.F32)
        l_ref[...] = jnp.zeros(l_ref.shape, c.F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, c.F32)

    @pl.when(j <= _last_key_block(cfg, off_ref, len_ref, b, i))
    def _():
        mask = _mask(cfg, off_ref, len_ref, qdoc_ref, kdoc_ref, b, i, j)
        v = v_ref[...]
        pv = lambda p: jnp.dot(p.astype(v.dtype), v, preferred_element_type=c.F32)
        m, l, acc = c.online_step(
            _scores(cfg, q_refs, k_refs), mask, m_ref[...], l_ref[...], acc_ref[...], pv
        )
        m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

    @pl.when(j == cfg.nk - 1)
    def _():
        o, lse = c.finish(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _specs(cfg, q_parts, k_parts, v, *, key_major):
    """BlockSpecs of q parts, k parts, v, docs for grid (B,G,i,j) or, key_major, (B,G,j,i)."""

    def ij(i_or_j, j_or_i):
        return (j_or_i, i_or_j) if key_major else (i_or_j, j_or_i)

    def q_map(b, g, x, y, off_ref, len_ref, rows_ref):
        i, j = ij(x, y)
        if key_major:  # skipped query blocks repeat the first live one: no DMA
            i = jnp.minimum(jnp.maximum(i, _first_query_block(cfg, off_ref, len_ref, b, j)), cfg.nm - 1)
        return i, j

    def k_map(b, g, x, y, off_ref, len_ref, rows_ref):
        i, j = ij(x, y)
        if not key_major:  # skipped key blocks repeat the last live one: no DMA
            j = jnp.clip(j, 0, jnp.maximum(_last_key_block(cfg, off_ref, len_ref, b, i), 0))
        return i, j

    q_spec = lambda d: pl.BlockSpec(
        (None, None, cfg.bm, d), lambda b, g, x, y, *r: (b, g, q_map(b, g, x, y, *r)[0], 0)
    )
    k_spec = lambda d, own_row=False: pl.BlockSpec(  # keys of row kv_rows[b]; own_row: row b (dk, dv)
        (None, None, cfg.bk, d),
        lambda b, g, x, y, *r: (b if own_row else r[2][b], g, k_map(b, g, x, y, *r)[1], 0),
    )
    specs = [q_spec(qp.shape[-1]) for qp in q_parts] + [k_spec(kp.shape[-1]) for kp in k_parts]
    specs.append(k_spec(v.shape[-1]))
    if cfg.segmented:
        specs.append(pl.BlockSpec((None, cfg.bm, 1), lambda b, g, x, y, *r: (b, q_map(b, g, x, y, *r)[0], 0)))
        specs.append(pl.BlockSpec((None, 1, cfg.bk), lambda b, g, x, y, *r: (b, 0, k_map(b, g, x, y, *r)[1])))
    return specs, q_spec, k_spec


def _fwd(cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, interpret):
    B, G, Mp, _ = q_parts[0].shape
    V = v.shape[-1]
    in_specs, q_spec, _ = _specs(cfg, q_parts, k_parts, v, key_major=False)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, G, cfg.nm, cfg.nk),
        in_specs=in_specs,
        out_specs=[q_spec(V), q_spec(1)],
        scratch_shapes=[
            pltpu.VMEM((cfg.bm, 1), c.F32),
            pltpu.VMEM((cfg.bm, 1), c.F32),
            pltpu.VMEM((cfg.bm, V), c.F32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_parts=len(k_parts)),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, G, Mp, V), v.dtype), jax.ShapeDtypeStruct((B, G, Mp, 1), c.F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_arg(interpret),
        name="attention_fwd_tpu",
    )(off, kv_len, kv_rows, *q_parts, *k_parts, v, *docs)


# ---------------------------------------------------------------------------- backward
def _probs_and_ds(cfg, q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, mask):
    p = jnp.where(mask, jnp.exp(_scores(cfg, q_refs, k_refs) - lse_ref[...]), 0.0)
    do = do_ref[...]
    dp = jax.lax.dot_general(do, v_ref[...].astype(do.dtype), _TRANS_B, preferred_element_type=c.F32)
    return p, p * (dp - delta_ref[...]) * cfg.scale


def _dkdv_kernel(off_ref, len_ref, rows_ref, *refs, cfg, n_parts):
    q_refs, k_refs, v_ref, qdoc_ref, kdoc_ref, refs = _split_refs(refs, n_parts, cfg.segmented)
    do_ref, lse_ref, delta_ref, *refs = refs
    dk_refs, dv_ref = refs[:n_parts], refs[n_parts]
    dk_acc, dv_acc = refs[n_parts + 1 : 2 * n_parts + 1], refs[2 * n_parts + 1]
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        for acc in (*dk_acc, dv_acc):
            acc[...] = jnp.zeros(acc.shape, c.F32)

    @pl.when(i >= _first_query_block(cfg, off_ref, len_ref, b, j))
    def _():
        mask = _mask(cfg, off_ref, len_ref, qdoc_ref, kdoc_ref, b, i, j)
        p, ds = _probs_and_ds(cfg, q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, mask)
        do = do_ref[...]
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TRANS_A, preferred_element_type=c.F32)
        for q_ref, acc in zip(q_refs, dk_acc):
            q = q_ref[...]
            acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TRANS_A, preferred_element_type=c.F32)

    @pl.when(i == cfg.nm - 1)
    def _():
        for out, acc in zip((*dk_refs, dv_ref), (*dk_acc, dv_acc)):
            out[...] = acc[...]


def _dq_kernel(off_ref, len_ref, rows_ref, *refs, cfg, n_parts):
    q_refs, k_refs, v_ref, qdoc_ref, kdoc_ref, refs = _split_refs(refs, n_parts, cfg.segmented)
    do_ref, lse_ref, delta_ref, *refs = refs
    dq_refs, dq_acc = refs[:n_parts], refs[n_parts:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        for acc in dq_acc:
            acc[...] = jnp.zeros(acc.shape, c.F32)

    @pl.when(j <= _last_key_block(cfg, off_ref, len_ref, b, i))
    def _():
        mask = _mask(cfg, off_ref, len_ref, qdoc_ref, kdoc_ref, b, i, j)
        _, ds = _probs_and_ds(cfg, q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, mask)
        for k_ref, acc in zip(k_refs, dq_acc):
            k = k_ref[...]
            acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=c.F32)

    @pl.when(j == cfg.nk - 1)
    def _():
        for out, acc in zip(dq_refs, dq_acc):
            out[...] = acc[...]


def _bwd_call(cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, do, lse, delta, interpret, *, key_major):
    B, G, Mp, _ = q_parts[0].shape
    S = v.shape[2]
    in_specs, q_spec, k_spec = _specs(cfg, q_parts, k_parts, v, key_major=key_major)
    in_specs += [q_spec(do.shape[-1]), q_spec(1), q_spec(1)]
    f32 = lambda *s: jax.ShapeDtypeStruct(s, c.F32)
    if key_major:
        kernel, grid = _dkdv_kernel, (B, G, cfg.nk, cfg.nm)
        dims = [kp.shape[-1] for kp in k_parts] + [v.shape[-1]]
        out_specs = [k_spec(d, own_row=True) for d in dims]  # per query row; summed per kv row below
        out_shape = [f32(B, G, S, d) for d in dims]
        scratch = [pltpu.VMEM((cfg.bk, d), c.F32) for d in dims]
    else:
        kernel, grid = _dq_kernel, (B, G, cfg.nm, cfg.nk)
        dims = [qp.shape[-1] for qp in q_parts]
        out_specs = [q_spec(d) for d in dims]
        out_shape = [f32(B, G, Mp, d) for d in dims]
        scratch = [pltpu.VMEM((cfg.bm, d), c.F32) for d in dims]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
    )
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, n_parts=len(k_parts)),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_arg(interpret),
        name="attention_dkdv_tpu" if key_major else "attention_dq_tpu",
    )(off, kv_len, kv_rows, *q_parts, *k_parts, v, *docs, do, lse, delta)


# ---------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 8))
def _flash(cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, interpret):
    """(o, lse) in the kernels' layout, both differentiable."""
    return _fwd(cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, interpret)


def _flash_fwd(cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, interpret):
    o, lse = _fwd(cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, interpret)
    return (o, lse), (q_parts, k_parts, v, off, kv_len, kv_rows, docs, o, lse)


def _flash_bwd(cfg, interpret, res, cts):
    q_parts, k_parts, v, off, kv_len, kv_rows, docs, o, lse = res
    do, dlse = cts
    # d lse_i / d s_ij = p_ij: lse's cotangent joins the rowsum term, ds = p (dp - (delta - dlse))
    delta = jnp.sum(do.astype(c.F32) * o.astype(c.F32), axis=-1, keepdims=True) - dlse
    args = (cfg, q_parts, k_parts, v, off, kv_len, kv_rows, docs, do, lse, delta, interpret)
    per_row = _bwd_call(*args, key_major=True)  # [B,G,S,*] per query row -> sum into kv rows
    *dk, dv = (jnp.zeros((v.shape[0],) + d.shape[1:], c.F32).at[kv_rows].add(d) for d in per_row)
    dq = _bwd_call(*args, key_major=False)
    return (
        tuple(d.astype(x.dtype) for d, x in zip(dq, q_parts)),
        tuple(d.astype(x.dtype) for d, x in zip(dk, k_parts)),
        dv.astype(v.dtype),
        None,
        None,
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_pallas_tpu(
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
    interpret=False,
):
    """Attention through the Pallas TPU kernels; arguments as `pallas_kernels.attention.attention`."""
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
    return _attend(pb, pb.q_doc_BT, pb.k_doc_BS, block_q, block_k, interpret)[0]


def attention_pallas_tpu_lse(
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
    interpret=False,
):
    """(o [B,T,H,V] in v's dtype, lse [B,T,H] float32) through the Pallas TPU kernels: q over one
    span of keys, documents as indices; the contract of `blockwise_attention_lse`."""
    pb = c.problem(q, k, v, scale=scale, causal=causal, segment_ids=None, q_offset=q_offset, kv_length=None)
    q_doc, k_doc = c.document_indices(q_doc, k_doc, q.shape[0], q.shape[1], v.shape[1])
    return _attend(pb, q_doc, k_doc, block_q, block_k, interpret)


def _attend(pb: c.Problem, q_doc_BT, k_doc_BS, block_q, block_k, interpret):
    """(o [B,T,H,V] in v's dtype, lse [B,T,H] float32) of a checked problem, documents given as
    labels per query and key (None: one document): the kernels' layout in, `_flash`, back out."""
    q, v = pb.q, pb.v
    B, T, H, K = q.shape
    S, G, V = v.shape[1], (v.shape[2] if v.ndim == 4 else 1), v.shape[-1]
    R = H // G
    if T == 0 or S == 0:
        return jnp.zeros((B, T, H, V), v.dtype), jnp.full((B, T, H), c.NEG, c.F32)
    bq = max(1, min(int(block_q), T, MAX_BLOCK_ROWS // R))
    bk = max(1, min(int(block_k), S))
    Tp, Sp = _cdiv(T, bq) * bq, _cdiv(S, bk) * bk
    # [B,T,G,R,K] -> [B,G,T*R,K]: the heads of a kv group are rows of one query block
    q_BGMK = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    q_BGMK = jnp.swapaxes(q_BGMK.reshape(B, Tp, G, R, K), 1, 2).reshape(B, G, Tp * R, K)
    widths = [kp.shape[-1] for kp in pb.k_parts]
    bounds = [sum(widths[:n]) for n in range(len(widths) + 1)]
    q_parts = tuple(q_BGMK[..., a:e] for a, e in zip(bounds[:-1], bounds[1:]))

    # keys padded only when block_k does not divide S (pick a divisor for large caches)
    def pad_s(x):  # [B,S,G,*] or [B,S,*] -> [B,G,Sp,*]
        x = x.reshape(x.shape[0], S, G, x.shape[-1])
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))), 1, 2)

    k_parts = tuple(pad_s(kp) for kp in pb.k_parts)
    docs = ()
    if q_doc_BT is not None:
        q_doc = jnp.repeat(jnp.pad(q_doc_BT, ((0, 0), (0, Tp - T)), constant_values=-1), R, axis=1)
        k_doc = jnp.pad(k_doc_BS, ((0, 0), (0, Sp - S)), constant_values=-2)
        docs = (q_doc[..., None], k_doc[:, None, :])
    cfg = _Cfg(pb.scale, pb.causal, bq * R, bk, R, T, q_doc_BT is not None, Sp // bk, Tp // bq)
    kv_len = jnp.minimum(pb.kv_length_B, S)  # padded keys are never visible
    o, lse = _flash(cfg, q_parts, k_parts, pad_s(v), pb.q_offset_B, kv_len, pb.kv_rows_B, docs, interpret)
    o = jnp.swapaxes(o.reshape(B, G, Tp, R, V), 1, 2).reshape(B, Tp, H, V)
    lse = jnp.swapaxes(lse.reshape(B, G, Tp, R), 1, 2).reshape(B, Tp, H)
    return o[:, :T], lse[:, :T]
