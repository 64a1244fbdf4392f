"""Attention on GPU: cuDNN's fused flash attention where it takes the problem, else the blockwise
path.

    from pallas_kernels.attention.gpu import attention_gpu, cudnn_fits

`jax.nn.dot_product_attention(implementation="cudnn")` computes softmax(q k^T) v without the
[T,S] scores in HBM, forward and backward, for bf16/fp16 inputs with GQA. It has no per-row query
offsets, key parts, `kv_rows` or change-point segment ids, and wants keys and values of one shape;
v narrower than k (MLA: 192 vs 128) is zero-padded to k's head dim and the output sliced back
(the padded columns of p v are zero). Anything else, or a backend other than GPU, runs
`blockwise_attention`. No GPU has checked this path yet: tools/device/ holds no script for it
(docs/kernels.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import common as c
from pallas_kernels.attention.blockwise import blockwise_attention

__all__ = ["attention_gpu", "cudnn_fits"]

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256


def cudnn_fits(
    q, k, v, *, segment_ids=None, q_offset=None, kv_length=None, kv_rows=None, backend=None
) -> bool:
    """Whether cuDNN's fused attention can run this call (shapes, dtypes and masks only)."""
    parts = c.key_parts(k)
    return (
        (backend or jax.default_backend()) == "gpu"
        and len(parts) == 1
        and parts[0].ndim == 4
        and v.ndim == 4
        and q.dtype in CUDNN_DTYPES
        and parts[0].dtype == q.dtype == v.dtype
        and v.shape[-1] <= q.shape[-1] <= CUDNN_MAX_HEAD_DIM
        and q.shape[-1] % 8 == 0
        and segment_ids is None
        and q_offset is None
        and kv_length is None
        and kv_rows is None
    )


def attention_gpu(
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
    **blocks,
):
    """Attention on GPU; arguments as `pallas_kernels.attention.attention`. o in v's dtype."""
    kw = dict(segment_ids=segment_ids, q_offset=q_offset, kv_length=kv_length, kv_rows=kv_rows)
    c.problem(q, k, v, scale=scale, causal=causal, **kw)  # same argument checks on every path
    if not cudnn_fits(q, k, v, **kw):
        return blockwise_attention(q, k, v, scale=scale, causal=causal, **kw, **blocks)
    K, V = q.shape[-1], v.shape[-1]
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, K - V)))
    scale = None if scale is None else float(scale)
    o = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, is_causal=causal, implementation="cudnn")
    return o[..., :V]
