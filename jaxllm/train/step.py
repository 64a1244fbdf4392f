"""The train step: pure functions of (state, batch), jitted by the loop with shardings.

State is a plain dict pytree: ``{"step", "params", "opt_state", "rng"}``; ``params``
is the model's variable dict (``{"params": ...}``) so ``model.apply(params, ...)``
takes it as is. A batch is ``{inputs, targets, segment_ids, loss_mask}``, each
``[grad_accum, batch, seq_len]``; microbatches are summed in a ``lax.scan`` so that
accumulation gives the same update as one big batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_for_compute(params, dtype):
    """Casts matrices (ndim >= 2) to ``dtype``; vectors (norms, biases, A_log, dt_bias) stay as they are."""
    if dtype == jnp.float32:
        return params
    return jax.tree.map(
        lambda p: p.astype(dtype) if p.ndim >= 2 and jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


def token_loss_sum(logits_BTV, targets_BT, mask_BT):
    """(sum of masked cross-entropy in float32, number of counted tokens)."""
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(ce_BT * mask_BT), jnp.sum(mask_BT)


def make_loss_fn(apply_fn: Callable, compute_dtype=jnp.float32):
    """loss_fn(params, microbatch) -> (objective, (ce_sum, count, aux_loss)).

    apply_fn returns a `jaxllm.models.base.ModelOutput`; objective = summed token cross-entropy +
    aux_loss * count (the model's auxiliary losses are per-microbatch means).
    """

    def loss_fn(params, mb):
        out = apply_fn(cast_for_compute(params, compute_dtype), mb["inputs"], segment_ids=mb["segment_ids"])
        loss_sum, count = token_loss_sum(out.logits, mb["targets"], mb["loss_mask"])
        aux = out.aux_loss()
        return loss_sum + aux * count, (loss_sum, count, aux)

    return loss_fn


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (no overflow from squaring, unlike a norm)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(
    apply_fn: Callable, tx: optax.GradientTransformation, schedule: Callable, compute_dtype=jnp.float32
):
    """train_step(state, batch) -> (new_state, metrics)."""
    grad_fn = jax.value_and_grad(make_loss_fn(apply_fn, compute_dtype), has_aux=True)

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        params = state["params"]

        def micro(carry, mb):
            grads, ce_sum, count, aux_sum = carry
            (_, (ce, n, aux)), g = grad_fn(params, mb)
            return (_tree_add(grads, g), ce_sum + ce, count + n, aux_sum + aux), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (grads, ce_sum, count, aux_sum), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": ce_sum / denom,  # token cross-entropy (without aux losses)
            "aux_loss": aux_sum / batch["inputs"].shape[0],
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "tokens": count,
            "params_finite": all_finite(new_params),
        }
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "rng": jax.random.split(state["rng"])[0],
        }
        return new_state, metrics

    return train_step


def make_eval_step(apply_fn: Callable, compute_dtype=jnp.float32):
    """eval_step(params, batch) -> (summed token cross-entropy, token count) over all microbatches.

    Sums, not a mean, so that several batches combine weighted by their token counts.
    """
    loss_fn = make_loss_fn(apply_fn, compute_dtype)

    def eval_step(params, batch):
        def micro(carry, mb):
            _, (ce, n, _) = loss_fn(params, mb)
            return (carry[0] + ce, carry[1] + n), None

        (l, n), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
        return l, n

    return eval_step
