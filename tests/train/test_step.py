"""The pure train step: masked token loss, aux losses, accumulation, the NaN policy and the MoE bias update."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.errors import NonFiniteLossError
from jaxllm.models.base import ModelOutput, lm_head_kernel
from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.kimi_linear import KimiLinear
from jaxllm.train.step import all_finite, check_finite, lm_loss, make_train_step, token_loss_sum


class Bigram:
    """apply(variables, ids, segment_ids=...) -> ModelOutput with aux_losses {"l2": 0.5 * mean(W^2)}."""

    def __init__(self, with_aux):
        self.with_aux = with_aux

    def apply(self, variables, ids, *, segment_ids, mutable=()):
        del segment_ids
        w = variables["params"]["w"]
        logits = w[ids]
        aux = {"l2": 0.5 * jnp.mean(w**2)} if self.with_aux else {}
        out = ModelOutput(logits, logits, aux_losses=aux)
        return (out, {}) if mutable else out


def batch(rng, a=2, b=2, t=5, v=7):
    ids = rng.integers(0, v, size=(a, b, t)).astype(np.int32)
    mask = (rng.random((a, b, t)) > 0.3).astype(np.int32)
    return {
        "inputs": ids,
        "targets": np.roll(ids, -1, -1),
        "segment_ids": np.ones_like(ids),
        "loss_mask": mask,
    }


def run(with_aux, bt):
    params = {"params": {"w": jnp.asarray(np.random.default_rng(1).normal(size=(7, 7)), jnp.float32)}}
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(Bigram(with_aux).apply, tx, lambda s: 0.1))
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0),
    }
    return params, step(state, bt)


def test_loss_is_masked_mean_cross_entropy_over_all_microbatches():
    bt = batch(np.random.default_rng(0))
    params, (new_state, m) = run(False, bt)
    w = np.asarray(params["params"]["w"])
    logits = w[bt["inputs"]]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, bt["targets"][..., None], -1)[..., 0]
    want = (ce * bt["loss_mask"]).sum() / bt["loss_mask"].sum()
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert int(m["tokens"]) == bt["loss_mask"].sum() and int(new_state["step"]) == 1
    assert bool(m["finite"])


def test_aux_loss_is_reported_apart_and_trained():
    bt = batch(np.random.default_rng(0))
    _, (plain, m0) = run(False, bt)
    _, (aux, m1) = run(True, bt)
    np.testing.assert_allclose(float(m0["loss"]), float(m1["loss"]), rtol=1e-6)
    assert float(m1["aux_loss"]) > 0
    assert not np.allclose(plain["params"]["params"]["w"], aux["params"]["params"]["w"])


def test_token_loss_sum_and_all_finite():
    s, n = token_loss_sum(jnp.zeros((1, 2, 4)), jnp.array([[1, 2]]), jnp.array([[1, 0]]))
    np.testing.assert_allclose(float(s), np.log(4), rtol=1e-6)
    assert float(n) == 1
    assert bool(all_finite({"a": jnp.ones(3) * 1e30}))  # large but finite: a norm would overflow
    assert not bool(all_finite({"a": jnp.array([1.0, jnp.nan])}))


def test_nonfinite_step_is_not_applied():
    """The NaN policy of the one step builder: params and optimizer state stay, `finite` is False."""
    bt = batch(np.random.default_rng(0))
    bt["inputs"][0, 0, 0] = 0  # reads the NaN row: a NaN loss; the other rows' gradients are finite
    w = np.random.default_rng(1).normal(size=(7, 7)).astype(np.float32)
    w[0] = np.nan
    params = {"params": {"w": jnp.asarray(w)}}
    tx = optax.adam(0.1)
    step = jax.jit(make_train_step(Bigram(False).apply, tx, lambda s: 0.1))
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0),
    }
    new, m = step(state, bt)
    assert not bool(m["finite"]) and int(new["step"]) == 1
    np.testing.assert_array_equal(new["params"]["params"]["w"], w)  # not even the finite rows moved
    for a, b in zip(jax.tree.leaves(new["opt_state"]), jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 3"):
        check_finite(jax.device_get(m), 3)


KIMI_MOE = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    layer_types=("mla", "mla"),
    mlp_layer_types=("dense", "moe"),
    kda_num_heads=1,
    kda_head_dim=8,
    num_attention_heads=1,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=0,
    v_head_dim=8,
    intermediate_size=16,
    moe_intermediate_size=8,
    num_experts=8,
    num_experts_per_token=2,
)


def kimi_step(rate, **config):
    model = KimiLinear(KimiLinearConfig(**{**KIMI_MOE, **config}))
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 2, 12)).astype(np.int32)
    bt = {
        "inputs": ids,
        "targets": np.roll(ids, -1, -1),
        "segment_ids": np.ones_like(ids),
        "loss_mask": np.ones_like(ids),
    }
    params = model.init(jax.random.PRNGKey(0), ids[0])
    params = jax.tree.map(lambda x: x, nn.meta.unbox(params))
    params["params"]["layers_1"]["moe"]["e_score_correction_bias"] = jnp.linspace(-0.1, 0.1, 8)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0),
    }
    step = jax.jit(make_train_step(model.apply, tx, lambda s: 1e-2, bias_update_rate=rate))
    return state, step(state, bt)


def test_bias_update_moves_each_bias_towards_the_mean_load_and_nothing_else():
    state, (on, m_on) = kimi_step(0.05)
    _, (off, m_off) = kimi_step(0.0)
    load = np.asarray(m_on["expert_load/layers_1/moe"])  # both microbatches' counts
    assert load.sum() == 2 * 2 * 12 * 2  # every token of both microbatches, k = 2
    np.testing.assert_array_equal(load, m_off["expert_load/layers_1/moe"])
    old = np.asarray(state["params"]["params"]["layers_1"]["moe"]["e_score_correction_bias"])
    new = np.asarray(on["params"]["params"]["layers_1"]["moe"]["e_score_correction_bias"])
    np.testing.assert_allclose(new, old + 0.05 * np.sign(load.mean() - load), rtol=1e-6, atol=1e-7)
    # outside the gradient and the optimizer: without the update (rate 0) the bias does not move
    np.testing.assert_array_equal(off["params"]["params"]["layers_1"]["moe"]["e_score_correction_bias"], old)
    flat_on = jax.tree_util.tree_flatten_with_path(on["params"])[0]
    for (path, a), b in zip(flat_on, jax.tree.leaves(off["params"])):
        if "e_score_correction_bias" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(a, b)
    ratio = load.max() / load.mean()
    np.testing.assert_allclose(m_on["moe_max_mean_load"], ratio, rtol=1e-6)
    np.testing.assert_allclose(m_on["moe/layers_1/moe/max_mean_load"], ratio, rtol=1e-6)


def test_kimi_moe_aux_losses_reach_the_objective():
    _, (_, m) = kimi_step(0.0, seq_balance_loss_alpha=0.01, router_z_loss_coef=0.001)
    _, (_, m0) = kimi_step(0.0)
    assert float(m0["aux_loss"]) == 0.0 and "aux/moe_balance" not in m0
    assert float(m["aux/moe_balance"]) > 0 and float(m["aux/router_z"]) > 0
    np.testing.assert_allclose(m["aux_loss"], m["aux/moe_balance"] + m["aux/router_z"], rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-6)  # reported apart from the cross-entropy


def test_chunked_loss_equals_full_logits_loss_and_gradients():
    """`loss_chunk` (the LM head applied per strided chunk of positions, recomputed in the backward)
    gives the loss and every gradient of the full-logits loss, masked tokens left out; the head is
    `lm_head`, or with tied embeddings the embedding transposed."""
    one_layer = {"num_hidden_layers": 1, "layer_types": ("mla",), "mlp_layer_types": ("dense",)}
    model = KimiLinear(KimiLinearConfig(**{**KIMI_MOE, **one_layer}))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 64, size=(2, 12)).astype(np.int32)
    mb = {
        "inputs": ids,
        "targets": np.roll(ids, -1, -1),
        "segment_ids": np.repeat([[1] * 5 + [2] * 7], 2, 0),
        "loss_mask": (rng.random((2, 12)) > 0.3).astype(np.int32),
    }
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids))
    np.testing.assert_array_equal(lm_head_kernel(params), params["params"]["lm_head"])
    embed_VD = params["params"]["embed_tokens"]
    np.testing.assert_array_equal(lm_head_kernel({"params": {"embed_tokens": embed_VD}}), embed_VD.T)

    def loss_and_grads(chunk):
        loss_fn = lm_loss(model.apply, loss_chunk=chunk)
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, mb), has_aux=True))(params)

    (full, out0), g0 = loss_and_grads(0)
    (chunked, out4), g4 = loss_and_grads(4)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    assert float(out4.weight) == float(out0.weight) == mb["loss_mask"].sum()
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g4)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="loss_chunk=5 must be a positive divisor"):
        lm_loss(model.apply, loss_chunk=5)(params, mb)


def test_step_keeps_the_state_types_under_bfloat16_params():
    """The state a step returns has the types it was given (the loop's step is compiled once, for
    them): bfloat16 gradients divided by the float32 token count stay bfloat16, so the AdamW moments do too."""
    params = {"params": {"w": jnp.asarray(np.random.default_rng(1).normal(size=(7, 7)), jnp.bfloat16)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    step = jax.jit(make_train_step(Bigram(False).apply, tx, lambda s: 1e-2))
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0),
    }
    new_state, _ = step(state, batch(np.random.default_rng(0)))
    types = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert types(new_state) == types(state)
