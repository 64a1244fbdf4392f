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
  (`_pallas_math.chunk_fwd`). Under autodiff it stores the state entering every
  `state_stride`-th chunk (`hs`, `[B, NC/S, H, K, V]`, float32; bf16 under precision="default")
  for the backward pass; the plain forward (inference) stores nothing. The differentiated pass
  runs on whole groups of S chunks (zero chunks appended where needed, `_to_groups`).
* Backward, the chunk axis reversed through the index maps: the cotangent of the running state
  lives in VMEM scratch. The q/k/v/g/beta windows span the S chunks of a group; on entering a
  group (at its last chunk) a step recomputes the states entering its other chunks from the saved
  one with the forward's chunk step (a sequence starting inside the group takes its h0 row by
  DMA), into VMEM scratch. Each step then recomputes the chunk's intra part from the inputs and
  its state and emits dq, dk, dv (input dtype), dg, dbeta, and dh0 at sequence starts.

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
STATE_STRIDE = 4  # save the state entering every STATE_STRIDE-th chunk for the backward (docs/kernels.md)
VMEM_LIMIT = 48 * 2**20  # scoped VMEM asked of Mosaic (v5e/v6e: 128 MiB, v5p: 95 MiB per core)
VMEM_BUDGET = VMEM_LIMIT * 7 // 8  # what `head_block` lets the backward's windows take


def head_block(H: int, stride: int = 1, K: int = 128, V: int = 128, itemsize: int = 2) -> int:
    """Heads per grid step: all of them up to HEAD_BLOCK, else HEAD_BLOCK or 8 where it divides H
    (a window's head dim must be the full dim or a multiple of 8 f32 / 16 bf16 sublanes).

    With `stride` > 1 (the backward's windows span `stride` chunks) the largest of those whose
    backward fits `VMEM_BUDGET` by `bwd_vmem_bytes` (`itemsize`: q/k/v bytes per element)."""
    hbs = [H] if H <= HEAD_BLOCK else [hb for hb in (HEAD_BLOCK, 8) if H % hb == 0] or [H]
    if stride == 1:
        return hbs[0]
    for hb in hbs:
        if bwd_vmem_bytes(hb, stride, K, V, itemsize) <= VMEM_BUDGET:
            return hb
    raise ValueError(
        f"kda_pallas_tpu: state_stride={stride} needs {bwd_vmem_bytes(hbs[-1], stride, K, V, itemsize) / 2**20:.0f} "
        f"MiB of VMEM in the backward at {hbs[-1]} heads per step (K={K}, V={V}), over "
        f"{VMEM_BUDGET / 2**20:.0f} MiB; use a smaller state_stride"
    )


def bwd_vmem_bytes(HB: int, stride: int, K: int, V: int, itemsize: int) -> int:
    """Upper estimate of the backward kernel's VMEM (window buffers are double-buffered): per head,
    `stride` chunks of q/k/v/g windows plus `stride - 1` recomputed f32 states, and the per-chunk
    do/dq/dk/dv/dg windows, state blocks and scratch. Calibrated against Mosaic's scoped-VMEM
    errors at K = V = 128, bf16 (64.75 MiB at stride 16 x 16 heads, 60.5 MiB at 32 x 8; this
    gives 69 and 63)."""
    C, f4 = pm.CHUNK, 4
    wide = 0 if itemsize == f4 else C * (2 * K + 2 * V) * f4 + C * (2 * K + V) * f4
    group = 2 * C * ((2 * K + V) * itemsize + K * f4 + f4) + K * V * f4
    chunk = 2 * C * (V * itemsize + (2 * K + V) * itemsize + K * f4 + f4) + 7 * K * V * f4 + wide
    return HB * (stride * group + chunk)


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


def _fwd_kernel_body(
    seq_ref, flags_ref, *refs, scale, segmented, l2norm, save_states, stride, n_wide, narrow_out
):
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

    if save_states:
        # checkpoint: the state entering every stride-th chunk (after any START reset); the
        # block of hs stays resident for the stride chunks that map to it
        @pl.when(lax.rem(c, stride) == 0)
        def _():
            hs_ref[...] = state_ref[...].astype(hs_ref.dtype)

    def head(h, carry):
        G, glc, beta = _gates(g_ref[:, h, :], beta_ref[pl.ds(h, 1), :])
        state = state_ref[h]
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


def _slot(ref, i, C):
    """Chunk i of a group window: rows [i*C, (i+1)*C) of a token window, entry i of a per-chunk one
    (`C=None`). Whole-ref for a 1-chunk group."""
    if C is None:
        return ref.at[i]
    return ref.at[pl.ds(i * C if isinstance(i, int) else pl.multiple_of(i * C, C), C)]


def _bwd_kernel_body(
    seq_ref, flags_ref, *refs, scale, segmented, l2norm, stride, restarts, n_wide, n_narrow_out
):
    q_ref, k_ref, v_ref, g_ref, beta_ref, hs_ref, do_ref, dht_ref, *refs = refs
    if restarts:
        h0_hbm, *refs = refs
    if segmented:
        rc_ref, rr_ref, *refs = refs
    dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, dh0_ref, dstate_ref, *scratch = refs
    if stride > 1:
        hbuf_ref, *scratch = scratch
    if restarts:
        h0_buf, sem, *scratch = scratch
    wide_in, narrow = scratch[:n_wide], iter(scratch[n_wide:])
    outs = (dq_ref, dk_ref, dv_ref)
    wide_out = [r if r.dtype == _F32 else next(narrow) for r in outs]
    c = pl.num_programs(2) - 1 - pl.program_id(2)
    C = pm.CHUNK
    # q/k/v/g/beta/seg windows hold the group of `stride` chunks that shares checkpoint c // stride
    i = lax.rem(c, stride)  # lax: c >= 0, and Mosaic has no sign op on every chip
    slot = lambda ref, j, rows=C: ref if stride == 1 else _slot(ref, j, rows)

    def windows(j):
        """Chunk j of the group: (q, k, v widened to f32, g, beta rows, segment ranks)."""
        q_f, k_f, v_f = _widen((slot(q_ref, j), slot(k_ref, j), slot(v_ref, j)), wide_in)
        seg = (slot(rc_ref, j, None)[...], slot(rr_ref, j, None)[...]) if segmented else None
        return q_f, k_f, v_f, slot(g_ref, j), slot(beta_ref, j, None), seg

    if stride > 1:
        # first visit of a group (the chunks run in reverse): recompute the states entering its
        # chunks 1 .. stride-1 from the checkpoint with the forward's own chunk step
        @pl.when(i == stride - 1)
        def _():
            first = c - (stride - 1)
            for t in range(1, stride):
                q_f, k_f, v_f, g_v, beta_v, seg = windows(t - 1)
                fast = (flags_ref[first + t - 1] & pm.FAST) != 0
                restart = (flags_ref[first + t] & pm.START) != 0

                def head(
                    h, carry, t=t, q_f=q_f, k_f=k_f, v_f=v_f, g_v=g_v, beta_v=beta_v, seg=seg, fast=fast
                ):
                    G, glc, beta = _gates(g_v[:, h, :], beta_v[pl.ds(h, 1), :])
                    state = hs_ref[h].astype(_F32) if t == 1 else hbuf_ref[t - 2, h]
                    _, state = pm.chunk_fwd(
                        q_f[:, h, :],
                        k_f[:, h, :],
                        v_f[:, h, :],
                        G,
                        beta,
                        glc,
                        state,
                        scale,
                        seg,
                        l2norm,
                        fast=fast,
                    )
                    if restarts:  # a sequence starts at chunk first + t: its state is h0[seq]

                        @pl.when(restart)
                        def _():
                            row = pl.program_id(0) + seq_ref[first + t]
                            head_ix = pl.program_id(1) * dstate_ref.shape[0] + h
                            copy = pltpu.make_async_copy(h0_hbm.at[row, head_ix], h0_buf, sem)
                            copy.start()
                            copy.wait()

                        state = jnp.where(restart, h0_buf[...], state)
                    hbuf_ref[t - 1, h] = state
                    return carry

                lax.fori_loop(0, dstate_ref.shape[0], head, 0)

    q_f, k_f, v_f, g_v, beta_v, seg = windows(i)
    (do_f,) = _widen((do_ref,), wide_in[n_wide - 1 :] if do_ref.dtype != _F32 else ())
    flags = flags_ref[c]
    fast = (flags & pm.FAST) != 0

    @pl.when((flags & pm.END) != 0)
    def _():
        dstate_ref[...] = dht_ref[...]

    def head(h, carry):
        g = g_v[:, h, :]
        C, K = g.shape
        G, glc, beta = _gates(g, beta_v[pl.ds(h, 1), :])
        state = hs_ref[h].astype(_F32)
        if stride > 1:
            state = jnp.where(i == 0, state, hbuf_ref[jnp.maximum(i - 1, 0), h])
        dq, dk, dv, dG, dbeta, dglc, dh = pm.chunk_bwd(
            q_f[:, h, :],
            k_f[:, h, :],
            v_f[:, h, :],
            G,
            beta,
            glc,
            state,
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
    then the scalar-prefetch refs; `reverse` walks the chunks backwards. The `group` specs cover
    the `stride` chunks that share one saved state (the backward's windows); for stride 1 they
    are the per-chunk ones."""

    def __init__(self, HB, NC, K, V, reverse, stride=1):
        C = pm.CHUNK
        ch = (lambda c: NC - 1 - c) if reverse else (lambda c: c)
        gr = (lambda c: lax.div(ch(c), stride)) if stride > 1 else ch
        S = None if stride == 1 else stride  # None: a squeezed (one-chunk) dim
        self.tok = lambda width: pl.BlockSpec((None, C, HB, width), lambda b, h, c, s, f: (b, ch(c), h, 0))
        self.group_tok = lambda width: pl.BlockSpec(
            (None, stride * C, HB, width), lambda b, h, c, s, f: (b, gr(c), h, 0)
        )
        self.beta = pl.BlockSpec((None, None, HB, C), lambda b, h, c, s, f: (b, ch(c), h, 0))
        self.group_beta = pl.BlockSpec((None, S, HB, C), lambda b, h, c, s, f: (b, gr(c), h, 0))
        # saved states: one per group of stride chunks
        self.saved_state = pl.BlockSpec((None, None, HB, K, V), lambda b, h, c, s, f: (b, gr(c), h, 0, 0))
        self.seq_state = pl.BlockSpec((None, HB, K, V), lambda b, h, c, s, f: (b + s[ch(c)], h, 0, 0))
        # segment ranks (per batch row, shared by heads): a column and a row per chunk
        self.seg = [
            pl.BlockSpec((None, None, C, 1), lambda b, h, c, s, f: (b, ch(c), 0, 0)),
            pl.BlockSpec((None, None, 1, C), lambda b, h, c, s, f: (b, ch(c), 0, 0)),
        ]
        self.group_seg = [
            pl.BlockSpec((None, S, C, 1), lambda b, h, c, s, f: (b, gr(c), 0, 0)),
            pl.BlockSpec((None, S, 1, C), lambda b, h, c, s, f: (b, gr(c), 0, 0)),
        ]


def _params():
    return pltpu.CompilerParams(dimension_semantics=_SEMANTICS, vmem_limit_bytes=VMEM_LIMIT)


def _fwd(xs, h0, seq, flags, seg, *, scale, l2norm, save_states, stride, interpret, precision):
    q, k, v, g, beta = xs
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    NC, N, HB = Tp // pm.CHUNK, h0.shape[0], head_block(H)
    lay = _Layout(HB, NC, K, V, reverse=False, stride=stride)
    wide = [pltpu.VMEM((pm.CHUNK, HB, x.shape[-1]), _F32) for x in (q, k, v) if x.dtype != _F32]
    narrow_out = v.dtype != _F32
    out_specs = [lay.tok(V)] + ([lay.saved_state] if save_states else []) + [lay.seq_state]
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), v.dtype)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, NC // stride, H, K, V), pm.matmul_dtype(precision)))
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
        stride=stride,
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


def _bwd(xs, h0, seq, flags, seg, hs, do, dht, *, scale, l2norm, stride, restarts, interpret, precision):
    q, k, v, g, beta = xs
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    NC, HB = Tp // pm.CHUNK, head_block(H, stride, K, V, q.dtype.itemsize)
    lay = _Layout(HB, NC, K, V, reverse=True, stride=stride)
    wide = [pltpu.VMEM((pm.CHUNK, HB, x.shape[-1]), _F32) for x in (q, k, v, do) if x.dtype != _F32]
    narrow = [pltpu.VMEM((pm.CHUNK, HB, x.shape[-1]), _F32) for x in (q, k, v) if x.dtype != _F32]
    recompute = [pltpu.VMEM((stride - 1, HB, K, V), _F32)] if stride > 1 else []
    if restarts:
        recompute += [pltpu.VMEM((K, V), _F32), pltpu.SemaphoreType.DMA]
    sds = jax.ShapeDtypeStruct
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H // HB, NC),
        in_specs=[lay.group_tok(K), lay.group_tok(K), lay.group_tok(V), lay.group_tok(K), lay.group_beta]
        + [lay.saved_state, lay.tok(V), lay.seq_state]
        + ([pl.BlockSpec(memory_space=pl.ANY)] if restarts else [])
        + (lay.group_seg if seg else []),
        out_specs=[lay.tok(K), lay.tok(K), lay.tok(V), lay.tok(K), lay.beta, lay.seq_state],
        scratch_shapes=[pltpu.VMEM((HB, K, V), _F32)] + recompute + wide + narrow,
    )
    kernel = functools.partial(
        _bwd_kernel,
        scale=scale,
        segmented=bool(seg),
        l2norm=l2norm,
        stride=stride,
        restarts=restarts,
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
    )(seq, flags, q, k, v, g, beta, hs, do, dht, *((h0,) if restarts else ()), *seg)


def _to_groups(stride, xs, seq, flags, seg):
    """The differentiated pass runs on whole groups of `stride` chunks: zero chunks with no flags
    appended (they leave the state as it is; their gradients are dropped). A no-op where the
    chunk count is a multiple of the stride (T = 4096 and stride 4); the plain forward never pads."""
    NC = xs[0].shape[1] // pm.CHUNK
    extra = -NC % stride
    if not extra:
        return xs, seq, flags, seg
    pad = lambda x, axis: jnp.pad(
        x, [(0, extra * (pm.CHUNK if axis == "t" else 1)) if i == 1 else (0, 0) for i in range(x.ndim)]
    )
    *tok, beta = xs
    xs = tuple(pad(x, "t") for x in tok) + (pad(beta, "c"),)
    seq = jnp.pad(seq, (0, extra), mode="edge")
    flags = jnp.pad(flags, (0, extra))
    seg = tuple(pad(x, "c") for x in seg)
    return xs, seq, flags, seg


def _make_core(scale, l2norm, interpret, precision, stride, restarts):
    kw = dict(scale=scale, l2norm=l2norm, interpret=interpret, precision=precision, stride=stride)

    @jax.custom_vjp
    def core(xs, h0, seq, flags, seg, has):
        o, _, ht = _fwd(xs, h0, seq, flags, seg, save_states=False, **kw)
        return o, ht

    def core_fwd(xs, h0, seq, flags, seg, has):
        NC = xs[0].shape[1] // pm.CHUNK
        xs, seq, flags, seg = _to_groups(stride, xs, seq, flags, seg)
        o, hs, ht = _fwd(xs, h0, seq, flags, seg, save_states=True, **kw)
        return (o[:, : NC * pm.CHUNK], ht), (xs, h0, seq, flags, seg, has, hs)

    def core_bwd(res, cts):
        xs, h0, seq, flags, seg, has, hs = res
        do, dht = cts
        T = do.shape[1]
        do = jnp.pad(do, ((0, 0), (0, xs[0].shape[1] - T), (0, 0), (0, 0)))
        *dxs, dh0 = _bwd(xs, h0, seq, flags, seg, hs, do, dht.astype(_F32), restarts=restarts, **kw)
        dxs = [x[:, :T] for x in dxs[:4]] + [dxs[4][:, : T // pm.CHUNK]]
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
    state_stride=STATE_STRIDE,
):
    """KDA on Pallas TPU kernels; same contract as `kda_recurrent`.

    Returns `(o [B,T,H,V] in v.dtype, final_state [N,H,K,V] f32 or None)`; differentiable
    (custom VJP: forward and backward kernels). `interpret=True` runs the kernels in Pallas TPU
    interpret mode (`pltpu.InterpretParams()`) on any backend; an `InterpretParams` instance is
    passed through as is. `precision` (`_pallas_math.PRECISIONS`): "highest" (default) feeds the
    MXU float32 operands at full precision; "default" bf16 operands with float32 accumulation
    (one pass), and stores the per-chunk states `hs` in bf16 (they only enter the backward as
    matmul operands, so this rounds nothing the matmuls would not).

    `state_stride` (static int >= 1, default `STATE_STRIDE` = 4): under autodiff the forward saves
    the state entering every state_stride-th chunk only, and the backward recomputes the others
    from it (the same chunk step; 1 saves every chunk's). At Kimi's shape on a v5e, stride 4 takes
    forward+backward temporaries from 162 to 66 MiB ("default": 98 to 50) for +16% matmul work
    (docs/kernels.md). A stride whose backward windows fit VMEM at no head block is refused.
    """
    precision = pm.precision_name(precision)
    S = int(state_stride)
    if S < 1:
        raise ValueError(f"state_stride must be a positive int, got {state_stride!r}")
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
            seg = (r.reshape(B, NC, C, 1), r.reshape(B, NC, 1, C))
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
    S = min(S, NC)  # a short sequence is one group: nothing to pad
    core = _make_core(
        scale, bool(use_qk_l2norm), _interpret_arg(interpret), precision, S, S > 1 and cu_seqlens is not None
    )
    o, ht = core((q, k, v, g, beta), h0, seq, flags.astype(jnp.int32), seg, has)
    o = from_chunks(o)
    if not output_final_state:
        return o, None
    return o, jnp.where(has[:, None, None, None], ht, h0)  # empty sequences keep their initial state
