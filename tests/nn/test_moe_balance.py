"""MoE load balancing pieces by hand: the bias update, load statistics, the sequence-wise balance
loss, the router z-loss, the sown routing counts and the aux losses the module returns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.moe import (
    LOAD_NAME,
    ROUTER_LOAD,
    MoE,
    expert_load,
    load_stats,
    route,
    router_z_loss,
    sequence_balance_loss,
    update_correction_bias,
)


def test_bias_moves_towards_the_mean_load_by_the_rate():
    load = jnp.array([10.0, 2.0, 4.0, 0.0])  # mean 4
    got = update_correction_bias(jnp.array([0.5, 0.0, 0.1, -0.2]), load, 0.01)
    np.testing.assert_allclose(
        got, [0.49, 0.01, 0.1, -0.19], rtol=1e-6
    )  # over: down, under: up, at mean: still


def test_load_counts_and_stats_by_hand():
    idx = jnp.array([[0, 1], [0, 2], [0, 1]])
    np.testing.assert_array_equal(expert_load(idx, 4), [3, 2, 1, 0])
    ratio, over = load_stats(jnp.array([3.0, 2.0, 1.0, 0.0]))  # mean 1.5
    np.testing.assert_allclose([ratio, over], [2.0, (1.5 + 0.5) / 6], rtol=1e-6)
    ratio, over = load_stats(jnp.zeros(4))
    assert float(ratio) == 1.0 and float(over) == 0.0


def test_sequence_balance_loss_is_deepseek_v3s_formula():
    rng = np.random.default_rng(0)
    B, T, E, K = 3, 5, 6, 2
    scores = rng.random((B, T, E)).astype(np.float32)
    idx = np.argsort(-scores, axis=-1)[..., :K]
    want = []
    for b in range(B):  # per sequence: sum_i f_i P_i, f_i = E/(K T) * count_i, P_i = mean_t s'_it
        count = np.bincount(idx[b].reshape(-1), minlength=E)
        f = E / (K * T) * count
        p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
        want.append((f * p).sum())
    got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    even = sequence_balance_loss(jnp.ones((1, 4, 4)), jnp.array([[[0], [1], [2], [3]]]))
    np.testing.assert_allclose(even, 1.0, rtol=1e-6)  # the balanced minimum


def test_router_z_loss_by_hand():
    logits = jnp.array([[0.0, 0.0], [1.0, 2.0]])
    want = np.mean([np.log(2.0) ** 2, np.log(np.e + np.e**2) ** 2])
    np.testing.assert_allclose(router_z_loss(logits), want, rtol=1e-6)


def test_module_sows_its_routing_counts_and_returns_scaled_aux_losses():
    B, T, D, E, K = 2, 6, 8, 8, 2
    m = MoE(
        D,
        E,
        K,
        4,
        num_shared_experts=0,
        return_aux_losses=True,
        balance_loss_alpha=0.3,
        router_z_loss_coef=0.2,
    )
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    params = nn.meta.unbox(m.init(jax.random.key(1), x))
    (y, aux), sown = m.apply(params, x, mutable=[ROUTER_LOAD])
    p = params["params"]
    xs = x.reshape(-1, D)
    _, idx = route(xs, p["router"], p["e_score_correction_bias"], top_k=K)
    np.testing.assert_array_equal(
        sown[ROUTER_LOAD][LOAD_NAME], np.bincount(np.asarray(idx).reshape(-1), minlength=E)
    )
    logits = xs @ p["router"]
    np.testing.assert_allclose(aux["router_z"], 0.2 * router_z_loss(logits), rtol=1e-5)
    scores = jax.nn.sigmoid(logits).reshape(B, T, E)
    np.testing.assert_allclose(
        aux["moe_balance"], 0.3 * sequence_balance_loss(scores, idx.reshape(B, T, K)), rtol=1e-5
    )
    # Not mutable (decode, eval): nothing sown, same output; coefficients 0: no aux losses.
    y2, _ = m.apply(params, x)
    np.testing.assert_array_equal(y, y2)
    _, none = m.clone(balance_loss_alpha=0.0, router_z_loss_coef=0.0).apply(params, x)
    assert none == {}
