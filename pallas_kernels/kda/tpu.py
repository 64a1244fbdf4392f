"""KDA as Pallas TPU (Mosaic) kernels: chunk forward and backward, wrapped in a `jax.custom_vjp`.

    from pallas_kernels.kda.tpu import kda_pallas_tpu
    o, ht = kda_pallas_tpu(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, ht = kda_pallas_tpu(..., interpret=True)   # any backend, Pallas TPU interpret mode

Grid `(B, H / HB, NC)` with dimension semantics `("parallel", "parallel", "arbitrary")`: batch
rows and head blocks are split across TensorCores, the chunk axis runs in order on one core, and
the running states `[HB, K, V]` (float32) live in a VMEM scratch buffer across it. One grid step
is one 64-token chunk of HB heads (`head_block`: all heads up to 16, else 16 or 8), walked by an
in-kernel loop over the heads.

The kernels read and write the caller's token-major layout `[B, T, H, .]` directly (a `(64, HB,
K)` window per step): no heads-major copy of q/k/v/g, no f32 copy of the outputs. The gate's
in-chunk cumsum G is a matmul with a triangular ones matrix in the kernel, and the backward turns
dG back into dg the same way, so G never exists in HBM. bf16 windows are widened into f32 VMEM
scratch once per step (Mosaic cannot index one head of a packed bf16 window dynamically).

* Forward, per chunk and head: intra-chunk pair matrices with 16-token sub-chunking, the UT
  transform `T = (I + diag(beta) P)^-1`, `W`, `U`, then the state step and the output
  (`_pallas_math.chunk_fwd`). Under autodiff it stores each chunk's initial state (`hs`, float32,
  `[B, NC, H, K, V]`) for the backward pass; the plain forward (inference) stores nothing.
* Backward, the chunk axis reversed through the index maps: the cotangent of the running state
  lives in VMEM scratch; each step recomputes the chunk's intra part from the inputs and `hs` and
  emits dq, dk, dv (input dtype), dg, dbeta, and dh0 at sequence starts.

Varlen (`cu_seqlens`) uses the chunk-aligned layout of `common.varlen_layout`: every sequence
starts a new chunk; per-chunk sequence ids and START/END flags arrive by scalar prefetch (SMEM)
and drive both the state resets and the index maps of `h0`/`ht`/`dht`/`dh0`. `segment_ids`
(resets wherever the id changes along a row, so a reused id is a new document) arrive as
per-token "resets so far in this chunk" counts; the kernels mask the pair matrices to
same-segment pairs, the state read to the chunk's first segment and the state write to its last.

With `use_qk_l2norm` the kernels normalise the loaded q/k rows themselves (float32) and the
backward applies the norm's VJP, so q/k stay in their input dtype in HBM.

beta travels as `[B, NC, H, 64]` (one row per chunk and head, 64 lanes) rather than a `[.., 1]`
column, which TPU tiling pads to 128 lanes. Interpret mode checks semantics, DMAs and (with
`detect_races`) races, not Mosaic layouts or VMEM limits (docs/kernels.md; tests/tpu compiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kda import _pallas_math as pm
from pallas_kernels.kda.common import default_scale, segment_resets, validate_inputs, varlen_layout

__all__ = ["kda_pallas_tpu", "head_block"]

_F32 = jnp.float32
_SEMANTICS = ("parallel", "parallel", "arbitrary")
HEAD_BLOCK = 16  # most heads per grid step (VMEM: ~16 MiB of windows + scratch in the backward)
VMEM_LIMIT = 48 * 2**20  # scoped VMEM asked of Mosaic (v5e/v6e: 128 MiB, v5p: 95 MiB per core)


def head_block(H: int) -> int:
    """Heads per grid step: all of them up to HEAD_BLOCK, else HEAD_BLOCK or 8 where it divides H
    (a window's head dim must be the full dim or a multiple of 8 f32 / 16 bf16 sublanes)."""
    if H <= HEAD_BLOCK:
        return H
    for hb in (HEAD_BLOCK, 8):
        if H % hb == 0:
            return hb
    return H


def _interpret_arg(interpret):
    """True -> pltpu.InterpretParams() (TPU interpret mode: DMA/semaphore simulation)."""
    if interpret is True:
        return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
    return interpret


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _eye(n):
    return jnp.where(_iota((n, n), 0) == _iota((n, n), 1), 1.0, 0.0).astype(_F32)


def _tril(n):
    """[n, n] lower-triangular ones incl. the diagonal: tril @ g is the cumsum of g's rows."""
    return jnp.where(_iota((n, n), 0) >= _iota((n, n), 1), 1.0, 0.0).astype(_F32)


def _exact(a, b, contract):
    """a . b over dims `contract` ((lhs,), (rhs,)) at full f32 precision whatever the kernel's dot
    precision: these products only move, sum or transpose gate values (DESIGN.md: f32)."""
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=_F32
    )


def _column(row, eye):
    """[n, 1] from a [1, n] row (a one-hot matmul: exact, and no relayout for Mosaic to prove)."""
    return _exact(eye, row, ((1,), (1,)))


def _row_of(col, eye):
    """[1, n] from a [n, 1] column."""
    return _exact(col, eye, ((0,), (0,)))


def _gates(g, beta_row):
    """(G = in-chunk cumsum of g [C,K], glc = G's last row as a column [K,1], beta [C,1])."""
    C, K = g.shape
    G = _exact(_tril(C), g, ((1,), (0,)))
    last = jnp.where(_iota((C, 1), 0) == C - 1, 1.0, 0.0).astype(_F32)
    return G, _exact(G, last, ((0,), (0,))), _column(beta_row, _eye(C))


def _widen(refs, scratch):
    """f32 views of the token windows: f32 refs as they are, others copied into f32 scratch."""
    out = []
    it = iter(scratch)
    for ref in refs:
        if ref.dtype == _F32:
            out.append(ref)
        else:
            s = next(it)
            s[...] = ref[...].astype(_F32)
            out.append(s)
    return out


def _fwd_kernel_body(seq_ref, flags_ref, *refs, scale, segmented, l2norm, save_states, n_wide, narrow_out):
    q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref, *refs = refs
    if segmented:
        rc_ref, rr_ref, *refs = refs
    o_ref, *refs = refs
    if save_states:
        hs_ref, *refs = refs
    ht_ref, state_ref, *scratch = refs
    wide_in, o_wide = scratch[:n_wide], (scratch[n_wide] if narrow_out else o_ref)
    q_f, k_f, v_f = _widen((q_ref, k_ref, v_ref), wide_in)
    seg = (rc_ref[...], rr_ref[...]) if segmented else None
    c = pl.program_id(2)
    flags = flags_ref[c]
    fast = (flags & pm.FAST) != 0

    @pl.when((flags & pm.START) != 0)
    def _():
        state_ref[...] = h0_ref[...]

    def head(h, carry):
        G, glc, beta = _gates(g_ref[:, h, :], beta_ref[pl.ds(h, 1), :])
        state = state_ref[h]
        if save_states:
            hs_ref[h] = state.astype(hs_ref.dtype)
        o, h_next = pm.chunk_fwd(
            q_f[:, h, :], k_f[:, h, :], v_f[:, h, :], G, beta, glc, state, scale, seg, l2norm, fast=fast
        )
        o_wide[:, h, :] = o.astype(o_wide.dtype)
        state_ref[h] = h_next
        return carry

    lax.fori_loop(0, state_ref.shape[0], head, 0)
    if narrow_out:
        o_ref[...] = o_wide[...].astype(o_ref.dtype)

    @pl.when((flags & pm.END) != 0)
    def _():
        ht_ref[...] = state_ref[...]


def _bwd_kernel_body(seq_ref, flags_ref, *refs, scale, segmented, l2norm, n_wide, n_narrow_out):
    q_ref, k_ref, v_ref, g_ref, beta_ref, hs_ref, do_ref, dht_ref, *refs = refs
    if segmented:
        rc_ref, rr_ref, *refs = refs
    dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, dh0_ref, dstate_ref, *scratch = refs
    q_f, k_f, v_f, do_f = _widen((q_ref, k_ref, v_ref, do_ref), scratch[:n_wide])
    narrow = iter(scratch[n_wide:])
    outs = (dq_ref, dk_ref, dv_ref)
    wide_out = [r if r.dtype == _F32 else next(narrow) for r in outs]
    seg = (rc_ref[...], rr_ref[...]) if segmented else None
    c = pl.num_programs(2) - 1 - pl.program_id(2)
    flags = flags_ref[c]
    fast = (flags & pm.FAST) != 0

    @pl.when((flags & pm.END) != 0)
    def _():
        dstate_ref[...] = dht_ref[...]

    def head(h, carry):
        g = g_ref[:, h, :]
        C, K = g.shape
        G, glc, beta = _gates(g, beta_ref[pl.ds(h, 1), :])
        dq, dk, dv, dG, dbeta, dglc, dh = pm.chunk_bwd(
            q_f[:, h, :],
            k_f[:, h, :],
            v_f[:, h, :],
            G,
            beta,
            glc,
            hs_ref[h].astype(_F32),
            do_f[:, h, :],
            dstate_ref[h],
            scale,
            seg,
            l2norm,
            fast=fast,
        )
        # glc is G's last row: its cotangent joins dG there; then dg = tril^T dG (reverse cumsum)
        dG = jnp.where(_iota((C, K), 0) == C - 1, dG + _row_of(dglc, _eye(K)), dG)
        dg_ref[:, h, :] = _exact(_tril(C), dG, ((0,), (0,)))
        dbeta_ref[pl.ds(h, 1), :] = _row_of(dbeta, _eye(C))
        for ref, val in zip(wide_out, (dq, dk, dv)):
            ref[:, h, :] = val
        dstate_ref[h] = dh
        return carry

    lax.fori_loop(0, dstate_ref.shape[0], head, 0)
    for ref, wide in zip(outs, wide_out):
        if ref is not wide:
            ref[...] = wide[...].astype(ref.dtype)

    @pl.when((flags & pm.START) != 0)
    def _():
        dh0_ref[...] = dstate_ref[...]


_fwd_kernel = pm.with_precision(_fwd_kernel_body)
_bwd_kernel = pm.with_precision(_bwd_kernel_body)


class _Layout:
    """Block specs of the kernels' arrays for grid (B, H/HB, NC); index maps take the grid indices
    then the scalar-prefetch refs; `reverse` walks the chunks backwards."""

    def __init__(self, HB, NC, K, V, reverse):
        C = pm.CHUNK
        ch = (lambda c: NC - 1 - c) if reverse else (lambda c: c)
        self.tok = lambda width: pl.BlockSpec((None, C, HB, width), lambda b, h, c, s, f: (b, ch(c), h, 0))
        self.beta = pl.BlockSpec((None, None, HB, C), lambda b, h, c, s, f: (b, ch(c), h, 0))
        self.chunk_state = pl.BlockSpec((None, None, HB, K, V), lambda b, h, c, s, f: (b, ch(c), h, 0, 0))
        self.seq_state = pl.BlockSpec((None, HB, K, V), lambda b, h, c, s, f: (b + s[ch(c)], h, 0, 0))
        # segment ranks (per batch row, shared by heads): a column and a row per chunk
        self.seg = [
            pl.BlockSpec((None, C, 1), lambda b, h, c, s, f: (b, ch(c), 0)),
            pl.BlockSpec((None, None, 1, C), lambda b, h, c, s, f: (b, ch(c), 0, 0)),
        ]


def _params():
    return pltpu.CompilerParams(dimension_semantics=_SEMANTICS, vmem_limit_bytes=VMEM_LIMIT)


def _fwd(xs, h0, seq, flags, seg, *, scale, l2norm, save_states, interpret, precision):
    q, k, v, g, beta = xs
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    NC, N, HB = Tp // pm.CHUNK, h0.shape[0], head_block(H)
    lay = _Layout(HB, NC, K, V, reverse=False)
    wide = [pltpu.VMEM((pm.CHUNK, HB, x.shape[-1]), _F32) for x in (q, k, v) if x.dtype != _F32]
    narrow_out = v.dtype != _F32
    out_specs = [lay.tok(V)] + ([lay.chunk_state] if save_states else []) + [lay.seq_state]
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), v.dtype)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, NC, H, K, V), pm.matmul_dtype(precision)))
    out_shape.append(jax.ShapeDtypeStruct((N, H, K, V), _F32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H // HB, NC),
        in_specs=[lay.tok(K), lay.tok(K), lay.tok(V), lay.tok(K), lay.beta, lay.seq_state]
        + (lay.seg if seg else []),
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((HB, K, V), _F32)]
        + wide
        + ([pltpu.VMEM((pm.CHUNK, HB, V), _F32)] if narrow_out else []),
    )
    kernel = functools.partial(
        _fwd_kernel,
        scale=scale,
        segmented=bool(seg),
        l2norm=l2norm,
        save_states=save_states,
        n_wide=len(wide),
        narrow_out=narrow_out,
        precision=precision,
    )
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="kda_chunk_fwd_tpu",
    )(seq, flags, q, k, v, g, beta, h0, *seg)
    return (outs[0], outs[1], outs[2]) if save_states else (outs[0], None, outs[1])


def _bwd(xs, h0, seq, flags, seg, hs, do, dht, *, scale, l2norm, interpret, precision):
    q, k, v, g, beta = xs
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    NC, HB = Tp // pm.CHUNK, head_block(H)
    lay = _Layout(HB, NC, K, V, reverse=True)
    wide = [pltpu.VMEM((pm.CHUNK, HB, x.shape[-1]), _F32) for x in (q, k, v, do) if x.dtype != _F32]
    narrow = [pltpu.VMEM((pm.CHUNK, HB, x.shape[-1]), _F32) for x in (q, k, v) if x.dtype != _F32]
    sds = jax.ShapeDtypeStruct
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H // HB, NC),
        in_specs=[lay.tok(K), lay.tok(K), lay.tok(V), lay.tok(K), lay.beta, lay.chunk_state, lay.tok(V)]
        + [lay.seq_state]
        + (lay.seg if seg else []),
        out_specs=[lay.tok(K), lay.tok(K), lay.tok(V), lay.tok(K), lay.beta, lay.seq_state],
        scratch_shapes=[pltpu.VMEM((HB, K, V), _F32)] + wide + narrow,
    )
    kernel = functools.partial(
        _bwd_kernel,
        scale=scale,
        segmented=bool(seg),
        l2norm=l2norm,
        n_wide=len(wide),
        n_narrow_out=len(narrow),
        precision=precision,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            sds(q.shape, q.dtype),
            sds(k.shape, k.dtype),
            sds(v.shape, v.dtype),
            sds(g.shape, _F32),
            sds(beta.shape, _F32),
            sds(h0.shape, _F32),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_chunk_bwd_tpu",
    )(seq, flags, q, k, v, g, beta, hs, do, dht, *seg)


def _make_core(scale, l2norm, interpret, precision):
    kw = dict(scale=scale, l2norm=l2norm, interpret=interpret, precision=precision)

    @jax.custom_vjp
    def core(xs, h0, seq, flags, seg, has):
        o, _, ht = _fwd(xs, h0, seq, flags, seg, save_states=False, **kw)
        return o, ht

    def core_fwd(xs, h0, seq, flags, seg, has):
        o, hs, ht = _fwd(xs, h0, seq, flags, seg, save_states=True, **kw)
        return (o, ht), (xs, h0, seq, flags, seg, has, hs)

    def core_bwd(res, cts):
        xs, h0, seq, flags, seg, has, hs = res
        do, dht = cts
        *dxs, dh0 = _bwd(xs, h0, seq, flags, seg, hs, do, dht.astype(_F32), **kw)
        dh0 = jnp.where(has[:, None, None, None], dh0, 0.0)  # sequences with no chunk: never written
        none = lambda tree: jax.tree.map(lambda _: None, tree)
        return tuple(dxs), dh0, None, None, none(seg), None

    core.defvjp(core_fwd, core_bwd)
    return core


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
    precision="highest",
):
    """KDA on Pallas TPU kernels; same contract as `kda_recurrent`.

    Returns `(o [B,T,H,V] in v.dtype, final_state [N,H,K,V] f32 or None)`; differentiable
    (custom VJP: forward and backward kernels). `interpret=True` runs the kernels in Pallas TPU
    interpret mode (`pltpu.InterpretParams()`) on any backend; an `InterpretParams` instance is
    passed through as is. `precision` (`_pallas_math.PRECISIONS`): "highest" (default) feeds the
    MXU float32 operands at full precision; "default" bf16 operands with float32 accumulation
    (one pass), and stores the per-chunk states `hs` in bf16 (they only enter the backward as
    matmul operands, so this rounds nothing the matmuls would not).
    """
    precision = pm.precision_name(precision)
    n_seq = validate_inputs(q, k, v, g, beta, initial_state, cu_seqlens, segment_ids)
    scale = default_scale(q, scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = pm.CHUNK
    h0 = jnp.zeros((n_seq, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)
    xs = (q, k, v, g.astype(_F32), beta.astype(_F32))
    seg = ()
    if cu_seqlens is None:
        NC = max(1, -(-T // C))
        Tp = NC * C
        xs = tuple(jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2)) if Tp > T else x for x in xs)
        c = jnp.arange(NC, dtype=jnp.int32)
        seq = jnp.zeros((NC,), jnp.int32)
        flags = jnp.where(c == 0, pm.START, 0) | jnp.where(c == NC - 1, pm.END, 0)
        has = jnp.ones((n_seq,), bool)
        if segment_ids is not None:
            # resets (change points: a reused id is a new document) so far in the chunk, per
            # token; padding continues the row's last segment
            reset = segment_resets(jnp.pad(segment_ids, ((0, 0), (0, Tp - T)), mode="edge"))
            r = jnp.cumsum(reset.reshape(B, NC, C).astype(_F32), axis=2)
            seg = (r.reshape(B, Tp, 1), r.reshape(B, NC, 1, C))
        from_chunks = lambda x: x[:, :T]
    else:
        lay = varlen_layout(cu_seqlens, T, C)
        NC = lay.num_chunks
        Tp = NC * C
        xs = tuple(jnp.zeros((1, Tp) + x.shape[2:], x.dtype).at[:, lay.dest].set(x) for x in xs)
        seq = lay.chunk_seq
        flags = jnp.where(lay.chunk_start, pm.START, 0) | jnp.where(lay.chunk_end, pm.END, 0)
        has = jnp.zeros((n_seq,), bool).at[seq].max(lay.chunk_start)
        from_chunks = lambda x: x[:, lay.dest]
    q, k, v, g, beta = xs
    flags = flags | pm.factorisable_flags(g, NC, time_axis=1)
    beta = beta.reshape(B, NC, C, H).transpose(0, 1, 3, 2)  # [B,NC,H,C]: a row per chunk and head
    core = _make_core(scale, bool(use_qk_l2norm), _interpret_arg(interpret), precision)
    o, ht = core((q, k, v, g, beta), h0, seq, flags.astype(jnp.int32), seg, has)
    o = from_chunks(o)
    if not output_final_state:
        return o, None
    return o, jnp.where(has[:, None, None, None], ht, h0)  # empty sequences keep their initial state
