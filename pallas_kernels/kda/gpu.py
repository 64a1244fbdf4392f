"""KDA as Pallas GPU kernels (Triton backend): chunk forward and backward, in a `jax.custom_vjp`.

    from pallas_kernels.kda.gpu import kda_pallas_gpu
    o, ht = kda_pallas_gpu(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, ht = kda_pallas_gpu(..., interpret=True)   # any backend (CPU CI), Pallas interpret mode

**Backend situation.** These kernels use `pl.pallas_call` with `BlockSpec`s and
`plt.CompilerParams` (`jax.experimental.pallas.triton`), i.e. Pallas's Triton lowering. JAX 0.11
deprecated that lowering, but every JAX release we support (0.10-0.12) ships it; Triton targets
every NVIDIA GPU Colab offers (T4/L4/A100) as well as H100/H200, where Mosaic GPU is Hopper-first;
and it runs in interpret mode on CPU, so CI checks it. Its successors:

* **Mosaic GPU** (`plgpu.kernel`, `plgpu.emit_pipeline`, Hopper first, Ampere `mma` since
  0.11): the planned second GPU kernel behind the same `kda_pallas_gpu` entry point, written once
  a GPU machine is available to check it (interpret mode does not check Mosaic GPU lowering).
* **jax-triton** (optional `[gpu]` extra, imported lazily, never at module import): the route
  JAX recommends for hand-written Triton. It gives what Pallas does not: real Triton/Gluon
  kernels (fla's `chunk_kda` Triton kernels could be launched with `jax_triton.triton_call`
  with little change, minus their torch-side autotune wrappers), Triton autotuning, and TMA
  descriptors on Hopper/Blackwell. It has no autodiff, vmap or interpret
  mode, so it would sit behind this same custom_vjp, and it is not used by this module yet:
  `jax_triton_available()` only reports whether the extra is installed.
  `docs/kernels.md` has the removal plan.

**Kernel shape** (five `pallas_call`s, the split fla uses, so that only the cheap part is
sequential):

1. `kda_chunk_intra_gpu`, grid (B, H, NC), all parallel: per 64-token chunk the 16-token
   sub-chunked pair matrices, the UT transform `T = (I + diag(beta) P)^-1` and
   W, U, A (= scaled q-k scores), qg, kd and the chunk decay (`_pallas_math.chunk_intra`).
2. `kda_state_fwd_gpu`, grid (B, H, V/BV): one program walks the chunks with a `fori_loop`, its
   [K, BV] slice of the float32 state carried in registers: D = U - W h, o = qg h + A D,
   h' = decay h + kd^T D (column-separable in V). Stores each chunk's initial state `hs`.
3. Backward: the intra kernel again (recompute), then `kda_state_bwd_gpu` (grid (B, H, V/BV),
   chunks in reverse) carries the state cotangent and stores it per chunk, then two parallel
   kernels over (B, H, NC): `kda_state_grads_gpu` (`_pallas_math.chunk_bwd_state`: the products
   over V, matmuls only) and `kda_chunk_grads_gpu` (`_pallas_math.chunk_bwd_intra`: every input
   gradient of the chunk from its inputs and those products). One kernel for both asked 320 KiB
   of shared memory on an H200 at K = V = 128 (a block may have 227 KiB).

With `use_qk_l2norm` the intra and grads kernels normalise q/k rows in-kernel (and apply the
norm's VJP). Triton needs power-of-two tensor sizes: K and V are zero-padded to a power of two >= 16 in the
wrapper (exact). `precision="highest"` (default) keeps the matmul operands float32: Triton's
TF32x3 (three TF32 tensor-core passes) in every kernel but the intra one, IEEE there;
`precision="default"` gives them bf16 operands with float32 accumulation (tensor cores). Both
were checked against the XLA path on an H200 (docs/kernels.md); speed is measured by
`tools/device/kda_gpu.py`, and no run has timed it yet.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.kda import _pallas_math as pm

__all__ = ["kda_pallas_gpu", "jax_triton_available"]

_F32 = jnp.float32
NUM_WARPS = 8  # not tuned: no GPU has run this yet
NUM_STAGES = 1


def jax_triton_available() -> bool:
    """Whether the optional `[gpu]` extra (jax-triton) is importable; nothing is imported."""
    return importlib.util.find_spec("jax_triton") is not None


BLOCK_V = 64  # widest V slice per program of the sequential state passes
MIN_STATE_PROGRAMS = 128  # about one program per SM of an H100/H200 (132 SMs)


def state_block_v(B: int, H: int, V: int) -> int:
    """V slice per program of the sequential state passes: BLOCK_V, halved (down to 16, Triton's
    smallest dot dim) while B * H * V / slice gives fewer than MIN_STATE_PROGRAMS programs. At
    B = 1, H = 32, V = 128 (Kimi Linear, one row) that is 32: 128 programs instead of 64, each
    carrying a [128, 32] f32 state slice (the carry alone: 16 registers a thread at 8 warps instead
    of 32; compiled whole, 172 instead of 221 under "default", tools/gpu_ptxas.py)."""
    bv = min(BLOCK_V, V)
    while bv > 16 and B * H * (V // bv) < MIN_STATE_PROGRAMS:
        bv //= 2
    return bv


def _chunk_refs(refs, segmented):
    """Split the per-chunk input refs (q, k, v, G, beta, glc[, rc, rr]) from the rest."""
    n = 8 if segmented else 6
    ins, rest = refs[:n], refs[n:]
    q, k, v, G, beta, glc = (r[...] for r in ins[:6])
    seg = (ins[6][...], ins[7][...]) if segmented else None
    return (q.astype(_F32), k.astype(_F32), v.astype(_F32), G, beta, glc, seg), rest


def _is_fast(flags_ref):
    """The chunk's FAST flag (`pm.factorisable_flags`), for grids (B, H, NC)."""
    return (flags_ref[pl.program_id(2)] & pm.FAST) != 0


def _intra_kernel_body(flags_ref, *refs, scale, segmented, l2norm):
    """Grid (B, H, NC), all parallel: the state-independent part of one chunk."""
    (q, k, v, G, beta, glc, seg), outs = _chunk_refs(refs, segmented)
    pm.store(outs, pm.chunk_intra(q, k, v, G, beta, glc, scale, seg, l2norm, fast=_is_fast(flags_ref)))


def _state_fwd_kernel_body(
    seq_ref,
    flags_ref,
    W_ref,
    U_ref,
    A_ref,
    qg_ref,
    kd_ref,
    decay_ref,
    h0_ref,
    o_ref,
    hs_ref,
    ht_ref,
    *,
    num_chunks,
    K,
    BV,
):
    """Grid (B, H, V/BV): one program walks all chunks of one (batch, head, V-slice)."""
    b, hh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    C = pm.CHUNK
    cols = pl.ds(pl.multiple_of(vb * BV, BV), BV)

    def body(c, state):
        flags = flags_ref[c]
        n = b + seq_ref[c]
        h = jnp.where((flags & pm.START) != 0, h0_ref[n, hh, :, cols], state)
        hs_ref[c, :, :] = h.astype(hs_ref.dtype)
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        o, h_next = pm.state_fwd_step(
            W_ref[rows, :],
            U_ref[rows, :],
            A_ref[rows, :],
            qg_ref[rows, :],
            kd_ref[rows, :],
            decay_ref[c, :, :],
            h,
        )
        o_ref[rows, :] = o.astype(o_ref.dtype)

        @pl.when((flags & pm.END) != 0)
        def _():
            ht_ref[n, hh, :, cols] = h_next

        return h_next

    lax.fori_loop(0, num_chunks, body, jnp.zeros((K, BV), _F32))


def _state_bwd_kernel_body(
    seq_ref,
    flags_ref,
    W_ref,
    A_ref,
    qg_ref,
    kd_ref,
    decay_ref,
    do_ref,
    dht_ref,
    dhs_ref,
    dh0_ref,
    *,
    num_chunks,
    K,
    BV,
):
    """Grid (B, H, V/BV), chunks in reverse: dhs[c] = cotangent of the state after chunk c."""
    b, hh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    C = pm.CHUNK
    cols = pl.ds(pl.multiple_of(vb * BV, BV), BV)

    def body(i, dstate):
        c = num_chunks - 1 - i
        flags = flags_ref[c]
        n = b + seq_ref[c]
        dhn = jnp.where((flags & pm.END) != 0, dht_ref[n, hh, :, cols], dstate)
        dhs_ref[c, :, :] = dhn.astype(dhs_ref.dtype)
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        dh = pm.state_bwd_step(
            W_ref[rows, :],
            A_ref[rows, :],
            qg_ref[rows, :],
            kd_ref[rows, :],
            decay_ref[c, :, :],
            do_ref[rows, :].astype(_F32),
            dhn,
        )

        @pl.when((flags & pm.START) != 0)
        def _():
            dh0_ref[n, hh, :, cols] = dh

        return dh

    lax.fori_loop(0, num_chunks, body, jnp.zeros((K, BV), _F32))


def _state_grads_kernel_body(*refs):
    """Grid (B, H, NC), all parallel: the V side of one chunk's backward (`pm.chunk_bwd_state`:
    matmuls only) from the intra part's W, U, A, kd, decay, the chunk's initial state, do and
    the cotangent of the state after the chunk."""
    ins, outs = refs[:8], refs[8:]
    pm.store(outs, pm.chunk_bwd_state(*(r[...].astype(_F32) for r in ins)))


def _grads_kernel_body(flags_ref, *refs, scale, segmented, l2norm):
    """Grid (B, H, NC), all parallel: every input gradient of one chunk from its inputs and its
    `pm.StateGrads` (the intra part is recomputed). Apart from the state side, so that neither
    kernel holds the [K, V] states and the pair-matrix gradients at once: whole, the backward
    asked 320 KiB of shared memory at K = V = 128 under "highest" (an H200 block has 227 KiB)."""
    (q, k, v, G, beta, glc, seg), rest = _chunk_refs(refs, segmented)
    sg = pm.StateGrads(*(r[...] for r in rest[:5]), dglc=None)
    grads = pm.chunk_bwd_intra(q, k, v, G, beta, glc, sg, scale, seg, l2norm, fast=_is_fast(flags_ref))
    pm.store(rest[5:], grads)


_intra_kernel = pm.with_precision(_intra_kernel_body)
_state_fwd_kernel = pm.with_precision(_state_fwd_kernel_body)
_state_bwd_kernel = pm.with_precision(_state_bwd_kernel_body)
_state_grads_kernel = pm.with_precision(_state_grads_kernel_body)
_grads_kernel = pm.with_precision(_grads_kernel_body)


# BlockSpecs --------------------------------------------------------------------------------------


def _chunk_spec(width):
    """[B,H,Tp,width] -> one chunk (64 rows) per (b, h, c)."""
    return pl.BlockSpec((None, None, pm.CHUNK, width), lambda b, h, c: (b, h, c, 0))


def _per_chunk_spec(*block):
    """[B,H,NC,*block] -> one chunk's entry per (b, h, c)."""
    return pl.BlockSpec((None, None, None) + block, lambda b, h, c: (b, h, c) + (0,) * len(block))


def _chunk_input_specs(K, V, segmented):
    C = pm.CHUNK
    specs = [
        _chunk_spec(K),
        _chunk_spec(K),
        _chunk_spec(V),
        _chunk_spec(K),
        _chunk_spec(1),
        _per_chunk_spec(K, 1),
    ]
    if segmented:  # segment ranks are per batch row, shared by the heads
        specs += [
            pl.BlockSpec((None, C, 1), lambda b, h, c: (b, c, 0)),
            pl.BlockSpec((None, None, 1, C), lambda b, h, c: (b, c, 0, 0)),
        ]
    return specs


def _chunk_inputs(ch: pm.Chunked):
    seg = (ch.rc, ch.rr) if ch.rc is not None else ()
    return (ch.q, ch.k, ch.v, ch.G, ch.beta, ch.glc) + seg


def _seq_spec(*block):
    """[B,H,*block] -> the whole slab of one (b, h), for programs that walk the chunks."""
    return pl.BlockSpec((None, None) + block, lambda b, h, vb: (b, h) + (0,) * len(block))


def _seq_vspec(*block, BV):
    """[B,H,*block] with V last -> one (b, h) and one V-slice."""
    nd = len(block)
    return pl.BlockSpec((None, None) + block[:-1] + (BV,), lambda b, h, vb: (b, h) + (0,) * (nd - 1) + (vb,))


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _params():
    return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _tf32x3(interpret):
    """The float32-operand ("highest") dots of every kernel but the intra one: Triton's TF32x3,
    three TF32 tensor-core passes, about float32 accuracy. As IEEE FMA dots the grads kernels ask
    for more shared memory than an H100/H200 block has (240 KiB each at K = V = 128, offline;
    320 KiB on an H200 before the grads kernel was split), and FMA dots run on CUDA cores. The
    intra kernel keeps IEEE: as TF32x3 it would ask 320 KiB (96 KiB as IEEE). Interpret mode
    keeps IEEE too: XLA:CPU has no TF32x3."""
    return None if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _intra(ch: pm.Chunked, scale, l2norm, interpret, precision):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    C = pm.CHUNK
    NC = Tp // C
    segmented = ch.rc is not None
    f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    mm = lambda *s: jax.ShapeDtypeStruct(s, pm.matmul_dtype(precision))
    return pl.pallas_call(
        functools.partial(
            _intra_kernel, scale=scale, segmented=segmented, l2norm=l2norm, precision=precision
        ),
        grid=(B, H, NC),
        in_specs=[_whole((NC,))] + _chunk_input_specs(K, V, segmented),
        out_specs=[
            _chunk_spec(K),
            _chunk_spec(V),
            _chunk_spec(C),
            _chunk_spec(K),
            _chunk_spec(K),
            _per_chunk_spec(K, 1),
        ],
        # W, U, A, qg, kd only enter the state passes as matmul operands: stored in that dtype
        out_shape=[mm(B, H, Tp, K), mm(B, H, Tp, V), mm(B, H, Tp, C), mm(B, H, Tp, K), mm(B, H, Tp, K)]
        + [f32(B, H, NC, K, 1)],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_chunk_intra_gpu",
    )(ch.flags, *_chunk_inputs(ch))


def _fwd(ch: pm.Chunked, scale, l2norm, *, interpret, precision):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    C = pm.CHUNK
    NC = Tp // C
    N = ch.h0.shape[0]
    BV = state_block_v(B, H, V)
    W, U, A, qg, kd, decay = _intra(ch, scale, l2norm, interpret, precision)
    return pl.pallas_call(
        functools.partial(
            _state_fwd_kernel, num_chunks=NC, K=K, BV=BV, precision=precision, f32_dot=_tf32x3(interpret)
        ),
        grid=(B, H, V // BV),
        in_specs=[
            _whole((NC,)),
            _whole((NC,)),
            _seq_spec(Tp, K),
            _seq_vspec(Tp, V, BV=BV),
            _seq_spec(Tp, C),
            _seq_spec(Tp, K),
            _seq_spec(Tp, K),
            _seq_spec(NC, K, 1),
            _whole((N, H, K, V)),
        ],
        out_specs=[_seq_vspec(Tp, V, BV=BV), _seq_vspec(NC, K, V, BV=BV), _whole((N, H, K, V))],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, V), ch.v.dtype),
            jax.ShapeDtypeStruct((B, H, NC, K, V), pm.matmul_dtype(precision)),
            jax.ShapeDtypeStruct((N, H, K, V), _F32),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_state_fwd_gpu",
    )(ch.seq, ch.flags, W, U, A, qg, kd, decay, ch.h0)


def _bwd(ch: pm.Chunked, hs, do, dht, scale, l2norm, *, interpret, precision):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    C = pm.CHUNK
    NC = Tp // C
    N = ch.h0.shape[0]
    BV = state_block_v(B, H, V)
    segmented = ch.rc is not None
    f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    W, U, A, qg, kd, decay = _intra(ch, scale, l2norm, interpret, precision)  # recomputed
    dhs, dh0 = pl.pallas_call(
        functools.partial(
            _state_bwd_kernel, num_chunks=NC, K=K, BV=BV, precision=precision, f32_dot=_tf32x3(interpret)
        ),
        grid=(B, H, V // BV),
        in_specs=[
            _whole((NC,)),
            _whole((NC,)),
            _seq_spec(Tp, K),
            _seq_spec(Tp, C),
            _seq_spec(Tp, K),
            _seq_spec(Tp, K),
            _seq_spec(NC, K, 1),
            _seq_vspec(Tp, V, BV=BV),
            _whole((N, H, K, V)),
        ],
        out_specs=[_seq_vspec(NC, K, V, BV=BV), _whole((N, H, K, V))],
        out_shape=[jax.ShapeDtypeStruct((B, H, NC, K, V), pm.matmul_dtype(precision)), f32(N, H, K, V)],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_state_bwd_gpu",
    )(ch.seq, ch.flags, W, A, qg, kd, decay, do, dht)
    dD, dA, dW, dqh, dkd, dglc = pl.pallas_call(
        functools.partial(_state_grads_kernel, precision=precision, f32_dot=_tf32x3(interpret)),
        grid=(B, H, NC),
        in_specs=[
            _chunk_spec(K),
            _chunk_spec(V),
            _chunk_spec(C),
            _chunk_spec(K),
            _per_chunk_spec(K, 1),
            _per_chunk_spec(K, V),
            _chunk_spec(V),
            _per_chunk_spec(K, V),
        ],
        out_specs=[
            _chunk_spec(V),
            _chunk_spec(C),
            _chunk_spec(K),
            _chunk_spec(K),
            _chunk_spec(K),
            _per_chunk_spec(K, 1),
        ],
        out_shape=[
            f32(B, H, Tp, V),
            f32(B, H, Tp, C),
            f32(B, H, Tp, K),
            f32(B, H, Tp, K),
            f32(B, H, Tp, K),
            f32(B, H, NC, K, 1),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_state_grads_gpu",
    )(W, U, A, kd, decay, hs, do, dhs)
    dq, dk, dv, dG, dbeta = pl.pallas_call(
        functools.partial(
            _grads_kernel,
            scale=scale,
            segmented=segmented,
            l2norm=l2norm,
            precision=precision,
            f32_dot=_tf32x3(interpret),
        ),
        grid=(B, H, NC),
        in_specs=[_whole((NC,))]
        + _chunk_input_specs(K, V, segmented)
        + [_chunk_spec(V), _chunk_spec(C), _chunk_spec(K), _chunk_spec(K), _chunk_spec(K)],
        out_specs=[
            _chunk_spec(K),
            _chunk_spec(K),
            _chunk_spec(V),
            _chunk_spec(K),
            _chunk_spec(1),
        ],
        out_shape=[
            f32(B, H, Tp, K),
            f32(B, H, Tp, K),
            f32(B, H, Tp, V),
            f32(B, H, Tp, K),
            f32(B, H, Tp, 1),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_chunk_grads_gpu",
    )(ch.flags, *_chunk_inputs(ch), dD, dA, dW, dqh, dkd)
    return dq, dk, dv, dG, dbeta, dglc, dh0


def kda_pallas_gpu(
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
    """KDA on Pallas GPU (Triton backend) kernels; same contract as `kda_recurrent`.

    Returns `(o [B,T,H,V] in v.dtype, final_state [N,H,K,V] f32 or None)`; differentiable
    (custom VJP: forward and backward kernels). `interpret=True` runs the kernels in Pallas
    interpret mode on any backend. `precision` (`_pallas_math.PRECISIONS`): "highest" (default)
    runs the in-kernel data matmuls on float32 operands (TF32x3 on tensor cores, IEEE in the
    intra kernel and in interpret mode); "default" on bf16
    operands with float32 accumulation (tensor cores) and stores the per-chunk states `hs` and
    their cotangents in bf16 (they only enter the backward as matmul operands).
    """
    return pm.kda_pallas(
        q,
        k,
        v,
        g,
        beta,
        fwd=functools.partial(_fwd, interpret=interpret, precision=pm.precision_name(precision)),
        bwd=functools.partial(_bwd, interpret=interpret, precision=pm.precision_name(precision)),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
        pad_kv_to=pm.next_pow2_min16,
        name="kda_pallas_gpu",
    )
