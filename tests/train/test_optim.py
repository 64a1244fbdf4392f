"""Optimizer: weight-decay mask and the warmup-cosine schedule."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.train.config import RunConfig
from jaxllm.train.optim import decay_mask, lr_schedule, make_optimizer

PARAMS = {
    "params": {
        "embed": jnp.ones((8, 4)),
        "layers_0": {
            "self_attn": {
                "A_log": jnp.ones((2,)),
                "dt_bias": jnp.ones((2, 4)),
                "q_proj": jnp.ones((4, 2, 2)),
                "o_norm": jnp.ones((4,)),
            },
            "input_layernorm": {"weight": jnp.ones((4,))},
            "mlp": {"bias": jnp.ones((4,)), "up_proj": jnp.ones((4, 8))},
        },
    }
}


def test_no_decay_on_A_log_dt_bias_norms_and_biases():
    m = decay_mask(PARAMS)["params"]
    assert m["embed"] and m["layers_0"]["self_attn"]["q_proj"] and m["layers_0"]["mlp"]["up_proj"]
    assert not m["layers_0"]["self_attn"]["A_log"]
    assert not m["layers_0"]["self_attn"]["dt_bias"]  # 2-D, excluded by name
    assert not m["layers_0"]["self_attn"]["o_norm"]
    assert not m["layers_0"]["input_layernorm"]["weight"]
    assert not m["layers_0"]["mlp"]["bias"]


def test_weight_decay_really_skips_masked_params():
    cfg = RunConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, steps=10)
    tx, _ = make_optimizer(cfg)
    state = tx.init(PARAMS)
    zeros = jax_zeros(PARAMS)
    updates, _ = tx.update(zeros, state, PARAMS)
    u = updates["params"]
    assert float(jnp.abs(u["layers_0"]["self_attn"]["dt_bias"]).max()) == 0.0
    assert float(jnp.abs(u["layers_0"]["input_layernorm"]["weight"]).max()) == 0.0
    assert float(u["layers_0"]["mlp"]["up_proj"][0, 0]) < 0.0  # decayed toward zero


def jax_zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def test_schedule_warmup_peak_and_floor():
    s = lr_schedule(1.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    lrs = np.array([float(s(i)) for i in range(20)])
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert (np.diff(lrs[3:]) <= 1e-7).all()
    np.testing.assert_allclose(lrs[-1], 0.1, rtol=1e-5)


def test_clipping_bounds_update_norm():
    # eps=1 keeps Adam from normalising the clip away: with b1=b2=0 the update is -lr*g/(|g|+eps), so
    # it shows the gradient make_optimizer clipped (about -6e-4) rather than the raw one (about -1).
    cfg = RunConfig(
        lr=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=1e-3, steps=5, b1=0.0, b2=0.0, eps=1.0
    )
    tx, schedule = make_optimizer(cfg)
    lr0 = float(schedule(0))  # cosine decay has already begun at update 0
    p = {"w": jnp.ones((3,))}
    g = {"w": jnp.array([300.0, 400.0, 0.0])}
    updates, _ = tx.update(g, tx.init(p), p)
    g_clip = np.array([300.0, 400.0, 0.0]) * (1e-3 / 500.0)
    np.testing.assert_allclose(
        np.asarray(updates["w"]), -lr0 * g_clip / (np.abs(g_clip) + 1.0), rtol=1e-4, atol=1e-9
    )
    # below the threshold the gradient passes unchanged
    g_small = np.array([3e-4, 4e-4, 0.0])
    updates, _ = tx.update({"w": jnp.asarray(g_small, jnp.float32)}, tx.init(p), p)
    np.testing.assert_allclose(
        np.asarray(updates["w"]), -lr0 * g_small / (g_small + 1.0), rtol=1e-4, atol=1e-9
    )
