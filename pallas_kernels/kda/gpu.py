"""KDA as Pallas GPU kernels (Triton backend): chunk forward and backward, in a `jax.custom_vjp`.

    from pallas_kernels.kda.gpu import kda_pallas_gpu
    o, ht = kda_pallas_gpu(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, ht = kda_pallas_gpu(..., interpret=True)   # any backend (CPU CI), Pallas interpret mode

**Backend situation.** These kernels use `pl.pallas_call` with `BlockSpec`s and
`plt.CompilerParams` (`jax.experimental.pallas.triton`), i.e. Pallas's Triton lowering. JAX 0.11
deprecated that lowering (still shipped through 0.12); it is what runs on every NVIDIA GPU Colab
offers (T4/L4/A100) and on H100/H200, across the JAX range we support (0.10-0.12), and it runs
in interpret mode on CPU, so CI checks it. Its successors:

* **Mosaic GPU** (`plgpu.kernel`, `plgpu.emit_pipeline`, Hopper first, Ampere `mma` since
  0.11): the planned second GPU kernel behind the same `kda_pallas_gpu` entry point, written once
  a GPU machine is available to check it (interpret mode does not check Mosaic GPU lowering).
* **jax-triton** (optional `[gpu]` extra, imported lazily, never at module import): the route
  JAX recommends for hand-written Triton. It gives what Pallas does not: real Triton/Gluon
  kernels (fla's `chunk_kda` kernels run through `jax_triton.triton_call` as they are),
  autotuning, and TMA descriptors on Hopper/Blackwell. It has no autodiff, vmap or interpret
  mode, so it would sit behind this same custom_vjp, and it is not used by this module yet:
  `jax_triton_available()` only reports whether the extra is installed.
  `docs/kernels.md` has the removal plan.

**Kernel shape.** Grid `(B, H)`: one program per (batch, head) walks the chunks of its sequence
with a `fori_loop`, the running state `[K, V]` float32 carried in registers (the forward), or its
cotangent (the backward, chunks in reverse). Per chunk it runs the same math as the TPU kernels
(`_pallas_math.chunk_fwd` / `chunk_bwd`): 16-token sub-chunked pair matrices, the UT transform,
state step, output; the backward recomputes the intra-chunk part. Triton needs power-of-two
tensor sizes: K and V are zero-padded to a power of two >= 16 in the wrapper (exact).
Matmuls run in float32 with "ieee" input precision (no TF32): correctness first, speed is
measured by `tools/device/kda_gpu.py`.
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
NUM_WARPS = 8
NUM_STAGES = 1


def jax_triton_available() -> bool:
    """Whether the optional `[gpu]` extra (jax-triton) is importable; nothing is imported."""
    return importlib.util.find_spec("jax_triton") is not None


def _seg(rc_ref, rr_ref, c, rows):
    return (rc_ref[rows, :], rr_ref[c, :, :]) if rc_ref is not None else None


def _fwd_kernel(seq_ref, flags_ref, q_ref, k_ref, v_ref, G_ref, beta_ref, glc_ref, h0_ref, *refs,
                scale, num_chunks, K, V, segmented):
    rc_ref = rr_ref = None
    if segmented:
        rc_ref, rr_ref, *refs = refs
    o_ref, hs_ref, ht_ref = refs
    b = pl.program_id(0)
    hh = pl.program_id(1)
    C = pm.CHUNK

    def body(c, state):
        flags = flags_ref[c]
        n = b + seq_ref[c]
        h = jnp.where((flags & pm.START) != 0, h0_ref[n, hh, :, :], state)
        hs_ref[c, :, :] = h
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        o, h_next = pm.chunk_fwd(q_ref[rows, :].astype(_F32), k_ref[rows, :].astype(_F32),
                                 v_ref[rows, :].astype(_F32), G_ref[rows, :], beta_ref[rows, :],
                                 glc_ref[c, :, :], h, scale, _seg(rc_ref, rr_ref, c, rows))
        o_ref[rows, :] = o.astype(o_ref.dtype)

        @pl.when((flags & pm.END) != 0)
        def _():
            ht_ref[n, hh, :, :] = h_next

        return h_next

    lax.fori_loop(0, num_chunks, body, jnp.zeros((K, V), _F32))


def _bwd_kernel(seq_ref, flags_ref, q_ref, k_ref, v_ref, G_ref, beta_ref, glc_ref, hs_ref, do_ref,
                dht_ref, *refs, scale, num_chunks, K, V, segmented):
    rc_ref = rr_ref = None
    if segmented:
        rc_ref, rr_ref, *refs = refs
    dq_ref, dk_ref, dv_ref, dG_ref, dbeta_ref, dglc_ref, dh0_ref = refs
    b = pl.program_id(0)
    hh = pl.program_id(1)
    C = pm.CHUNK

    def body(i, dstate):
        c = num_chunks - 1 - i
        flags = flags_ref[c]
        n = b + seq_ref[c]
        dhn = jnp.where((flags & pm.END) != 0, dht_ref[n, hh, :, :], dstate)
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        dq, dk, dv, dG, dbeta, dglc, dh = pm.chunk_bwd(
            q_ref[rows, :].astype(_F32), k_ref[rows, :].astype(_F32), v_ref[rows, :].astype(_F32),
            G_ref[rows, :], beta_ref[rows, :], glc_ref[c, :, :], hs_ref[c, :, :],
            do_ref[rows, :], dhn, scale, _seg(rc_ref, rr_ref, c, rows))
        dq_ref[rows, :] = dq
        dk_ref[rows, :] = dk
        dv_ref[rows, :] = dv
        dG_ref[rows, :] = dG
        dbeta_ref[rows, :] = dbeta
        dglc_ref[c, :, :] = dglc

        @pl.when((flags & pm.START) != 0)
        def _():
            dh0_ref[n, hh, :, :] = dh

        return dh

    lax.fori_loop(0, num_chunks, body, jnp.zeros((K, V), _F32))


def _bh(*block):
    """Whole per-(batch, head) slab: leading two dims squeezed, the rest full."""
    return pl.BlockSpec((None, None) + block, lambda b, h: (b, h) + (0,) * len(block))


def _b(*block):
    """Whole per-batch-row slab (segment ranks are shared by the heads)."""
    return pl.BlockSpec((None,) + block, lambda b, h: (b,) + (0,) * len(block))


def _whole(shape):
    return pl.BlockSpec(shape, lambda b, h: (0,) * len(shape))


def _params():
    return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _fwd(ch: pm.Chunked, scale, *, interpret):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    NC = Tp // pm.CHUNK
    N = ch.h0.shape[0]
    segmented = ch.rc is not None
    kernel = functools.partial(_fwd_kernel, scale=scale, num_chunks=NC, K=K, V=V,
                               segmented=segmented)
    seg_specs = [_b(Tp, 1), _b(NC, 1, pm.CHUNK)] if segmented else []
    seg_args = (ch.rc, ch.rr) if segmented else ()
    return pl.pallas_call(
        kernel,
        grid=(B, H),
        in_specs=[_whole((NC,)), _whole((NC,)), _bh(Tp, K), _bh(Tp, K), _bh(Tp, V), _bh(Tp, K),
                  _bh(Tp, 1), _bh(NC, K, 1), _whole((N, H, K, V))] + seg_specs,
        out_specs=[_bh(Tp, V), _bh(NC, K, V), _whole((N, H, K, V))],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, V), ch.v.dtype),
                   jax.ShapeDtypeStruct((B, H, NC, K, V), _F32),
                   jax.ShapeDtypeStruct((N, H, K, V), _F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_chunk_fwd_gpu",
    )(ch.seq, ch.flags, ch.q, ch.k, ch.v, ch.G, ch.beta, ch.glc, ch.h0, *seg_args)


def _bwd(ch: pm.Chunked, hs, do, dht, scale, *, interpret):
    B, H, Tp, K = ch.q.shape
    V = ch.v.shape[-1]
    NC = Tp // pm.CHUNK
    N = ch.h0.shape[0]
    segmented = ch.rc is not None
    kernel = functools.partial(_bwd_kernel, scale=scale, num_chunks=NC, K=K, V=V,
                               segmented=segmented)
    seg_specs = [_b(Tp, 1), _b(NC, 1, pm.CHUNK)] if segmented else []
    seg_args = (ch.rc, ch.rr) if segmented else ()
    f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    return pl.pallas_call(
        kernel,
        grid=(B, H),
        in_specs=[_whole((NC,)), _whole((NC,)), _bh(Tp, K), _bh(Tp, K), _bh(Tp, V), _bh(Tp, K),
                  _bh(Tp, 1), _bh(NC, K, 1), _bh(NC, K, V), _bh(Tp, V), _whole((N, H, K, V))]
        + seg_specs,
        out_specs=[_bh(Tp, K), _bh(Tp, K), _bh(Tp, V), _bh(Tp, K), _bh(Tp, 1), _bh(NC, K, 1),
                   _whole((N, H, K, V))],
        out_shape=[f32(B, H, Tp, K), f32(B, H, Tp, K), f32(B, H, Tp, V), f32(B, H, Tp, K),
                   f32(B, H, Tp, 1), f32(B, H, NC, K, 1), f32(N, H, K, V)],
        compiler_params=_params(),
        interpret=interpret,
        name="kda_chunk_bwd_gpu",
    )(ch.seq, ch.flags, ch.q, ch.k, ch.v, ch.G, ch.beta, ch.glc, hs, do, dht, *seg_args)


def kda_pallas_gpu(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, segment_ids=None, use_qk_l2norm=False, interpret=False):
    """KDA on Pallas GPU (Triton backend) kernels; same contract as `kda_recurrent`.

    Returns `(o [B,T,H,V] in v.dtype, final_state [N,H,K,V] f32 or None)`; differentiable
    (custom VJP: forward and backward kernels). `interpret=True` runs the kernels in Pallas
    interpret mode on any backend.
    """
    return pm.kda_pallas(
        q, k, v, g, beta,
        fwd=functools.partial(_fwd, interpret=interpret),
        bwd=functools.partial(_bwd, interpret=interpret),
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm,
        pad_kv_to=pm.next_pow2_min16, name="kda_pallas_gpu")
