"""Blockwise attention (pure JAX and the Pallas TPU kernels in interpret mode) against the dense
softmax reference: outputs and the gradients of q, k, v.

One test class, run once per implementation (the way JAX's own Pallas suite re-runs a class in
interpret mode). Accuracy as fla reports it: rms(ref - impl) / rms(ref), float32 bound 1e-5.
Shapes are small and the blocks smaller still, so every case crosses several query and key blocks,
with a ragged last block on both sides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, attention_reference
from pallas_kernels.attention.gpu import cudnn_fits

TOL = 1e-5

IMPLS = {
    "blockwise": functools.partial(attention, impl="blockwise"),
    "pallas_tpu": functools.partial(attention, impl="pallas_tpu", interpret=True),
}


def rel_err(ref, got):
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.sqrt(np.mean((ref - got) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-30))


def inputs(B, T, H, G, K, V, S=None, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    S = S or T
    q = jax.random.normal(kq, (B, T, H, K), dtype)
    k = jax.random.normal(kk, (B, S, G, K), dtype)
    v = jax.random.normal(kv, (B, S, G, V), dtype)
    return q, k, v, jax.random.normal(kd, (B, T, H, V), jnp.float32)


def value_and_grads(fn, q, k, v, do, **kw):
    """(o, (dq, dk, dv)) of sum(o * do), jitted; integer side inputs traced."""

    def loss(q, k, v, seg, off, length, rows):
        o = fn(q, k, v, segment_ids=seg, q_offset=off, kv_length=length, kv_rows=rows, **kw)
        return jnp.sum(o.astype(jnp.float32) * do), o

    seg, off, length, rows = (kw.pop(n, None) for n in ("segment_ids", "q_offset", "kv_length", "kv_rows"))
    grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, seg, off, length, rows)
    return o, grads


def check(fn, q, k, v, do, tol=TOL, **kw):
    o_ref, g_ref = value_and_grads(attention_reference, q, k, v, do, **kw)
    o, g = value_and_grads(fn, q, k, v, do, block_q=8, block_k=16, **kw)
    errs = {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), (o_ref, *g_ref), (o, *g))}
    assert max(errs.values()) <= tol, errs
    return o


@pytest.mark.parametrize("impl", list(IMPLS))
class TestAttention:
    def test_causal_packed_gqa_ragged_qk_ne_v(self, impl):
        # T = 21: a ragged last query block (8) and key block (16); 4 q heads on 2 kv heads; K != V.
        # Row 0 packs three documents, the third reusing the first's id (ids mark change points);
        # row 1 is one document (plain causal).
        seg = jnp.asarray([[0] * 7 + [1] * 7 + [0] * 7, [5] * 21], jnp.int32)
        check(IMPLS[impl], *inputs(2, 21, 4, 2, 12, 8), segment_ids=seg)

    def test_mqa_cached_append_key_parts(self, impl):
        # absorbed MLA's shape: one kv head as [B,S,K] (no head axis), keys = two parts read in
        # place, per-row positions, query rows reading cache rows 2, 0, 3 of 4 (kv_rows). Slots
        # past each row's reach hold NaN: any read of a key block past it poisons the row.
        T, S, H = 5, 64, 4
        q, _, _, do = inputs(3, T, H, 1, 12, 8)
        _, k, v, _ = inputs(4, T, H, 1, 12, 8, S=S, seed=1)
        k, v = k[:, :, 0], v[:, :, 0]
        rows, pos = jnp.asarray([2, 0, 3], jnp.int32), jnp.asarray([0, 20, 59], jnp.int32)
        reach = jnp.zeros(4, jnp.int32).at[rows].set(-(-(pos + T) // 16) * 16)  # end of the last block read
        poison = jnp.arange(S)[None, :, None] >= reach[:, None, None]
        k, v = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
        kw = dict(q_offset=pos, kv_length=pos + T, kv_rows=rows)
        fn = lambda q, k, v, **kw: IMPLS[impl](q, (k[..., :9], k[..., 9:]), v, **kw)
        clean = lambda x: jnp.where(poison, 0.0, x)
        ref = lambda q, k, v, **kw: attention_reference(q, clean(k), clean(v), **kw)
        o_ref, g_ref = value_and_grads(ref, q, k, v, do, **kw)
        o, g = value_and_grads(fn, q, k, v, do, block_q=2, block_k=16, **kw)
        for a, b in zip((o_ref, g_ref[0], *map(clean, g_ref[1:])), (o, g[0], *map(clean, g[1:]))):
            assert rel_err(a, b) <= TOL

    def test_not_causal_empty_rows_bf16(self, impl):
        # forward only (the backward shares the masks): no causal mask, a row that sees no key
        # gives 0 (not NaN); bf16 inputs keep float32 statistics (error at bf16's rounding)
        q, k, v, _ = inputs(2, 9, 2, 1, 8, 8, S=20)
        length = jnp.asarray([0, 13], jnp.int32)
        fn = jax.jit(functools.partial(IMPLS[impl], block_q=8, block_k=16), static_argnames="causal")
        o = fn(q, k, v, causal=False, kv_length=length)
        assert rel_err(attention_reference(q, k, v, causal=False, kv_length=length), o) <= TOL
        np.testing.assert_array_equal(o[0], 0.0)
        q, k, v, _ = inputs(1, 40, 2, 2, 16, 16, dtype=jnp.bfloat16)
        o = fn(q, k, v)
        assert o.dtype == jnp.bfloat16
        assert rel_err(attention_reference(q, k, v), o) <= 8e-3


def test_errors_name_the_input():
    q, k, v, _ = inputs(1, 4, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, v)
    q, k, v, _ = inputs(1, 4, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="segment_ids must be"):
        attention(q, k, v, segment_ids=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="add up to q's head dim"):
        attention(q, (k, k), v)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="interpret=True"):
        attention(q, k, v, impl="blockwise", interpret=True)


def test_gpu_path_takes_cudnn_only_where_it_fits():
    q, k, v, _ = inputs(1, 16, 4, 2, 16, 8, dtype=jnp.bfloat16)
    assert cudnn_fits(q, k, v, backend="gpu")  # v narrower than k: zero-padded
    assert not cudnn_fits(q, k, v, backend="cpu")
    assert not cudnn_fits(q.astype(jnp.float32), k, v, backend="gpu")
    assert not cudnn_fits(q, (k[..., :8], k[..., 8:]), v, backend="gpu")
    assert not cudnn_fits(q, k, v, segment_ids=jnp.zeros((1, 16), jnp.int32), backend="gpu")
    assert not cudnn_fits(q, k, v, q_offset=jnp.zeros(1, jnp.int32), backend="gpu")
    # off GPU, impl="gpu" is the blockwise path
    got = jax.jit(functools.partial(attention, impl="gpu", block_q=8, block_k=8))(q, k, v)
    assert rel_err(attention_reference(q, k, v), got) <= 8e-3
