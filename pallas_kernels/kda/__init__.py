"""Kimi Delta Attention (KDA): a gated delta rule with a per-channel forget gate.

    from pallas_kernels.kda import kda
    o, final_state = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)

q,k,g `[B,T,H,K]`, v `[B,T,H,V]`, g is the log-space decay (<= 0), beta `[B,T,H]`, state
`[N,H,K,V]` float32. With `cu_seqlens` (packed varlen, B == 1) N = len(cu_seqlens) - 1 and every
sequence has its own initial and final state. With `segment_ids` `[B,T]` the state resets to zero
wherever the id differs from the previous token's (packed training rows): ids mark change points,
so a reused id (`[0,0,1,1,0,0]`) starts a new document; initial/final state are per row.

Implementations (`impl`):
  "recurrent"  lax.scan over tokens: the ground truth (and `kda_step`, the decode step)
  "chunk"      pure-JAX chunkwise form with a recompute-based custom VJP (any backend)
  "pallas_tpu" Pallas Mosaic TPU kernels, forward and backward
  "pallas_gpu" Pallas GPU (Triton backend) kernels, forward and backward
  "auto"       the TPU kernel on TPU, the pure-JAX chunk elsewhere (the GPU kernel has no
               measured speed yet, see docs/kernels.md)
`kda_context(..., axis_name=)` is the same op on a sequence split over a mesh axis (context
parallelism; inside `shard_map`, see context.py).
`interpret=True` runs either Pallas kernel in interpret mode on any backend (CPU tests).
`precision` ("highest" | "default", or lax.Precision.HIGHEST / DEFAULT) sets the Pallas kernels'
in-kernel matmuls: "highest" (the default) float32 operands at full precision, "default" bf16
operands with float32 accumulation, as DEFAULT treats float32 on a TPU (docs/kernels.md has the
tolerance it is tested to). The other impls compute at full precision and take "highest" only.
`state_stride` (pallas_tpu only; None: its default, 4) saves every state_stride-th chunk state for
the backward and recomputes the rest (less HBM for more matmul work; docs/kernels.md).
"""

from __future__ import annotations

import jax

from pallas_kernels.kda._pallas_math import precision_name
from pallas_kernels.kda.chunk import kda_chunk
from pallas_kernels.kda.common import l2_normalize
from pallas_kernels.kda.context import kda_context
from pallas_kernels.kda.reference import kda_recurrent, kda_step

IMPLS = ("auto", "recurrent", "chunk", "pallas_tpu", "pallas_gpu")

__all__ = ["kda", "kda_context", "kda_recurrent", "kda_step", "l2_normalize", "IMPLS", "resolve_impl"]


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` stands for on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"kda: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "pallas_tpu" if jax.default_backend() == "tpu" else "chunk"


def kda(
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
    use_qk_l2norm=False,
    impl="auto",
    segment_ids=None,
    interpret=False,
    precision="highest",
    state_stride=None,
):
    """KDA over a sequence; returns `(o [B,T,H,V] in v's dtype, final_state [N,H,K,V] f32 or None)`."""
    requested = impl
    impl = resolve_impl(impl)
    if interpret and not impl.startswith("pallas"):
        raise ValueError(f"kda: interpret=True applies to the Pallas kernels only, not impl={impl!r}")
    precision = precision_name(precision)
    if precision != "highest" and not impl.startswith("pallas"):
        raise ValueError(
            f"kda: precision={precision!r} applies to the Pallas kernels only; impl={requested!r} "
            f"runs {impl!r} on {jax.default_backend()}, which computes at full precision"
        )
    if state_stride is not None and impl != "pallas_tpu":
        raise ValueError(
            f"kda: state_stride applies to the Pallas TPU kernel only; impl={requested!r} runs {impl!r} "
            f"on {jax.default_backend()}, which saves no per-chunk states to thin out"
        )
    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
    )
    if impl == "recurrent":
        return kda_recurrent(q, k, v, g, beta, **kwargs)
    if impl == "chunk":
        return kda_chunk(q, k, v, g, beta, **kwargs)
    if impl == "pallas_tpu":
        from pallas_kernels.kda.tpu import kda_pallas_tpu  # noqa: PLC0415 (TPU-only Pallas backend, lazy)

        if state_stride is not None:
            kwargs["state_stride"] = state_stride
        return kda_pallas_tpu(q, k, v, g, beta, interpret=interpret, precision=precision, **kwargs)
    from pallas_kernels.kda.gpu import kda_pallas_gpu  # noqa: PLC0415 (GPU-only Pallas backend, lazy)

    return kda_pallas_gpu(q, k, v, g, beta, interpret=interpret, precision=precision, **kwargs)
