"""KDA as Pallas TPU (Mosaic) kernels: chunk forward and backward, wrapped in a `jax.custom_vjp`.

    from pallas_kernels.kda.tpu import kda_pallas_tpu
    o, ht = kda_pallas_tpu(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, ht = kda_pallas_tpu(..., interpret=True)   # any backend, Pallas TPU interpret mode

Grid `(B, H, NC)` with dimension semantics `("parallel", "parallel", "arbitrary")`: batch and
heads are split across TensorCores, the chunk axis runs in order on one core, and the running
state `[K, V]` (float32) lives in a VMEM scratch buffer across it.

* Forward, one grid step = one 64-token chunk: intra-chunk pair matrices with 16-token
  sub-chunking, the UT transform `T = (I + diag(beta) P)^-1`, `W`, `U`, then the state step and
  the output (`_pallas_math.chunk_fwd`). It stores each chunk's initial state (`hs`, float32)
  for the backward pass.
* Backward, the chunk axis reversed through the index maps: the cotangent of the running state
  lives in VMEM scratch; each step recomputes the chunk's intra part from the inputs and `hs` and
  emits dq, dk, dv, dG (cotangent of the in-chunk cumsum), dbeta, and dh0 at sequence starts.

Varlen (`cu_seqlens`) uses the chunk-aligned layout of `common.varlen_layout`: every sequence
starts a new chunk; per-chunk sequence ids and START/END flags arrive by scalar prefetch (SMEM)
and drive both the state resets and the index maps of `h0`/`ht`/`dht`/`dh0`. `segment_ids`
(resets wherever the id changes along a row, so a reused id is a new document) arrive as
per-token "resets so far in this chunk" counts; the kernels mask the pair matrices to
same-segment pairs, the state read to the chunk's first segment and the state write to its last.

With `use_qk_l2norm` the kernels normalise the loaded q/k rows themselves (float32) and the
backward applies the norm's VJP, so q/k stay in their input dtype in HBM.

Blocks are `(64, K)` / `(64, V)` / `(K, V)`: the last two dims are full array dims or multiples of
8, so they tile on real hardware; K = V = 128 (Kimi Linear) fills the MXU. Interpret mode checks
semantics, DMAs and (with `detect_races`) races, not Mosaic layouts or VMEM limits (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kda import _pallas_math as pm

__all__ = ["kda_pallas_tpu"]

_F32 = jnp.float32
_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _interpret_arg(interpret):
    """True -> pltpu.InterpretParams() (TPU interpret mode: DMA/semaphore simulation)."""
    if interpret is True:
        return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
    return interpret


def _fwd_kernel(
    seq_ref, flags_ref, q_ref, k_ref, v_ref, G_ref, beta_ref, glc_ref, h0_ref, *refs, scale, segmented, l2norm
):
    if segmented:
        rc_ref, rr_ref, *refs = refs
    o_ref, hs_ref, ht_ref, state_ref = refs
    seg = (rc_ref[...], rr_ref[...]) if segmented else None
    c = pl.program_id(2)
    flags = flags_ref[c]

    @pl.when((flags & pm.START) != 0)
    def _():
        state_ref[...] = h0_ref[...]

    h = state_ref[...]
    hs_ref[...] = h
    o, h_next = pm.chunk_fwd(
        q_ref[...].astype(_F32),
        k_ref[...].astype(_F32),
        v_ref[...].astype(_F32),
        G_ref[...],
        beta_ref[...],
        glc_ref[...],
        h,
        scale,
        seg,
        l2norm,
    )
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = h_next

    @pl.when((flags & pm.END) != 0)
    def _():
        ht_ref[...] = h_next


def _bwd_kernel(
    seq_ref,
    flags_ref,
    q_ref,
    k_ref,
    v_ref,
    G_ref,
    beta_ref,
    glc_ref,
    hs_ref,
    do_ref,
    dht_ref,
    *refs,
    scale,
    segmented,
    l2norm,
):
    if segmented:
        rc_ref, rr_ref, *refs = refs
    dq_ref, dk_ref, dv_ref, dG_ref, dbeta_ref, dglc_ref, dh0_ref, dstate_ref = refs
    seg = (rc_ref[...], rr_ref[...]) if segmented else None
    c = pl.num_programs(2) - 1 - pl.program_id(2)
    flags = flags_ref[c]

    @pl.when((flags & pm.END) != 0)
    def _():
        dstate_ref[...] = dht_ref[...]

    dq, dk, dv, dG, dbeta, dglc, dh = pm.chunk_bwd(
        q_ref[...].astype(_F32),
        k_ref[...].astype(_F32),
        v_ref[...].astype(_F32),
        G_ref[...],
        beta_ref[...],
        glc_ref[...],
        hs_ref[...],
        do_ref[...],
        dstate_ref[...],
        scale,
        seg,
        l2norm,
    )
    pm.store(
        (dq_ref, dk_ref, dv_ref, dG_ref, dbeta_ref, dglc_ref, dstate_ref), (dq, dk, dv, dG, dbeta, dglc, dh)
    )

    @pl.when((flags & pm.START) != 0)
    def _():
        dh0_ref[...] = dh


def _specs(B, H, NC, K, V, reverse):
    """BlockSpecs for (token arrays K/V wide, per-chunk K-columns, per-chunk states, per-sequence
    states); index maps take the grid indices then the scalar-prefetch refs."""
    C = pm.CHUNK
    ch = (lambda c: NC - 1 - c) if reverse else (lambda c: c)

    def tok(width):
        return pl.BlockSpec((None, None, C, width), lambda b, h, c, seq, fl: (b, h, ch(c), 0))

    per_chunk_col = pl.BlockSpec((None, None, None, K, 1), lambda b, h, c, seq, fl: (b, h, ch(c), 0, 0))
    per_chunk_state = pl.BlockSpec((None, None, None, K, V), lambda b, h, c, seq, fl: (b, h, ch(c), 0, 0))
    per_seq_state = pl.BlockSpec((None, None, K, V), lambda b, h, c, seq, fl: (b + seq[ch(c)], h, 0, 0))
    # segment ranks (per batch row, shared by heads): a column and a row per chunk
    seg_specs = [
        pl.BlockSpec((None, C, 1), lambda b, h, c, seq, fl: (b, ch(c), 0)),
        pl.BlockSpec((None, None, 1, C), lambda b, h, c, seq, fl: (b, ch(c), 0, 0)),
    ]
    return tok, per_chunk_col, per_chunk_state, per_seq_state, seg_specs


def _fwd(ch: pm.Chunked, scale, l2norm, *, interpret):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    NC = Tp // pm.CHUNK
    N = ch.h0.shape[0]
    tok, col, cstate, sstate, seg_specs = _specs(B, H, NC, K, V, reverse=False)
    segmented = ch.rc is not None
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H, NC),
        in_specs=[tok(K), tok(K), tok(V), tok(K), tok(1), col, sstate] + (seg_specs if segmented else []),
        out_specs=[tok(V), cstate, sstate],
        scratch_shapes=[pltpu.VMEM((K, V), _F32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, segmented=segmented, l2norm=l2norm),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, V), ch.v.dtype),
            jax.ShapeDtypeStruct((B, H, NC, K, V), _F32),
            jax.ShapeDtypeStruct((N, H, K, V), _F32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="kda_chunk_fwd_tpu",
    )(
        ch.seq,
        ch.flags,
        ch.q,
        ch.k,
        ch.v,
        ch.G,
        ch.beta,
        ch.glc,
        ch.h0,
        *((ch.rc, ch.rr) if segmented else ()),
    )


def _bwd(ch: pm.Chunked, hs, do, dht, scale, l2norm, *, interpret):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    NC = Tp // pm.CHUNK
    N = ch.h0.shape[0]
    tok, col, cstate, sstate, seg_specs = _specs(B, H, NC, K, V, reverse=True)
    segmented = ch.rc is not None
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H, NC),
        in_specs=[tok(K), tok(K), tok(V), tok(K), tok(1), col, cstate, tok(V), sstate]
        + (seg_specs if segmented else []),
        out_specs=[tok(K), tok(K), tok(V), tok(K), tok(1), col, sstate],
        scratch_shapes=[pltpu.VMEM((K, V), _F32)],
    )
    f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale, segmented=segmented, l2norm=l2norm),
        grid_spec=grid_spec,
        out_shape=[
            f32(B, H, Tp, K),
            f32(B, H, Tp, K),
            f32(B, H, Tp, V),
            f32(B, H, Tp, K),
            f32(B, H, Tp, 1),
            f32(B, H, NC, K, 1),
            f32(N, H, K, V),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="kda_chunk_bwd_tpu",
    )(
        ch.seq,
        ch.flags,
        ch.q,
        ch.k,
        ch.v,
        ch.G,
        ch.beta,
        ch.glc,
        hs,
        do,
        dht,
        *((ch.rc, ch.rr) if segmented else ()),
    )


def kda_pallas_tpu(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    segment_ids=None,
    use_qk_l2norm=False,
    interpret=False,
):
    """KDA on Pallas TPU kernels; same contract as `kda_recurrent`.

    Returns `(o [B,T,H,V] in v.dtype, final_state [N,H,K,V] f32 or None)`; differentiable
    (custom VJP: forward and backward kernels). `interpret=True` runs the kernels in Pallas TPU
    interpret mode (`pltpu.InterpretParams()`) on any backend; an `InterpretParams` instance is
    passed through as is.
    """
    interp = _interpret_arg(interpret)
    return pm.kda_pallas(
        q,
        k,
        v,
        g,
        beta,
        fwd=functools.partial(_fwd, interpret=interp),
        bwd=functools.partial(_bwd, interpret=interp),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
        name="kda_pallas_tpu",
    )
