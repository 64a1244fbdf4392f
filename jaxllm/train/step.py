"""The one step builder: every trainer's step is `make_step(loss_fn, tx, ...)`, a pure function of
(state, batch), jitted by its caller with shardings.

State is a plain dict pytree: ``{"step", "params", "opt_state", "rng"}``; ``params`` is the
model's variable dict (``{"params": ...}``) so ``model.apply(params, ...)`` takes it as is.

A loss function (nanodo's ``LossFnFactory`` pattern: a factory closes over the model and settings,
the step builder knows nothing of either) is ``loss_fn(params, batch, rng) -> (objective,
LossOutput)``. The objective is a *sum* over what ``LossOutput.weight`` counts (tokens); the step
sums objectives, gradients and metrics over microbatches and divides by the total weight, so
accumulation gives the update of one big batch. Trainers built on it:

- pretraining and agent SFT: ``lm_loss`` (masked token cross-entropy + the model's aux losses),
  batches ``{inputs, targets, segment_ids, loss_mask}`` of ``[grad_accum, batch, seq_len]``;
- AutoDeco heads: ``jaxllm.train.autodeco.make_train_step`` (one microbatch, weight 1);
- agent RL: ``jaxllm.agent.train.make_rl_step`` (clipped policy loss, one microbatch).

Load balancing: the loss function returns the MoE layers' routing counts (``LossOutput.load``,
the ``router_load`` collection the MoE module sows); after the optimizer update every layer's
``e_score_correction_bias`` moves by ``bias_update_rate * sign(mean load - load)``
(``jaxllm.nn.moe.update_correction_bias``), outside the gradient, and the metrics carry each
layer's max/mean load and overflow fraction (``moe/<layer>/...``).

NaN policy (one for every trainer): a step whose objective, gradient norm or updated parameters
are not all finite is not applied: params and optimizer state stay as they were, and
``metrics["finite"]`` is False; the driver then stops with ``NonFiniteLossError`` (``check_finite``), naming the step and
what was non-finite. Nothing non-finite ever enters the state or a checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxllm import sharding as shd
from jaxllm.errors import ConfigError, NonFiniteLossError
from jaxllm.models.base import lm_head_kernel
from jaxllm.nn._params import project
from jaxllm.nn.moe import (
    DROPPED_NAME,
    LOAD_NAME,
    ROUTER_LOAD,
    load_stats,
    sown_by_layer,
    update_correction_bias,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BIAS_NAME = "e_score_correction_bias"  # the MoE param the balancing moves (next to its sown load)


@flax.struct.dataclass
class LossOutput:
    """What a loss function reports besides its objective, per microbatch.

    weight: what the objective sums over (e.g. counted tokens); gradients and ``means`` are
      divided by the total over microbatches (at least 1).
    means: name -> a sum over this microbatch, reported divided by the total weight.
    totals: name -> reported summed over microbatches as is (counts).
    load: the model's sown routing counts (``{module path...: {"expert_load": [E]}}``), or {}.
    """

    weight: jax.Array
    means: dict
    totals: dict = flax.struct.field(default_factory=dict)
    load: dict = flax.struct.field(default_factory=dict)


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


def chunked_token_loss_sum(hidden_BTD, head_DV, targets_BT, mask_BT, chunk: int):
    """`token_loss_sum` of the logits ``hidden @ head`` (float32, as `lm_head_logits` computes them),
    never holding more than ``chunk`` positions of every row's logits at once.

    The T positions are taken in T/chunk chunks, strided (chunk i holds positions i, i + T/chunk,
    ...), so that every chunk keeps the sequence's split over the `context` axis; a scan computes
    each chunk's logits and reduces them to the loss sum, and the backward recomputes them
    (`jax.checkpoint`) instead of keeping [B,T,V] floats. The head's gradient is summed over the
    chunks in float32."""
    B, T, D = hidden_BTD.shape
    if chunk < 1 or T % chunk:
        raise ValueError(f"loss_chunk={chunk} must be a positive divisor of the sequence length T={T}")
    n = T // chunk

    def strided(x, names):  # [B,T,...] -> [n,B,chunk,...]: chunk i = positions i, i+n, i+2n, ...
        x = jnp.moveaxis(x.reshape(B, chunk, n, *x.shape[2:]), 2, 0)
        return shd.constrain(x, (None, "batch", "length", *names))

    head32_DV = head_DV.astype(jnp.float32)  # the cotangent summed over chunks stays float32

    @jax.checkpoint
    def one(carry, xs):
        h_BCD, t_BC, m_BC = xs
        logits = project(h_BCD, head32_DV, dtype=h_BCD.dtype, out_dtype=jnp.float32)
        logits = shd.constrain(logits, ("batch", "length", "vocab"))
        ce_sum, count = token_loss_sum(logits, t_BC, m_BC)
        return (carry[0] + ce_sum, carry[1] + count), None

    xs = (strided(hidden_BTD, ("act_embed",)), strided(targets_BT, ()), strided(mask_BT, ()))
    (ce_sum, count), _ = jax.lax.scan(one, (jnp.float32(0), jnp.float32(0)), xs)
    return ce_sum, count


def apply_with_load(apply_fn: Callable, params, *args, **kwargs):
    """(ModelOutput, routing counts): ``apply_fn`` with the MoE ``router_load`` collection mutable."""
    out, sown = apply_fn(params, *args, mutable=[ROUTER_LOAD], **kwargs)
    return out, dict(sown.get(ROUTER_LOAD, {}))


def lm_loss(apply_fn: Callable, compute_dtype=jnp.float32, loss_chunk: int = 0):
    """loss_fn for next-token training: objective = summed masked cross-entropy + aux_loss * count.

    apply_fn returns a `jaxllm.models.base.ModelOutput`, whose auxiliary losses are per-microbatch
    means (hence weighted by the token count). Reports ``loss`` (cross-entropy alone), ``aux_loss``
    and each named aux loss as ``aux/<name>``, and ``tokens``.

    ``loss_chunk`` > 0: the cross-entropy applies the LM head itself to ``out.hidden`` in chunks of
    that many positions (`chunked_token_loss_sum`); ``out.logits`` is then unused and XLA drops it
    from the jitted step, so no [B,T,V] logits are held. 0: from ``out.logits``.
    """

    def loss_fn(params, mb, rng=None):
        del rng  # no dropout
        params = cast_for_compute(params, compute_dtype)
        out, load = apply_with_load(apply_fn, params, mb["inputs"], segment_ids=mb["segment_ids"])
        if loss_chunk:
            ce_sum, count = chunked_token_loss_sum(
                out.hidden, lm_head_kernel(params), mb["targets"], mb["loss_mask"], loss_chunk
            )
        else:
            ce_sum, count = token_loss_sum(out.logits, mb["targets"], mb["loss_mask"])
        aux = out.aux_loss()
        means = {"loss": ce_sum, "aux_loss": aux * count}
        means.update({f"aux/{k}": v * count for k, v in out.aux_losses.items()})
        return ce_sum + aux * count, LossOutput(count, means, {"tokens": count}, load)

    return loss_fn


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (no overflow from squaring, unlike a norm)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_loads(load_tree) -> dict[str, jax.Array]:
    """{"layers_1/moe": counts [E], ...} from the sown ``router_load`` tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(load_tree)[0]:
        names = _path_names(path)
        if names and names[-1] == LOAD_NAME:
            out["/".join(names[:-1])] = leaf
    return out


def update_correction_biases(new_params, old_params, load_tree, rate):
    """``new_params`` with every MoE layer's ``e_score_correction_bias`` set to its value in
    ``old_params`` moved towards balance by the layer's counts (``update_correction_bias``): whatever
    the optimizer did to it (weight decay) is discarded, and rate 0 keeps it as it was. A layer's
    bias is the param whose module path is the sown counts' path."""
    loads = layer_loads(load_tree)

    def visit(path, new, old):
        names = _path_names(path)
        layer = "/".join(names[1:-1])  # drop the "params" collection name
        if names[-1] != BIAS_NAME or layer not in loads:
            return new
        return update_correction_bias(old, loads[layer], rate)

    return jax.tree_util.tree_map_with_path(visit, new_params, old_params)


def count_correction_biases(params) -> int:
    """How many ``e_score_correction_bias`` params (MoE layers the balancing can move) ``params`` has."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
    return sum(_path_names(p)[-1] == BIAS_NAME for p, _ in flat)


def require_correction_biases(rate: float, params, model: str) -> None:
    """A ConfigError when balancing is asked for (``moe_bias_update_rate`` > 0) but ``params``
    (boxed or not) hold no ``e_score_correction_bias`` to move."""
    if rate and not count_correction_biases(params):
        raise ConfigError(
            f"moe_bias_update_rate={rate} needs MoE layers with an e_score_correction_bias (kimi_linear "
            f"with num_experts > 0); model {model!r} has none. Set moe_bias_update_rate=0 (Qwen3-MoE "
            "balances with router_aux_loss_coef instead)"
        )


DROPPED_COUNT = "dropped_count/"  # step metrics: a MoE layer's dropped assignments (not logged as is)


def load_metrics(load_tree) -> dict[str, jax.Array]:
    """Per MoE layer ``moe/<layer>/max_mean_load`` and ``moe/<layer>/overflow`` (``load_stats``),
    plus ``moe_max_mean_load`` (the worst layer) and ``moe_overflow`` (the mean over layers);
    the step's counts themselves as ``expert_load/<layer>`` ([E]) and the assignments each layer
    dropped (sown as ``dropped``: past an expert-parallel capacity, 0 when dropless) as
    ``dropped_count/<layer>``, summed over microbatches (not logged as is: ``metrics`` turns them
    into fractions)."""
    loads = layer_loads(load_tree)
    if not loads:
        return {}
    out = {
        DROPPED_COUNT + k: v.astype(jnp.float32) for k, v in sown_by_layer(load_tree, DROPPED_NAME).items()
    }
    ratios, overs = [], []
    for layer, load in loads.items():
        ratio, over = load_stats(load)
        out[f"moe/{layer}/max_mean_load"], out[f"moe/{layer}/overflow"] = ratio, over
        out[f"expert_load/{layer}"] = load
        ratios.append(ratio)
        overs.append(over)
    out["moe_max_mean_load"] = jnp.max(jnp.stack(ratios))
    out["moe_overflow"] = jnp.mean(jnp.stack(overs))
    return out


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    schedule: Callable | None = None,
    microbatched: bool = True,
    bias_update_rate: float = 0.0,
):
    """step(state, batch) -> (new_state, metrics), the one train step of every trainer.

    ``loss_fn(params, batch, rng) -> (objective, LossOutput)``. ``microbatched``: every batch leaf
    has a leading microbatch axis, scanned over (gradients summed); else the batch is one
    microbatch. ``bias_update_rate``: the aux-loss-free balancing rate (0 = off). Metrics: the loss
    function's ``means`` and ``totals``, ``grad_norm``, ``lr`` (with a ``schedule``), ``finite``
    and the MoE load metrics when the model sows routing counts.
    """
    if not (isinstance(bias_update_rate, (int, float)) and 0 <= bias_update_rate < float("inf")):
        raise ValueError(f"bias_update_rate must be a finite number >= 0, got {bias_update_rate!r}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(params, mb, rng):
        (objective, out), grads = grad_fn(params, mb, rng)
        return objective, out, grads

    def step(state: dict[str, Any], batch):
        params = state["params"]
        next_rng, step_rng = jax.random.split(state["rng"])
        if microbatched:
            n_micro = jax.tree.leaves(batch)[0].shape[0]
            rngs = jax.random.split(step_rng, n_micro)
            first = jax.tree.map(lambda x: x[0], batch)
            shapes = jax.eval_shape(one, params, first, rngs[0])
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def micro(carry, xs):
                mb, rng = xs
                return _tree_add(carry, one(params, mb, rng)), None

            (objective, out, grads), _ = jax.lax.scan(micro, zeros, (batch, rngs))
        else:
            objective, out, grads = one(params, batch, step_rng)
        denom = jnp.maximum(out.weight, 1.0)
        # in each gradient's own dtype: a float32 quotient of bfloat16 gradients would double their
        # bytes and turn the optimizer's moments float32, changing the state's types after step 1
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(nn.meta.unbox(grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_params = update_correction_biases(new_params, params, out.load, bias_update_rate)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm) & all_finite(new_params)
        # NaN policy: a non-finite update is not applied (the driver stops on metrics["finite"]).
        keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "params": keep_finite(new_params, params),
            "opt_state": keep_finite(opt_state, state["opt_state"]),
            "rng": next_rng,
        }
        metrics = {k: v / denom for k, v in out.means.items()}
        metrics.update(out.totals)
        metrics.update(load_metrics(out.load))
        metrics["grad_norm"] = grad_norm
        metrics["finite"] = finite
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return step


def nonfinite_what(metrics) -> str | None:
    """What was non-finite in a step's (host) metrics, or None when the step was applied."""
    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
        if key in metrics and not math.isfinite(float(metrics[key])):
            return f"{name} ({float(metrics[key])})"
    if not bool(metrics["finite"]):
        return "objective or parameters after the update"
    return None


def check_finite(metrics, step: int, *, last_good: int | None = None, directory: str = "") -> None:
    """The drivers' side of the NaN policy: raise ``NonFiniteLossError`` when step ``step`` was not applied."""
    what = nonfinite_what(metrics)
    if what is not None:
        raise NonFiniteLossError(step, what, last_good, directory)


def make_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable,
    compute_dtype=jnp.float32,
    *,
    bias_update_rate: float = 0.0,
    loss_chunk: int = 0,
):
    """The next-token train step (pretraining, agent SFT): ``make_step(lm_loss(...))``."""
    return make_step(
        lm_loss(apply_fn, compute_dtype, loss_chunk), tx, schedule=schedule, bias_update_rate=bias_update_rate
    )


def make_eval_step(apply_fn: Callable, compute_dtype=jnp.float32, loss_chunk: int = 0):
    """eval_step(params, batch) -> (summed token cross-entropy, token count) over all microbatches.

    Sums, not a mean, so that several batches combine weighted by their token counts.
    """
    loss_fn = lm_loss(apply_fn, compute_dtype, loss_chunk)

    def eval_step(params, batch):
        def micro(carry, mb):
            _, out = loss_fn(params, mb)
            return (carry[0] + out.means["loss"], carry[1] + out.weight), None

        (l, n), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
        return l, n

    return eval_step
