"""Heads-only AutoDeco training step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.nn.autodeco import AutoDecoHeads, heads_from_official
from jaxllm.ops.autodeco import autodeco_loss
from jaxllm.train.autodeco import (
    AutoDecoTrainConfig,
    init_state,
    make_loss_fn,
    make_optimizer,
    make_train_step,
)

H, V, MLP = 8, 48, 32


def _synthetic(seed, B=8, S=16):
    """Positions of two kinds; gold tokens drawn from softmax(logits / T*) with T* = 0.4 or 1.6.

    hidden[..., 0] = +-1 tells the kinds apart, so a good temperature head separates them.
    """
    rng = np.random.default_rng(seed)
    kind = rng.random((B, S)) < 0.5
    hidden = rng.normal(size=(B, S, H)).astype(np.float32) * 0.3
    hidden[..., 0] = np.where(kind, 1.0, -1.0)
    logits = (rng.normal(size=(B, S, V)) * 2.0).astype(np.float32)
    t_star = np.where(kind, 0.4, 1.6)
    labels = np.full((B, S), -100, np.int32)
    for b in range(B):
        for s in range(S - 1):
            z = logits[b, s] / t_star[b, s]
            p = np.exp(z - z.max())
            labels[b, s + 1] = rng.choice(V, p=p / p.sum())  # logits at s predict labels[s+1]
    batch = {"hidden": jnp.asarray(hidden), "logits": jnp.asarray(logits), "labels": jnp.asarray(labels)}
    return batch, kind


def _fresh(batch, seed=0):
    module = AutoDecoHeads(mlp_dim=MLP)
    params = module.init(jax.random.key(seed), batch["hidden"], batch["logits"])
    return module, params


def test_training_learns_position_dependent_temperature():
    batch, kind = _synthetic(0)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig(learning_rate=3e-3, max_grad_norm=None)
    tx = make_optimizer(config)
    state = init_state(params, tx, jax.random.key(1))
    step = jax.jit(make_train_step(module, tx, config))
    losses = []
    for _ in range(150):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    T, _ = module.apply(state["params"], batch["hidden"], batch["logits"])
    T = np.asarray(T[:, :-1, 0])
    k = kind[:, :-1]
    # Sharp positions (T* = 0.4) get a clearly lower temperature than flat ones (T* = 1.6).
    assert T[k].mean() < 0.6 * T[~k].mean(), (T[k].mean(), T[~k].mean())
    assert int(state["step"]) == 150


def test_temperature_head_reaches_the_weighted_objectives_optimum():
    # The temperature loss weights each token's CE by the base probability of the gold token.
    # With gold ~ softmax(l / T*), E[p(y) * -log softmax(l / T)_y] is minimised where
    # softmax(l / T) matches softmax(l / T*) * softmax(l), i.e. T = T* / (1 + T*): the official
    # objective deliberately sharpens (0.4 -> 0.286, 1.6 -> 0.615). No drop, no top-p loss, and
    # hidden reduced to the kind feature so the head cannot memorise single tokens.
    batch, kind = _synthetic(0, B=48, S=32)
    hidden = np.array(batch["hidden"])
    hidden[..., 1:] = 0.0
    batch["hidden"] = jnp.asarray(hidden)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig(
        learning_rate=3e-3, max_grad_norm=None, drop_prob=0.0, train_heads=("temp_head",)
    )
    tx = make_optimizer(config)
    state = init_state(params, tx, jax.random.key(1))
    step = jax.jit(make_train_step(module, tx, config))
    for _ in range(300):
        state, _ = step(state, batch)
    T, _ = module.apply(state["params"], batch["hidden"], batch["logits"])
    T = np.asarray(T[:, :-1, 0])
    k = kind[:, :-1]
    for mask, t_star in [(k, 0.4), (~k, 1.6)]:
        assert abs(T[mask].mean() - t_star / (1 + t_star)) < 0.04, (t_star, T[mask].mean())


def test_gradient_routing_matches_chain_rule():
    # d loss / d theta_T = (d loss / d T with P held fixed) . (d T / d theta_T): the top-p head
    # reads T through stop_gradient, so P adds no path back into the temperature head.
    batch, _ = _synthetic(1, B=2, S=6)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig()
    rand_vals = jax.random.uniform(jax.random.key(2), (2, 5))
    loss_fn = make_loss_fn(module, config)
    grads = jax.grad(lambda p: loss_fn(p, batch, rand_vals)[0])(params)
    grads = nn.meta.unbox(grads)["params"]

    T, P = module.apply(params, batch["hidden"], batch["logits"])
    dT = jax.grad(lambda t: autodeco_loss(batch["logits"], t, P, batch["labels"], rand_vals)["loss"])(T)
    dP = jax.grad(lambda p: autodeco_loss(batch["logits"], T, p, batch["labels"], rand_vals)["loss"])(P)
    _, vjp_t = jax.vjp(lambda p: module.apply(p, batch["hidden"], batch["logits"])[0], params)
    _, vjp_p = jax.vjp(lambda p: module.apply(p, batch["hidden"], batch["logits"])[1], params)
    want_t = nn.meta.unbox(vjp_t(dT)[0])["params"]["temp_head"]
    want_p = nn.meta.unbox(vjp_p(dP)[0])["params"]["top_p_head"]
    for got, want in [(grads["temp_head"], want_t), (grads["top_p_head"], want_p)]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(dT).sum()) > 0 and float(jnp.abs(dP).sum()) > 0


def test_one_step_is_adamw_on_the_loss_gradient():
    batch, _ = _synthetic(2, B=2, S=6)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig(learning_rate=1e-2, max_grad_norm=None)
    tx = make_optimizer(config)
    rand_vals = jax.random.uniform(jax.random.key(3), (2, 5))
    state = init_state(params, tx, jax.random.key(0))
    new_state, metrics = make_train_step(module, tx, config)(state, dict(batch, rand_vals=rand_vals))
    grads = jax.grad(lambda p: make_loss_fn(module, config)(p, batch, rand_vals)[0])(params)
    ref_tx = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    upd, _ = ref_tx.update(nn.meta.unbox(grads), ref_tx.init(nn.meta.unbox(params)), nn.meta.unbox(params))
    want = optax.apply_updates(nn.meta.unbox(params), upd)
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(new_state["params"])), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # Logical axis boxes survive the update (sharding rules still apply to the new params).
    k = new_state["params"]["params"]["temp_head"]["mlp_0"]["kernel"]
    assert isinstance(k, nn.LogicallyPartitioned) and k.names == ("embed", "mlp")
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(nn.meta.unbox(grads)), rtol=1e-6)


def test_rand_vals_come_from_the_state_key():
    batch, _ = _synthetic(3, B=2, S=6)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig(learning_rate=1e-3)
    tx = make_optimizer(config)
    step = jax.jit(make_train_step(module, tx, config))
    s1, m1 = step(init_state(params, tx, jax.random.key(7)), batch)
    s2, m2 = step(init_state(params, tx, jax.random.key(7)), batch)
    np.testing.assert_array_equal(m1["loss"], m2["loss"])
    # The key advances, so the next step draws differently.
    assert not np.array_equal(jax.random.key_data(s1["rng"]), jax.random.key_data(jax.random.key(7)))
    # The drop really is random: all-dropped vs none-dropped draws give different temperature losses.
    _, m_drop = step(init_state(params, tx, jax.random.key(7)), dict(batch, rand_vals=jnp.zeros((2, 5))))
    _, m_keep = step(init_state(params, tx, jax.random.key(7)), dict(batch, rand_vals=jnp.ones((2, 5))))
    assert int(m_drop["n_temp"]) <= int(m_keep["n_temp"])


def test_train_only_top_p_head_leaves_temperature_head_unchanged():
    batch, _ = _synthetic(4, B=2, S=6)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig(learning_rate=1e-2, train_heads=("top_p_head",))
    tx = make_optimizer(config)
    state, m = jax.jit(make_train_step(module, tx, config))(init_state(params, tx, jax.random.key(0)), batch)
    old, new = nn.meta.unbox(params)["params"], nn.meta.unbox(state["params"])["params"]
    for a, b in zip(jax.tree.leaves(old["temp_head"]), jax.tree.leaves(new["temp_head"])):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(old["top_p_head"]), jax.tree.leaves(new["top_p_head"]))
    )
    np.testing.assert_allclose(m["loss"], m["top_p_loss"], rtol=1e-6)


def test_works_on_official_heads(golden_dir):
    with np.load(golden_dir / "autodeco" / "autodeco_small.npz") as f:
        d = {k: f[k] for k in f.files}
    module, params = heads_from_official({k: v for k, v in d.items() if "_head." in k})
    batch = {
        "hidden": jnp.asarray(d["hidden"], jnp.float32),
        "logits": jnp.asarray(d["logits"], jnp.float32),
        "labels": jnp.asarray(d["labels"]),
        "rand_vals": jnp.asarray(d["rand_vals"], jnp.float32),
    }
    config = AutoDecoTrainConfig()
    tx = make_optimizer(config)
    _, m = make_train_step(module, tx, config)(init_state(params, tx, jax.random.key(0)), batch)
    # Step 0 reports the official losses of the official heads on the official draws.
    np.testing.assert_allclose(m["top_p_loss"], d["top_p_loss"], rtol=1e-5)
    np.testing.assert_allclose(m["temp_loss"], d["temp_loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(variant="deepspeed"), "variant"),
        (dict(drop_prob=2.0), "drop_prob"),
        (dict(alpha=-1.0), "alpha"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(train_heads=("lm_head",)), "train_heads"),
        (dict(train_heads=()), "train_heads"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        AutoDecoTrainConfig(**kw)


def test_bad_batch_names_the_array():
    batch, _ = _synthetic(5, B=2, S=6)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig()
    tx = make_optimizer(config)
    state = init_state(params, tx, jax.random.key(0))
    step = make_train_step(module, tx, config)
    bad = [
        (dict(batch, hidden=batch["hidden"][0]), "hidden"),
        (dict(batch, logits=batch["logits"][:, :-1]), "logits"),
        (dict(batch, labels=batch["labels"][:, :-1]), "labels"),
        (dict(batch, labels=batch["labels"].at[1, 2].set(V)), "labels"),
        (dict(batch, rand_vals=jnp.zeros((2, 6))), "rand_vals"),
        ({k: v for k, v in batch.items() if k != "logits"}, "logits"),
    ]
    for b, name in bad:
        with pytest.raises(ValueError, match=name):
            step(state, b)
    with pytest.raises(ValueError, match="params"):
        init_state(nn.meta.unbox(params)["params"], tx, jax.random.key(0))


def test_nonfinite_step_is_not_applied():
    """The one NaN policy (jaxllm.train.step.make_step): NaN logits leave the heads as they were."""
    batch, _ = _synthetic(5, B=2, S=6)
    module, params = _fresh(batch)
    config = AutoDecoTrainConfig(learning_rate=1e-2)
    tx = make_optimizer(config)
    state = init_state(params, tx, jax.random.key(0))
    new, m = jax.jit(make_train_step(module, tx, config))(
        state, dict(batch, logits=batch["logits"] * jnp.nan)
    )
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
