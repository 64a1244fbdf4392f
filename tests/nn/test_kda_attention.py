import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.nn.kda_attention import KimiDeltaAttention, kda_gate


def _layer(impl="recurrent"):
    return KimiDeltaAttention(hidden_size=16, num_heads=2, head_dim=8, conv_kernel=4, impl=impl)


def test_gate_formula():
    rng = np.random.default_rng(0)
    graw = rng.normal(size=(1, 3, 2, 4)).astype(np.float32) * 15
    graw[0, 0, 0, 0] = 30.0  # softplus linear above 20
    A_log = np.log(np.array([1.5, 12.0], np.float32))
    dt = rng.normal(size=(2, 4)).astype(np.float32)
    g = np.asarray(kda_gate(jnp.asarray(graw), jnp.asarray(A_log), jnp.asarray(dt)))
    z = graw.astype(np.float64) + dt
    sp = np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))
    np.testing.assert_allclose(g, -np.exp(A_log)[:, None] * sp, rtol=1e-6)
    assert g.dtype == np.float32 and (g <= 0).all()


def test_param_shapes_and_axes():
    m = _layer()
    v = m.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 16)))["params"]
    assert v["q_proj"].names == ("embed", "heads", "kv") and v["q_proj"].value.shape == (16, 2, 8)
    assert v["q_conv"].names == ("conv", "heads", "kv") and v["q_conv"].value.shape == (4, 2, 8)
    assert v["A_log"].value.dtype == jnp.float32 and v["dt_bias"].value.shape == (2, 8)
    assert set(v) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "q_conv",
        "k_conv",
        "v_conv",
        "A_log",
        "dt_bias",
        "f_a_proj",
        "f_b_proj",
        "b_proj",
        "g_a_proj",
        "g_b_proj",
        "o_norm",
        "o_proj",
    }
    # no biases anywhere (g_b_proj included), as in the released checkpoints


@pytest.mark.parametrize("impl", ["recurrent", "auto"])
def test_steps_match_full_and_segments_reset(impl):
    m = _layer(impl)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 16))
    v = m.init(jax.random.PRNGKey(0), x)
    full, _ = m.apply(v, x)
    cache = m.init_cache(2)
    y0, cache = m.apply(v, x[:, :6], cache=cache)
    outs = [y0]
    for t in range(6, 11):
        yt, cache = m.apply(v, x[:, t : t + 1], cache=cache)
        outs.append(yt)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)
    assert cache.state_BHKV.dtype == jnp.float32 and cache.state_BHKV.shape == (2, 2, 8, 8)

    seg = jnp.array([[0] * 5 + [1] * 6] * 2)
    packed, _ = m.apply(v, x, segment_ids=seg)
    second, _ = m.apply(v, x[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], second, rtol=2e-5, atol=2e-5)
    assert not np.allclose(full[:, 5:], second, atol=1e-3)  # without the reset they differ
