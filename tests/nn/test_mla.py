import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.nn.mla import MLA


def _mla(q_lora=None, impl="expanded"):
    return MLA(
        hidden_size=24,
        num_heads=3,
        kv_lora_rank=10,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        q_lora_rank=q_lora,
        impl=impl,
    )


def _numpy_reference(p, x, nope):
    """Plain per-head attention, float64, no caching tricks."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
    ckv = x @ p["kv_a_proj_with_mqa"]
    R = p["kv_a_layernorm"].shape[0]
    lat = ckv[..., :R]
    lat = lat / np.sqrt(np.mean(lat**2, -1, keepdims=True) + 1e-6) * p["kv_a_layernorm"]
    kv = np.einsum("btr,rhx->bthx", lat, p["kv_b_proj"])
    H = kv.shape[2]
    k = np.concatenate([kv[..., :nope], np.repeat(ckv[:, :, None, R:], H, axis=2)], -1)
    v = kv[..., nope:]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    T = x.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", a, v)
    return np.einsum("bthv,hvd->btd", o, p["o_proj"])


def test_expanded_matches_numpy():
    m = _mla()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 24))
    v = m.init(jax.random.PRNGKey(1), x)
    y, _ = m.apply(v, x)
    ref = _numpy_reference(nn.meta.unbox(v)["params"], x, 8)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora", [None, 5])
def test_absorbed_equals_expanded(q_lora):
    m = _mla(q_lora)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 24))
    v = m.init(jax.random.PRNGKey(1), x)
    ye, _ = m.apply(v, x)
    ya, _ = m.clone(impl="absorbed").apply(v, x)
    np.testing.assert_allclose(ya, ye, rtol=1e-5, atol=1e-5)
    seg = jnp.array([[0] * 4 + [1] * 5, [0] * 9])
    ye, _ = m.apply(v, x, segment_ids=seg)
    ya, _ = m.clone(impl="absorbed").apply(v, x, segment_ids=seg)
    np.testing.assert_allclose(ya, ye, rtol=1e-5, atol=1e-5)


def test_cache_steps_match_full():
    m = _mla(impl="auto")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 24))
    v = m.init(jax.random.PRNGKey(1), x)
    full, _ = m.apply(v, x)
    cache = m.init_cache(2, 12)
    y0, cache = m.apply(v, x[:, :5], cache=cache, pos=0)  # expanded over the buffer
    outs = [y0]
    for t in range(5, 9):
        yt, cache = m.apply(v, x[:, t : t + 1], cache=cache, pos=t)  # absorbed one-token steps
        outs.append(yt)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.latent_BSR.shape == (2, 12, 10) and cache.k_rope_BSP.shape == (2, 12, 4)
    np.testing.assert_array_equal(cache.latent_BSR[:, 9:], 0)


def test_segments_isolate_documents():
    m = _mla()
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 24))
    v = m.init(jax.random.PRNGKey(1), x)
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    packed, _ = m.apply(v, x, segment_ids=seg)
    second, _ = m.apply(v, x[:, 3:])
    np.testing.assert_allclose(packed[:, 3:], second, rtol=1e-5, atol=1e-5)


def test_cache_with_segments_rejected():
    m = _mla()
    x = jnp.ones((1, 2, 24))
    v = m.init(jax.random.PRNGKey(1), x)
    with pytest.raises(ValueError, match="segment_ids"):
        m.apply(v, x, segment_ids=jnp.zeros((1, 2), jnp.int32), cache=m.init_cache(1, 4), pos=0)
