"""Grouped-query attention with rotary embeddings (Qwen2/Qwen3/Llama self-attention).

    q = q_proj(x) [+ bias]   [B,T,H,D]        k, v = k_proj(x), v_proj(x) [+ bias]   [B,T,K,D]
    q, k = RMSNorm_D(q), RMSNorm_D(k)         (per head, Qwen3 only)
    q, k = rope(q, positions), rope(k, positions)
    o = o_proj(softmax(q k^T / sqrt(D), mask) v) [+ bias]

H = K * G query heads; query head h reads kv head h // G (transformers' `repeat_kv` order).
Mask: causal, and within a document when segment ids are given (ids are change points).
Decode cache: `KVCache(k, v)` [B,S,K,D] of fixed capacity S, rotated keys; row b holds pos[b]
tokens. The T new tokens of row b attend to its cache slots s < pos[b] and causally to each
other, as two key blocks under one softmax (the step never reads the buffer it writes, see
`nn/mla.py`), then go to slots pos[b] .. pos[b]+T-1. Rows may hold different lengths.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn._params import fan_in_init, param, project
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.rope import apply_rope, inverse_frequencies
from pallas_kernels.kda.common import document_index

_NEG = float(jnp.finfo(jnp.float32).min)


class KVCache(NamedTuple):
    k: jax.Array  # [B,S,K,D] rotated keys
    v: jax.Array  # [B,S,K,D]


def init_kv_cache(batch, capacity, num_kv_heads, head_dim, dtype=jnp.float32) -> KVCache:
    shape = (batch, capacity, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# ------------------------------------------------------------------------------------ masks
def causal_mask(T, segment_ids_BT=None):
    """[B or 1, T, T]: key t' visible to query t iff t' <= t (and same document)."""
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids_BT is not None:
        doc = document_index(segment_ids_BT)  # raw ids would join documents that reuse an id
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return mask


def cache_mask(pos_B, T, capacity):
    """[B, T, S]: cache slot s visible to every new token of row b iff s < pos[b]."""
    visible_BS = jnp.arange(capacity)[None, :] < jnp.asarray(pos_B)[:, None]
    return jnp.broadcast_to(visible_BS[:, None, :], (visible_BS.shape[0], T, capacity))


# ------------------------------------------------------------------------------------ core
def gqa_attention(q_BTHD, blocks, *, scale: float):
    """softmax(q k^T * scale) v over key/value blocks sharing one softmax. Returns o_BTHD float32.

    blocks: [(k_BSKD, v_BSKD, mask_BTS), ...]; the masks broadcast over heads. Scores, the
    softmax and the weighted sum accumulate in float32.
    """
    B, T, H, D = q_BTHD.shape
    K = blocks[0][0].shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scores, sizes = [], []
    for k_BSKD, _, mask_BTS in blocks:
        s = jnp.einsum(
            "btkgd,bskd->bkgts", q_BTKGD, k_BSKD.astype(q_BTHD.dtype), preferred_element_type=jnp.float32
        )
        scores.append(jnp.where(mask_BTS[:, None, None], s * scale, _NEG))
        sizes.append(k_BSKD.shape[1])
    p_BKGTS = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    ps = jnp.split(p_BKGTS, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    o_BTKGD = sum(
        jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        for p, (_, v, _) in zip(ps, blocks)
    )
    return o_BTKGD.reshape(B, T, H, D)


def write_rows(buffer_BS, new_BT, pos_B):
    """buffer[b, pos[b] : pos[b]+T] = new[b] for every row b (rows at different offsets)."""
    start = (0,) * (buffer_BS.ndim - 2)
    return jax.vmap(lambda buf, new, p: jax.lax.dynamic_update_slice(buf, new, (p, *start)))(
        buffer_BS, new_BT.astype(buffer_BS.dtype), jnp.asarray(pos_B, jnp.int32)
    )


def attend(q_BTHD, k_BTKD, v_BTKD, *, scale, segment_ids=None, cache: KVCache | None = None, pos=None):
    """Attention of T new tokens (already rotated) with or without a cache. Returns (o_BTHD f32, cache)."""
    T = q_BTHD.shape[1]
    if cache is None:
        return gqa_attention(q_BTHD, [(k_BTKD, v_BTKD, causal_mask(T, segment_ids))], scale=scale), None
    if segment_ids is not None:
        raise ValueError("attention: segment_ids (packed rows) cannot be combined with a decode cache")
    if pos is None:
        raise ValueError("attention: a cache needs `pos` [B], the tokens already cached per row")
    # new tokens at the cache's precision, as later steps will read them
    k_BTKD, v_BTKD = k_BTKD.astype(cache.k.dtype), v_BTKD.astype(cache.v.dtype)
    blocks = [
        (cache.k, cache.v, cache_mask(pos, T, cache.k.shape[1])),
        (k_BTKD, v_BTKD, causal_mask(T)),
    ]
    o_BTHD = gqa_attention(q_BTHD, blocks, scale=scale)
    return o_BTHD, KVCache(write_rows(cache.k, k_BTKD, pos), write_rows(cache.v, v_BTKD, pos))


# ------------------------------------------------------------------------------------ module
class Attention(nn.Module):
    """GQA self-attention with RoPE. `rope_scaling`: ((key, value), ...) for rope_type "llama3"."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple = ()
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def init_cache(self, batch, capacity, dtype=None) -> KVCache:
        return init_kv_cache(batch, capacity, self.num_kv_heads, self.head_dim, dtype or self.dtype)

    @nn.compact
    def __call__(self, x_BTD, positions_BT, *, segment_ids=None, cache: KVCache | None = None, pos=None):
        D, H, K, Dh, pd, cd = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.param_dtype,
            self.dtype,
        )
        if H % K:
            raise ValueError(f"Attention: num_heads {H} is not a multiple of num_kv_heads {K}")
        init = fan_in_init(D)
        wq = param(self, "q_proj", (D, H, Dh), ("embed", "heads", "kv"), dtype=pd, init=init)
        wk = param(self, "k_proj", (D, K, Dh), ("embed", "kv_heads", "kv"), dtype=pd, init=init)
        wv = param(self, "v_proj", (D, K, Dh), ("embed", "kv_heads", "kv"), dtype=pd, init=init)
        wo = param(self, "o_proj", (H, Dh, D), ("heads", "kv", "embed"), dtype=pd, init=fan_in_init(H * Dh))
        x = x_BTD.astype(cd)
        q_BTHD, k_BTKD, v_BTKD = project(x, wq), project(x, wk), project(x, wv)
        if self.qkv_bias:
            zeros = nn.initializers.zeros
            q_BTHD += param(self, "q_bias", (H, Dh), ("heads", "kv"), dtype=pd, init=zeros).astype(cd)
            k_BTKD += param(self, "k_bias", (K, Dh), ("kv_heads", "kv"), dtype=pd, init=zeros).astype(cd)
            v_BTKD += param(self, "v_bias", (K, Dh), ("kv_heads", "kv"), dtype=pd, init=zeros).astype(cd)
        if self.qk_norm:  # Qwen3: RMSNorm over each head's D features, before the rotation
            q_BTHD = RMSNorm(self.norm_eps, axis_name="kv", param_dtype=pd, name="q_norm")(q_BTHD)
            k_BTKD = RMSNorm(self.norm_eps, axis_name="kv", param_dtype=pd, name="k_norm")(k_BTKD)
        inv_freq = inverse_frequencies(Dh, self.rope_theta, self.rope_type, **dict(self.rope_scaling))
        q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq)
        k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq)
        o_BTHD, new_cache = attend(
            q_BTHD,
            k_BTKD,
            v_BTKD,
            scale=1.0 / math.sqrt(Dh),
            segment_ids=segment_ids,
            cache=cache,
            pos=pos,
        )
        y_BTD = project(o_BTHD.astype(cd), wo, n_in=2)
        if self.o_bias:
            y_BTD += param(self, "o_bias", (D,), ("embed",), dtype=pd, init=nn.initializers.zeros).astype(cd)
        return y_BTD, new_cache
