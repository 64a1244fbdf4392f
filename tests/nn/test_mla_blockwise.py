"""MLA through the blockwise attention (impl="auto") == the dense expanded MLA (impl="expanded"):
outputs and every gradient (params and input), float32, rms-rel <= 1e-5; without a cache
(causal, packed with a reused id, ragged T) and with one (absorbed cached append at per-row
positions, against the dense path over the same cache). Blocks are small so every case crosses
several query and key blocks; the Pallas TPU kernels run the same cases in interpret mode.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.nn import mla
from jaxllm.nn.mla import MLA, MLACache
from pallas_kernels.attention import tpu as attention_tpu

TOL = 1e-5
BLOCKS = (("block_q", 20), ("block_k", 32))
ATTENTION = {
    "blockwise": dict(attention_impl="blockwise", attention_options=BLOCKS),
    "pallas_tpu": dict(attention_impl="pallas_tpu", attention_options=BLOCKS + (("interpret", True),)),
}


def rel_rms(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.sqrt(np.mean((ref - got) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-30))


def _mla(impl, **kw):
    # q/k head dim nope+rope = 12, v head dim 6
    return MLA(
        hidden_size=24,
        num_heads=3,
        kv_lora_rank=10,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        impl=impl,
        **kw,
    )


def _value_and_grads(module, params, x, **kw):
    dy = jax.random.normal(jax.random.PRNGKey(7), x.shape)

    def loss(p, x):
        y, _ = module.apply(p, x, **kw)
        return jnp.sum(y * dy), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


def _assert_same(ref, got):
    (y_ref, g_ref), (y, g) = ref, got
    assert rel_rms(y_ref, y) <= TOL
    flat_ref = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(g_ref))
    flat = jax.tree_util.tree_leaves(nn.meta.unbox(g))
    errs = {jax.tree_util.keystr(p): rel_rms(a, b) for (p, a), b in zip(flat_ref, flat)}
    assert len(errs) == 6 and max(errs.values()) <= TOL, errs  # 5 params and x


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_blockwise_equals_expanded(attention):
    # row 0 packs three documents, the third reusing the first's id; row 1 is one document (plain
    # causal). T = 48 is ragged for both blocks (20 queries, 32 keys); q/k head dim 12, v 6.
    T = 48
    seg = jnp.asarray([[0] * 16 + [1] * 16 + [0] * 16, [3] * T], jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, T, 24))
    dense = _mla("expanded")
    params = dense.init(jax.random.PRNGKey(1), x)
    blockwise = _mla("auto", **ATTENTION[attention])
    _assert_same(
        _value_and_grads(dense, params, x, segment_ids=seg),
        _value_and_grads(blockwise, params, x, segment_ids=seg),
    )


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_cached_append_equals_dense(attention, monkeypatch):
    # a 5-token chunk appended to a 40-slot cache holding 0, 11 and 33 tokens per row, one row
    # per step of the absorbed append (each step reads its own cache row: kv_rows)
    monkeypatch.setattr(mla, "ABSORBED_ROWS_PER_STEP", 5 * 3)
    B, T, S = 3, 5, 40
    kx, kl, kr = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (B, T, 24))
    pos = jnp.asarray([0, 11, 33], jnp.int32)
    filled = jnp.arange(S)[None, :, None] < pos[:, None, None]
    cache = MLACache(
        jnp.where(filled, jax.random.normal(kl, (B, S, 10)), 0.0),
        jnp.where(filled, jax.random.normal(kr, (B, S, 4)), 0.0),
    )
    dense = _mla("expanded")
    params = dense.init(jax.random.PRNGKey(1), x)
    y_ref, c_ref = jax.jit(lambda p, x, c: dense.apply(p, x, cache=c, pos=pos))(params, x, cache)
    blockwise = _mla("auto", **ATTENTION[attention])
    y, c = jax.jit(lambda p, x, c: blockwise.apply(p, x, cache=c, pos=pos))(params, x, cache)
    assert rel_rms(y_ref, y) <= TOL
    np.testing.assert_array_equal(c.latent_BSR, c_ref.latent_BSR)
    np.testing.assert_array_equal(c.k_rope_BSP, c_ref.k_rope_BSP)


@pytest.mark.parametrize(
    "q_span, impl", [(0, "blockwise"), (2, "blockwise"), (3, "blockwise"), (2, "pallas_tpu")]
)
def test_spanwise_expansion_equals_the_whole_sequence(q_span, impl, monkeypatch):
    """Context parallelism's MLA: one span of queries over 4 spans of keys, one span's K/V expanded
    at a time and the spans combined by lse == that span of the whole-sequence expanded attention,
    output and gradients (queries, latent, rope key, kv_b weights), with documents crossing spans;
    through the blockwise path and the Pallas TPU kernels (interpret mode)."""
    B, S, H, R, N, P, Vd, n = 2, 64, 3, 10, 8, 4, 6, 4
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    q = jax.random.normal(ks[0], (B, S, H, N + P))
    latent = jax.random.normal(ks[1], (B, S, R))
    k_rope = jax.random.normal(ks[2], (B, S, P))
    w = jax.random.normal(ks[3], (R, H, N + Vd)) / np.sqrt(R)
    seg = jnp.asarray([[0] * 10 + [1] * 30 + [0] * 24, [2] * 32 + [5] * 32], jnp.int32)  # a reused id
    span = S // n
    q0 = q_span * span
    kw = dict(nope=N, scale=(N + P) ** -0.5)
    if impl == "pallas_tpu":  # TPU interpret mode's callbacks cannot sit under jax.checkpoint: the
        # generic interpret mode runs the same kernels (a real TPU has no such effects)
        monkeypatch.setattr(attention_tpu, "_interpret_arg", lambda interpret: interpret)

    def whole(q, latent, k_rope, w):
        o = mla.mla_blockwise_expanded(q, latent, k_rope, w, seg, impl="reference", **kw)
        return o[:, q0 : q0 + span]

    def spanwise(q, latent, k_rope, w):
        doc = mla.document_index(seg)
        qs = q[:, q0 : q0 + span]
        interpret = {"interpret": True} if impl == "pallas_tpu" else {}
        return mla.mla_spanwise_expanded(
            qs, latent, k_rope, w, doc, q0, spans=n, impl=impl, block_q=8, block_k=8, **interpret, **kw
        )

    args = (q, latent, k_rope, w)
    assert rel_rms(whole(*args), spanwise(*args)) <= TOL
    dy = jax.random.normal(jax.random.PRNGKey(9), (B, span, H, Vd))
    grads = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * dy), argnums=(0, 1, 2, 3))(*args)  # noqa: E731
    for name, a, b in zip(("q", "latent", "k_rope", "w"), grads(whole), grads(spanwise)):
        assert rel_rms(a, b) <= TOL, name
