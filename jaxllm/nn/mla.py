"""Multi-head Latent Attention with no positional encoding (Kimi Linear's full-attention layers).

    q         = q_proj(x)  (or q_b(RMSNorm_1e-6(q_a(x))) with q_lora_rank)   [B,T,H, nope|rope]
    c, k_rope = kv_a_proj_with_mqa(x)                                         [B,T, latent|rope]
    c         = RMSNorm_1e-6(c)      (kv_a_layernorm)
    k_nope, v = kv_b_proj(c)                                                  [B,T,H, nope|v]
    k         = [k_nope, k_rope broadcast over heads]    no rotation (NoPE)
    o         = o_proj(softmax(q k^T * (nope+rope)^-1/2, causal) v)

Two forms, equal up to float rounding:
- expanded: per-head K/V from the latent (training, prefill: H kv heads of dim nope+rope / v);
- absorbed: W_uk folded into the query and W_uv into the output, attention over the cached
  (normalised) latent and shared rope key as one kv head (keys [latent, k_rope] of dim
  kv_lora_rank+rope, values the latent), no per-head K/V (cached appends and decode).
`impl="auto"` (the default) runs both through the blockwise online-softmax attention of
`pallas_kernels.attention` (O(T) memory, no [B,H,T,S] scores; `attention_impl` picks its
backend): expanded without a cache, absorbed with one (the new tokens are written into the
cache first, then attend slots 0 .. pos[b]+T-1 of row b; key blocks past every row's length are
never read). Under a multi-device mesh (`jax.set_mesh`) the expanded attention runs once per shard
(`mla_sharded_expanded`) when the mesh splits the sequence (`context` > 1: context parallelism,
the latent KV all-gathered) or the attention is the Pallas TPU kernel (XLA cannot partition it).
`impl="expanded"|"absorbed"` are the dense forms (`mla_expanded`, `mla_absorbed`:
float32 scores over all keys), kept as references.
Decode cache: `MLACache(latent_BSR, k_rope_BSP)` of fixed capacity S; `pos` [B] = tokens already in
it per row (rows may hold different lengths).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.nn import context_parallel as cp
from jaxllm.nn._params import fan_in_init, param, project
from jaxllm.nn.attention import cache_mask, causal_mask, write_rows
from jaxllm.nn.norms import rms_norm
from pallas_kernels.attention import IMPLS as ATTENTION_IMPLS
from pallas_kernels.attention import attention, attention_lse, resolve_impl
from pallas_kernels.kda.common import document_index

LATENT_NORM_EPS = 1e-6  # kv_a_layernorm / q_a_layernorm use this, not rms_norm_eps
_NEG = float(jnp.finfo(jnp.float32).min)


class MLACache(NamedTuple):
    latent_BSR: jax.Array  # kv_a_layernorm(latent) of every cached token
    k_rope_BSP: jax.Array  # the shared (un-rotated) key part


def init_mla_cache(batch, capacity, kv_lora_rank, qk_rope_head_dim, dtype=jnp.float32) -> MLACache:
    return MLACache(
        jnp.zeros((batch, capacity, kv_lora_rank), dtype),
        jnp.zeros((batch, capacity, qk_rope_head_dim), dtype),
    )


def softmax_attention(scores_BHTS, mask_BTS):
    """Masked softmax in float32 over the last axis."""
    s = jnp.where(mask_BTS[:, None], scores_BHTS.astype(jnp.float32), _NEG)
    return jax.nn.softmax(s, axis=-1)


def _blocks(latent, k_rope, mask):
    """Key/value blocks sharing one softmax: arrays, or tuples of arrays (e.g. cache + new tokens)."""
    if isinstance(latent, (tuple, list)):
        return list(zip(latent, k_rope, mask))
    return [(latent, k_rope, mask)]


def _joint_softmax(scores, masks):
    sizes = [s.shape[-1] for s in scores]
    rows = max(m.shape[0] for m in masks)  # per-row cache masks [B,..] beside a shared causal [1,..]
    masks = [jnp.broadcast_to(m, (rows,) + m.shape[1:]) for m in masks]
    p = softmax_attention(jnp.concatenate(scores, -1), jnp.concatenate(masks, -1))
    return jnp.split(p, np.cumsum(sizes)[:-1].tolist(), axis=-1)


def mla_expanded(q_BTHD, latent_BSR, k_rope_BSP, w_kvb_RHX, mask_BTS, *, nope: int, scale: float):
    """Attention with per-head K/V expanded from the latent. Returns o_BTHV (float32).

    latent/k_rope/mask may be tuples of blocks attended under one softmax.
    """
    f32 = jnp.float32
    q_BHTD = jnp.swapaxes(q_BTHD.astype(f32), 1, 2)
    scores, vs, masks = [], [], []
    for lat, kr, m in _blocks(latent_BSR, k_rope_BSP, mask_BTS):
        kv = project(lat, w_kvb_RHX, dtype=f32)  # [B,S,H,nope+v]
        k_nope, v = kv[..., :nope], kv[..., nope:]
        s = jnp.einsum("bhtn,bshn->bhts", q_BHTD[..., :nope], k_nope) + jnp.transpose(
            jnp.einsum("bsp,bhtp->bsht", kr.astype(f32), q_BHTD[..., nope:]), (0, 2, 3, 1)
        )
        scores.append(s * scale)
        vs.append(v)
        masks.append(m)
    ps = _joint_softmax(scores, masks)
    o_BHTV = sum(jnp.einsum("bhts,bshv->bhtv", p, v) for p, v in zip(ps, vs))
    return jnp.swapaxes(o_BHTV, 1, 2)


def mla_absorbed(q_BTHD, latent_BSR, k_rope_BSP, w_kvb_RHX, mask_BTS, *, nope: int, scale: float):
    """Same result as `mla_expanded` without materialising per-head K/V. Returns o_BTHV (float32).

    latent/k_rope/mask may be tuples of blocks attended under one softmax (decode attends the
    cache as it was and the new tokens as a second block, so the step never reads the buffer it
    updates: reading an updated buffer made XLA:CPU copy the whole cache several times a step).
    """
    f32 = jnp.float32
    w_uk, w_uv = w_kvb_RHX[..., :nope].astype(f32), w_kvb_RHX[..., nope:].astype(f32)
    q_BHTD = jnp.swapaxes(q_BTHD.astype(f32), 1, 2)
    q_lat_BHTR = jnp.einsum("bhtn,rhn->bhtr", q_BHTD[..., :nope], w_uk)
    scores, lats, masks = [], [], []
    for lat, kr, m in _blocks(latent_BSR, k_rope_BSP, mask_BTS):
        lat = lat.astype(f32)
        # The cache is the lhs of its dot_general and the output keeps the natural order (batch,
        # lhs free, rhs free): other orders make XLA:CPU transpose the [S,R] cache, ~10x slower.
        s_BSHT = jnp.einsum("bsr,bhtr->bsht", lat, q_lat_BHTR) + jnp.einsum(
            "bsp,bhtp->bsht", kr.astype(f32), q_BHTD[..., nope:]
        )
        scores.append(jnp.transpose(s_BSHT, (0, 2, 3, 1)) * scale)
        lats.append(lat)
        masks.append(m)
    ps = _joint_softmax(scores, masks)
    ctx_BHTR = sum(jnp.einsum("bhts,bsr->bhtr", p, lat) for p, lat in zip(ps, lats))
    return jnp.einsum("bhtr,rhv->bthv", ctx_BHTR, w_uv)


def _expand_kv(latent_BSR, k_rope_BSP, w_kvb_RHX, *, nope, dtype):
    """Per-head keys [B,S,H,nope+rope] (the shared rope key broadcast over heads) and values [B,S,H,v]."""
    H = w_kvb_RHX.shape[1]
    kv_BSHX = project(latent_BSR.astype(dtype), w_kvb_RHX)
    k_rope_BSHP = jnp.broadcast_to(
        k_rope_BSP[:, :, None].astype(dtype), k_rope_BSP.shape[:2] + (H, k_rope_BSP.shape[-1])
    )
    return jnp.concatenate([kv_BSHX[..., :nope], k_rope_BSHP], axis=-1), kv_BSHX[..., nope:]


def mla_blockwise_expanded(
    q_BTHD, latent_BTR, k_rope_BTP, w_kvb_RHX, segment_ids, *, nope, scale, **attention_kw
):
    """Causal self-attention with per-head K/V (training, prefill) in O(T) memory. o_BTHV in q's dtype."""
    k_BTHD, v_BTHV = _expand_kv(latent_BTR, k_rope_BTP, w_kvb_RHX, nope=nope, dtype=q_BTHD.dtype)
    return attention(q_BTHD, k_BTHD, v_BTHV, scale=scale, segment_ids=segment_ids, **attention_kw)


def mla_spanwise_expanded(
    q_BTHD, latent_BSR, k_rope_BSP, w_kvb_RHX, doc_BS, q_offset, *, spans, nope, scale, **attention_kw
):
    """T queries at positions q_offset.. over all S keys (causal), one of `spans` equal spans of
    keys expanded to per-head K/V at a time: `attention_lse` per span (checkpointed, so the
    backward re-expands its span; `attention_kw`: impl, blocks, interpret), combined by each
    query's lse. Context parallelism: per-head K/V
    of S/spans tokens are live at once, not of the whole sequence (that is 2.7 GB of bf16 K/V per
    device at the 48B widths and S=131072). doc_BS: the keys' document indices (`document_index`
    of the sequence's segment ids) or None. o_BTHV in q's dtype."""
    T, S = q_BTHD.shape[1], latent_BSR.shape[1]
    if S % spans:
        raise ValueError(f"MLA: {S} keys do not split into {spans} equal spans")
    n = S // spans
    q_doc = None if doc_BS is None else jax.lax.dynamic_slice_in_dim(doc_BS, q_offset, T, axis=1)

    @jax.checkpoint
    def one_span(j):
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, j * n, n, axis=1)  # noqa: E731
        k_BSHD, v_BSHV = _expand_kv(
            take(latent_BSR), take(k_rope_BSP), w_kvb_RHX, nope=nope, dtype=q_BTHD.dtype
        )
        k_doc = None if doc_BS is None else take(doc_BS)
        return attention_lse(
            q_BTHD,
            k_BSHD,
            v_BSHV,
            q_doc=q_doc,
            k_doc=k_doc,
            scale=scale,
            q_offset=q_offset - j * n,
            **attention_kw,
        )

    o_JBTHV, lse_JBTH = jax.lax.map(one_span, jnp.arange(spans))
    share_JBTH = jax.nn.softmax(lse_JBTH, axis=0)  # each span's part of the query's softmax mass
    o_BTHV = jnp.einsum("jbth,jbthv->bthv", share_JBTH, o_JBTHV.astype(jnp.float32))
    return o_BTHV.astype(q_BTHD.dtype)


def mla_sharded_expanded(
    mesh, q_BTHD, latent_BTR, k_rope_BTP, w_kvb_RHX, segment_ids, *, nope, scale, **attention_kw
):
    """`mla_blockwise_expanded` once per shard of `mesh` (inside `shard_map`): rows over the batch
    axes, heads over `tensor`, and, when the mesh's `context` axis is > 1, the sequence over it.

    Context parallelism: each device all-gathers the compressed latent and rope key (kv_lora_rank
    + rope floats per token, cheap next to per-head K/V) and the segment ids and attends its span's
    queries at their offset (causal and per document across spans), expanding one span of K/V at
    a time (`mla_spanwise_expanded`; the Pallas TPU kernels or the blockwise path, which also
    stands in for cuDNN, whose calls take no offsets). Without `context`, a Pallas kernel (which
    XLA cannot partition) gets one call per shard."""
    B, T, H = q_BTHD.shape[:3]
    tok, rows, h = cp.token_specs(mesh, B, H, T)
    n_spans = mesh.shape[cp.CONTEXT_AXIS]
    seg_in = () if segment_ids is None else (segment_ids,)

    def body(q, latent, k_rope, w, *seg):
        seg = seg[0] if seg else None
        if n_spans == 1:
            return mla_blockwise_expanded(q, latent, k_rope, w, seg, nope=nope, scale=scale, **attention_kw)
        offset = cp.span_offset(q.shape[1])
        latent, k_rope = cp.gather_sequence(latent), cp.gather_sequence(k_rope)
        seg = None if seg is None else cp.gather_sequence(seg)
        doc = None if seg is None else document_index(seg)
        return mla_spanwise_expanded(
            q, latent, k_rope, w, doc, offset, spans=n_spans, nope=nope, scale=scale, **attention_kw
        )

    # check_vma=False: the blockwise attention's loops start from unvarying zeros
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tok, rows, rows, P(None, h)) + (rows,) * len(seg_in),
        out_specs=tok,
        check_vma=False,
    )(q_BTHD, latent_BTR, k_rope_BTP, w_kvb_RHX, *seg_in)


def _shard_mesh(attention_impl):
    """The mesh to run the expanded attention per shard under: one that splits the sequence, or
    any multi-device jaxllm mesh when the attention is a Pallas kernel; else None (XLA partitions)."""
    mesh = cp.jaxllm_mesh()
    if mesh is None:
        return None
    if mesh.shape[cp.CONTEXT_AXIS] > 1 or resolve_impl(attention_impl) == "pallas_tpu":
        return mesh
    return None


ABSORBED_ROWS_PER_STEP = 1024  # query rows (rows x tokens x heads) one step of the absorbed append holds


def _row_group(B, rows_per_batch_row):
    """Largest divisor g of B with g * rows_per_batch_row <= ABSORBED_ROWS_PER_STEP (at least 1)."""
    fits = [g for g in range(1, B + 1) if B % g == 0 and g * rows_per_batch_row <= ABSORBED_ROWS_PER_STEP]
    return max(fits, default=1)


def mla_blockwise_absorbed(
    q_BTHD, cache: MLACache, pos_B, w_kvb_RHX, *, nope, scale, kv_rows=None, **attention_kw
):
    """T queries at positions pos[b] .. pos[b]+T-1 over cache slots 0 .. pos[b]+T-1 (the new tokens
    already written), absorbed: one shared kv head, keys [latent, k_rope] read in place from the
    cache, values the latent; W_uk folds into the query, W_uv into the output. Query row b reads
    cache row kv_rows[b] (default b). o_BTHV in q's dtype."""
    T = q_BTHD.shape[1]
    dt = q_BTHD.dtype
    w_uk_RHN, w_uv_RHV = w_kvb_RHX[..., :nope].astype(dt), w_kvb_RHX[..., nope:].astype(dt)
    q_lat_BTHR = jnp.einsum(
        "bthn,rhn->bthr", q_BTHD[..., :nope], w_uk_RHN, preferred_element_type=jnp.float32
    )
    q_BTHK = jnp.concatenate([q_lat_BTHR.astype(dt), q_BTHD[..., nope:]], axis=-1)
    ctx_BTHR = attention(  # [B,S,*] keys/values: one kv head (no unit axis: see attention.common)
        q_BTHK,
        (cache.latent_BSR, cache.k_rope_BSP),
        cache.latent_BSR,
        scale=scale,
        q_offset=pos_B,
        kv_length=pos_B + T,
        kv_rows=kv_rows,
        **attention_kw,
    )
    o = jnp.einsum("bthr,rhv->bthv", ctx_BTHR.astype(dt), w_uv_RHV, preferred_element_type=jnp.float32)
    return o.astype(dt)


def mla_absorbed_append(
    x_BTD, query, cache: MLACache, pos_B, w_kvb_RHX, w_o_HVD, *, nope, scale, **attention_kw
):
    """The layer's output y_BTD for T new tokens whose latents are already in `cache`: per group of
    rows, query(x) [the q projection] -> `mla_blockwise_absorbed` -> o_proj.

    Rows go in groups (a lax.map when B*T*H exceeds ABSORBED_ROWS_PER_STEP): the absorbed query and
    context are kv_lora_rank wide per head, so for all rows at once they (and even the plain query
    and output) outweigh the layer's weights; each group reads its own cache rows in place
    (`kv_rows`), never a copy of them."""
    B, T = x_BTD.shape[:2]
    H = w_kvb_RHX.shape[1]
    g = _row_group(B, T * H)

    def group(n):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, n * g, g)
        kv_rows = n * g + jnp.arange(g, dtype=jnp.int32)
        o_gTHV = mla_blockwise_absorbed(
            query(rows(x_BTD)),
            cache,
            rows(pos_B),
            w_kvb_RHX,
            nope=nope,
            scale=scale,
            kv_rows=kv_rows,
            **attention_kw,
        )
        return project(o_gTHV, w_o_HVD, n_in=2)

    if g == B:
        return group(0)
    return jax.lax.map(group, jnp.arange(B // g)).reshape(B, T, -1)


class MLA(nn.Module):
    hidden_size: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    latent_norm_eps: float = LATENT_NORM_EPS
    impl: str = (
        "auto"  # "auto" (blockwise: expanded w/o cache, absorbed with) | dense "expanded" | "absorbed"
    )
    attention_impl: str = "auto"  # backend of the blockwise attention (pallas_kernels.attention.IMPLS)
    attention_options: tuple = ()  # more keywords for it, e.g. (("block_q", 64), ("interpret", True))
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def init_cache(self, batch, capacity, dtype=None) -> MLACache:
        return init_mla_cache(batch, capacity, self.kv_lora_rank, self.qk_rope_head_dim, dtype or self.dtype)

    @nn.compact
    def __call__(self, x_BTD, *, segment_ids=None, cache: MLACache | None = None, pos=None):
        if self.impl not in ("auto", "expanded", "absorbed"):
            raise ValueError(f"MLA.impl must be 'auto', 'expanded' or 'absorbed', got {self.impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"MLA.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        D, H, R = self.hidden_size, self.num_heads, self.kv_lora_rank
        N, P, Vd = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        pd = self.param_dtype
        x = x_BTD.astype(self.dtype)
        B, T = x.shape[:2]
        if self.q_lora_rank:
            Rq = self.q_lora_rank
            q_a = param(self, "q_a_proj", (D, Rq), ("embed", "q_lora"), dtype=pd, init=fan_in_init(D))
            q_a_norm = param(self, "q_a_layernorm", (Rq,), ("q_lora",), dtype=pd, init=nn.initializers.ones)
            q_b = param(
                self, "q_b_proj", (Rq, H, N + P), ("q_lora", "heads", "kv"), dtype=pd, init=fan_in_init(Rq)
            )
            query = lambda x: project(rms_norm(project(x, q_a), q_a_norm, self.latent_norm_eps), q_b)
        else:
            q_w = param(
                self, "q_proj", (D, H, N + P), ("embed", "heads", "kv"), dtype=pd, init=fan_in_init(D)
            )
            query = lambda x: project(x, q_w)
        kv_a = param(
            self, "kv_a_proj_with_mqa", (D, R + P), ("embed", "kv_lora"), dtype=pd, init=fan_in_init(D)
        )
        kv_a_norm = param(self, "kv_a_layernorm", (R,), ("kv_lora",), dtype=pd, init=nn.initializers.ones)
        kv_b = param(
            self, "kv_b_proj", (R, H, N + Vd), ("kv_lora", "heads", "kv"), dtype=pd, init=fan_in_init(R)
        )
        o_w = param(self, "o_proj", (H, Vd, D), ("heads", "kv", "embed"), dtype=pd, init=fan_in_init(H * Vd))

        ckv = project(x, kv_a)
        latent_BTR = rms_norm(ckv[..., :R], kv_a_norm, self.latent_norm_eps)
        k_rope_BTP = ckv[..., R:]
        scale = 1.0 / math.sqrt(N + P)

        if cache is not None:
            if segment_ids is not None:
                raise ValueError("MLA: segment_ids (packed rows) cannot be combined with a decode cache")
            if pos is None:
                raise ValueError("MLA: a cache needs `pos` [B], the number of tokens already cached per row")
            # new tokens at the cache's precision, as later steps will read them
            latent_BTR = latent_BTR.astype(cache.latent_BSR.dtype)
            k_rope_BTP = k_rope_BTP.astype(cache.k_rope_BSP.dtype)
            pos_B = jnp.broadcast_to(jnp.asarray(pos, jnp.int32).reshape(-1), (B,))
        if self.impl == "auto":
            attention_kw = dict(self.attention_options, impl=self.attention_impl)
            if cache is None:
                mesh = _shard_mesh(self.attention_impl)
                args = (query(x), latent_BTR, k_rope_BTP, kv_b, segment_ids)
                if mesh is None:
                    o_BTHV = mla_blockwise_expanded(*args, nope=N, scale=scale, **attention_kw)
                else:
                    o_BTHV = mla_sharded_expanded(mesh, *args, nope=N, scale=scale, **attention_kw)
                return project(o_BTHV.astype(self.dtype), o_w, n_in=2), None
            new_cache = MLACache(
                write_rows(cache.latent_BSR, latent_BTR, pos_B),
                write_rows(cache.k_rope_BSP, k_rope_BTP, pos_B),
            )
            y_BTD = mla_absorbed_append(
                x, query, new_cache, pos_B, kv_b, o_w.astype(self.dtype), nope=N, scale=scale, **attention_kw
            )
            return y_BTD, new_cache
        # the dense reference forms
        fn = mla_absorbed if self.impl == "absorbed" else mla_expanded
        q_BTHD = query(x)
        if cache is None:
            o_BTHV = fn(
                q_BTHD, latent_BTR, k_rope_BTP, kv_b, causal_mask(T, segment_ids), nope=N, scale=scale
            )
            return project(o_BTHV.astype(self.dtype), o_w, n_in=2), None
        lat, kr = (cache.latent_BSR, latent_BTR), (cache.k_rope_BSP, k_rope_BTP)
        mask = (cache_mask(pos_B, T, cache.latent_BSR.shape[1]), causal_mask(T))
        o_BTHV = fn(q_BTHD, lat, kr, kv_b, mask, nope=N, scale=scale).astype(self.dtype)
        new_cache = MLACache(
            write_rows(cache.latent_BSR, latent_BTR, pos_B), write_rows(cache.k_rope_BSP, k_rope_BTP, pos_B)
        )
        return project(o_BTHV, o_w, n_in=2), new_cache
