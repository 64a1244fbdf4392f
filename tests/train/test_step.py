"""The pure train step: masked token loss, aux losses, accumulation and the finiteness flag."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.models.base import ModelOutput
from jaxllm.train.step import all_finite, make_train_step, token_loss_sum


class Bigram:
    """apply(variables, ids, segment_ids=...) -> ModelOutput with aux_losses {"l2": 0.5 * mean(W^2)}."""

    def __init__(self, with_aux):
        self.with_aux = with_aux

    def apply(self, variables, ids, *, segment_ids):
        del segment_ids
        w = variables["params"]["w"]
        logits = w[ids]
        aux = {"l2": 0.5 * jnp.mean(w**2)} if self.with_aux else {}
        return ModelOutput(logits, logits, aux_losses=aux)


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
    assert bool(m["params_finite"])


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
