import jax.numpy as jnp
import numpy as np

from jaxllm.nn.conv import causal_conv, causal_conv_step


def _ref(x, w, seg=None):
    """out[t] = sum_j w[j] x[t-W+1+j], taps into an earlier segment (or before 0) are zero."""
    B, T, C = x.shape
    W = w.shape[0]
    y = np.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for j in range(W):
                s = t - W + 1 + j
                if s < 0 or (seg is not None and np.any(seg[b, s : t + 1] != seg[b, t])):
                    continue
                y[b, t] += w[j] * x[b, s]
    return y


def test_matches_reference_and_hub_tap_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 5)).astype(np.float32)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    y, state = causal_conv(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(y, _ref(x, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state, x[:, -3:])
    # the last tap multiplies the current token
    e = np.zeros((1, 4, 1), np.float32)
    e[0, 0, 0] = 1.0
    y, _ = causal_conv(jnp.asarray(e), jnp.asarray(np.arange(1, 5, dtype=np.float32)[:, None]))
    np.testing.assert_array_equal(np.asarray(y)[0, :, 0], [4, 3, 2, 1])


def test_segment_reset_and_state():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 10, 3)).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    seg = np.array([[0] * 4 + [1] * 5 + [2], [7] * 2 + [3] * 8])
    y, state = causal_conv(jnp.asarray(x), jnp.asarray(w), segment_ids_BT=jnp.asarray(seg))
    np.testing.assert_allclose(y, _ref(x, w, seg), rtol=1e-5, atol=1e-6)
    # row 0 ends with a one-token segment: only that token survives in the state
    np.testing.assert_array_equal(state[0], np.concatenate([np.zeros((2, 3)), x[0, -1:]]))
    np.testing.assert_array_equal(state[1], x[1, -3:])


def test_steps_continue_full_sequence():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 2, 3)).astype(np.float32)  # several channel dims
    w = rng.normal(size=(4, 2, 3)).astype(np.float32)
    full, _ = causal_conv(jnp.asarray(x), jnp.asarray(w))
    y0, state = causal_conv(jnp.asarray(x[:, :5]), jnp.asarray(w))
    outs = [y0]
    for t in range(5, 8):
        yt, state = causal_conv_step(jnp.asarray(x[:, t]), jnp.asarray(w), state)
        outs.append(yt[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-6)
    y1, _ = causal_conv(
        jnp.asarray(x[:, 5:]), jnp.asarray(w), state_BSC=causal_conv(jnp.asarray(x[:, :5]), jnp.asarray(w))[1]
    )
    np.testing.assert_allclose(y1, full[:, 5:], rtol=1e-5, atol=1e-6)
