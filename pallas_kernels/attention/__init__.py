"""Softmax attention in O(T) memory: blockwise online softmax (flash-style), forward and backward.

    from pallas_kernels.attention import attention
    o = attention(q, k, v, causal=True, segment_ids=seg)                 # training / prefill
    o = attention(q, (latent, k_rope), latent, q_offset=pos, kv_length=pos + T)   # cached append

q `[B,T,H,K]`; k `[B,S,G,K]`, or a tuple of key parts `[B,S,G,K_i]` whose features concatenate
to K (read in place: a cache split into latent and rope parts is never concatenated); v
`[B,S,G,V]` (V may differ from K); H a multiple of G (GQA; G = 1 is MQA). Query t of row b sits at
position `q_offset[b] + t` (default 0) and sees key s iff `s < kv_length[b]` (default S),
`s <= q_offset[b] + t` when `causal`, and, with `segment_ids` [B,S] (the keys'; query t has that of
key q_offset[b] + t, so without an offset S == T: self-attention), both are in the same document:
ids mark change points (`[0,0,1,1,0,0]` is three documents). Context parallelism passes a span of
queries at its offset against the whole sequence's keys and ids. With
`kv_rows` [B], query row b reads row kv_rows[b] of k/v (`[B_kv,S,...]`): a group of a decode
cache's rows, read in place. k/v may be `[B,S,K]`/`[B,S,V]`: one kv head without a unit axis. Scores,
softmax statistics and accumulation are float32 whatever the input dtype; o is in v's dtype; a
query that sees no key gets 0.

Implementations (`impl`):
  "reference"  dense softmax over [B,H,T,S] float32 scores: ground truth, small shapes only
  "blockwise"  pure JAX, online softmax over key blocks, custom VJP with a blockwise backward;
               key blocks past every query's reach are never read (any backend)
  "pallas_tpu" Pallas Mosaic TPU kernels, forward and backward
  "gpu"        `jax.nn.dot_product_attention(implementation="cudnn")` where cuDNN takes the
               call (bf16/fp16, one key part, V <= K <= 256 with v zero-padded to K, plain
               causal or no mask: no segment ids, offsets, lengths or kv_rows; see
               `gpu.cudnn_fits`), the blockwise path otherwise
  "auto"       pallas_tpu on TPU, gpu on GPU, blockwise elsewhere
`interpret=True` runs the Pallas TPU kernels in interpret mode on any backend (CPU tests).

`attention_lse` also returns each query's log-sum-exp (differentiable), for q over one span of
keys with documents as indices: spans combine as `sum_j softmax_j(lse_j) o_j` (context
parallelism, one span's K/V at a time). "pallas_tpu" runs the TPU kernels; every other impl the
blockwise path (cuDNN returns no lse through JAX).
"""

from __future__ import annotations

import jax

from pallas_kernels.attention.blockwise import blockwise_attention, blockwise_attention_lse
from pallas_kernels.attention.gpu import attention_gpu
from pallas_kernels.attention.reference import attention_reference

IMPLS = ("auto", "reference", "blockwise", "pallas_tpu", "gpu")

__all__ = [
    "attention",
    "attention_lse",
    "attention_reference",
    "blockwise_attention",
    "blockwise_attention_lse",
    "IMPLS",
    "resolve_impl",
]


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` stands for on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return {"tpu": "pallas_tpu", "gpu": "gpu"}.get(jax.default_backend(), "blockwise")


def attention(
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
    impl="auto",
    block_q=None,
    block_k=None,
    interpret=False,
):
    """Attention of q over k/v; returns o `[B,T,H,V]` in v's dtype. See the module docstring."""
    impl = resolve_impl(impl)
    if interpret and impl != "pallas_tpu":
        raise ValueError(f"attention: interpret=True applies to the Pallas kernels only, not impl={impl!r}")
    kwargs = dict(
        scale=scale,
        causal=causal,
        segment_ids=segment_ids,
        q_offset=q_offset,
        kv_length=kv_length,
        kv_rows=kv_rows,
    )
    blocks = {k_: b for k_, b in (("block_q", block_q), ("block_k", block_k)) if b is not None}
    if impl == "reference":
        return attention_reference(q, k, v, **kwargs)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, **kwargs, **blocks)
    if impl == "pallas_tpu":
        from pallas_kernels.attention.tpu import attention_pallas_tpu  # noqa: PLC0415 (TPU-only Pallas backend, lazy)

        return attention_pallas_tpu(q, k, v, **kwargs, **blocks, interpret=interpret)
    return attention_gpu(q, k, v, **kwargs, **blocks)


def attention_lse(
    q,
    k,
    v,
    *,
    q_doc=None,
    k_doc=None,
    scale=None,
    causal=True,
    q_offset=None,
    impl="auto",
    block_q=None,
    block_k=None,
    interpret=False,
):
    """(o [B,T,H,V] in v's dtype, lse [B,T,H] float32) of q over one span of keys; documents as
    indices `q_doc` [B,T] / `k_doc` [B,S] (see `blockwise_attention_lse`)."""
    impl = resolve_impl(impl)
    if interpret and impl != "pallas_tpu":
        raise ValueError(f"attention: interpret=True applies to the Pallas kernels only, not impl={impl!r}")
    kwargs = dict(q_doc=q_doc, k_doc=k_doc, scale=scale, causal=causal, q_offset=q_offset)
    blocks = {k_: b for k_, b in (("block_q", block_q), ("block_k", block_k)) if b is not None}
    if impl == "pallas_tpu":
        from pallas_kernels.attention.tpu import attention_pallas_tpu_lse  # noqa: PLC0415 (TPU-only Pallas backend, lazy)

        return attention_pallas_tpu_lse(q, k, v, **kwargs, **blocks, interpret=interpret)
    return blockwise_attention_lse(q, k, v, **kwargs, **blocks)
