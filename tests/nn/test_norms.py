import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.norms import RMSNorm, gated_rms_norm, rms_norm


def test_rms_norm_formula_and_dtype():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8)).astype(np.float32) * 100
    w = rng.normal(size=8).astype(np.float32)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), ref, rtol=1e-5)
    y = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), 1e-5)
    assert y.dtype == jnp.bfloat16
    g = rng.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(
        gated_rms_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), 1e-5),
        ref / (1 + np.exp(-g)),
        rtol=1e-5,
    )


def test_eps_matters_for_small_inputs():
    x = jnp.full((1, 4), 1e-3)
    a = rms_norm(x, jnp.ones(4), 1e-6)
    b = rms_norm(x, jnp.ones(4), 1e-5)
    assert not np.allclose(a, b, rtol=1e-3)


def test_module_param_name_and_axis():
    m = RMSNorm(1e-5)
    v = m.init(jax.random.PRNGKey(0), jnp.ones((2, 6)))
    assert v["params"]["weight"].names == ("embed",)
