"""Heads-only AutoDeco training step (frozen base model).

The base model's final-normed hidden states and logits come in as arrays (computed by the caller
once, under ``stop_gradient``); only the two heads' parameters are updated. The loss is the
official ``temp_loss + top_p_loss`` (:func:`jaxllm.ops.autodeco.autodeco_loss`):

* the top-p loss back-propagates into the temperature head through ``softmax(logits / T)``;
* the top-p head sees ``T`` through ``stop_gradient`` (inside :class:`AutoDecoHeads`);
* the easy-token drop draws one uniform per shifted position from the state's PRNG key
  (or takes ``batch["rand_vals"]`` when given, e.g. to replay the official draws).

The step is :func:`jaxllm.train.step.make_step` (the one builder, its NaN policy included):
``state = {"step", "params", "opt_state", "rng"}``
and ``train_step(state, batch) -> (new_state, metrics)``, a pure function to wrap in ``jax.jit``
(with shardings) by the caller. ``batch = {"hidden": [B, S, H], "logits": [B, S, V],
"labels": [B, S]}`` (labels HF-style: ``-100`` ignored, shifted inside the loss).

The official recipe is AdamW, lr 5e-6, batch 32, one epoch, from heads trained jointly with a
pretrained base. Freshly initialised heads on a small model usually want a larger lr (1e-4 to
1e-3); ``learning_rate`` may be an optax schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxllm.nn.autodeco import HEADS, AutoDecoHeads
from jaxllm.ops.autodeco import VARIANTS, autodeco_loss
from jaxllm.train.step import LossOutput, make_step


@dataclasses.dataclass(frozen=True)
class AutoDecoTrainConfig:
    """Heads-only training settings; validated at construction (errors name the field).

    Attributes:
      learning_rate: float > 0 or an optax schedule (official: 5e-6).
      weight_decay: AdamW decoupled weight decay (official/TRL default: 0).
      max_grad_norm: global-norm clip; None disables (HF Trainer default: 1.0).
      b1, b2, eps: AdamW moments (torch defaults).
      variant: ``"hf"`` or ``"megatron"`` loss conventions (see :mod:`jaxllm.ops.autodeco`).
      alpha: soft top-p steepness (official: 30).
      drop_prob: easy-token drop probability (official: 0.6).
      chunk_size: rows per chunk in the loss (None = automatic, memory-bounded).
      train_heads: which heads are updated and which losses are summed
        (``"temp_head"`` -> temperature loss, ``"top_p_head"`` -> soft top-p loss).
    """

    learning_rate: float | Callable = 5e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    variant: str = "hf"
    alpha: float = 30.0
    drop_prob: float = 0.6
    chunk_size: int | None = None
    train_heads: tuple = HEADS

    def __post_init__(self):
        lr = self.learning_rate
        if not callable(lr) and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(
                f"AutoDecoTrainConfig.learning_rate must be > 0 or an optax schedule, got {lr!r}"
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"AutoDecoTrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"AutoDecoTrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}"
            )
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"AutoDecoTrainConfig.b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.variant not in VARIANTS:
            raise ValueError(f"AutoDecoTrainConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.alpha > 0:
            raise ValueError(f"AutoDecoTrainConfig.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.drop_prob <= 1:
            raise ValueError(f"AutoDecoTrainConfig.drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.chunk_size is not None and not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ValueError(
                f"AutoDecoTrainConfig.chunk_size must be a positive int or None, got {self.chunk_size!r}"
            )
        heads = tuple(self.train_heads)
        if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
            raise ValueError(
                f"AutoDecoTrainConfig.train_heads must be a non-empty subset of {HEADS}, got {self.train_heads!r}"
            )
        object.__setattr__(self, "train_heads", heads)


def _head_labels(params):
    """'train' / 'freeze' per leaf, by top-level head name (works on boxed params too)."""
    inner = params["params"]
    return {"params": {head: jax.tree.map(lambda _: head, sub) for head, sub in inner.items()}}


def make_optimizer(config: AutoDecoTrainConfig) -> optax.GradientTransformation:
    """AdamW (+ global-norm clip) on the trained heads; untrained heads get zero updates."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        )
    )
    tx = optax.chain(*parts)
    if set(config.train_heads) == set(HEADS):
        return tx
    transforms = {h: (tx if h in config.train_heads else optax.set_to_zero()) for h in HEADS}
    return optax.multi_transform(transforms, _head_labels)


def init_state(params, optimizer: optax.GradientTransformation, rng) -> dict[str, Any]:
    """``{"step": 0, "params", "opt_state", "rng"}`` for head ``params`` (``{"params": ...}``)."""
    if not isinstance(params, dict) or "params" not in params:
        raise ValueError("params must be the heads' variables dict {'params': ...}")
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": rng,
    }


def check_batch(batch) -> None:
    """Shape/dtype checks at the boundary (label values are checked when concrete)."""
    for k in ("hidden", "logits", "labels"):
        if k not in batch:
            raise ValueError(f"batch is missing {k!r} (needs hidden [B,S,H], logits [B,S,V], labels [B,S])")
    h, lg, y = batch["hidden"], batch["logits"], batch["labels"]
    if h.ndim != 3:
        raise ValueError(f"batch['hidden'] must be [B, S, H], got shape {tuple(h.shape)}")
    if lg.ndim != 3 or tuple(lg.shape[:2]) != tuple(h.shape[:2]):
        raise ValueError(
            f"batch['logits'] must be [B, S, V] with B, S = {tuple(h.shape[:2])}, got shape {tuple(lg.shape)}"
        )
    if tuple(y.shape) != tuple(h.shape[:2]):
        raise ValueError(f"batch['labels'] must be [B, S] = {tuple(h.shape[:2])}, got shape {tuple(y.shape)}")
    if "rand_vals" in batch and tuple(batch["rand_vals"].shape) != (h.shape[0], h.shape[1] - 1):
        raise ValueError(
            f"batch['rand_vals'] must be [B, S-1] = {(h.shape[0], h.shape[1] - 1)}, got "
            f"shape {tuple(batch['rand_vals'].shape)}"
        )


def make_loss_fn(module: AutoDecoHeads, config: AutoDecoTrainConfig):
    """loss_fn(params, batch, rand_vals) -> (loss, aux) with aux the loss dict, T and P."""

    def loss_fn(params, batch, rand_vals):
        # The base model is frozen: its outputs are constants here.
        hidden = jax.lax.stop_gradient(batch["hidden"])
        logits = jax.lax.stop_gradient(batch["logits"])
        temperature, top_p = module.apply(params, hidden, logits)
        out = autodeco_loss(
            logits,
            temperature,
            top_p,
            batch["labels"],
            rand_vals,
            variant=config.variant,
            alpha=config.alpha,
            drop_prob=config.drop_prob,
            chunk_size=config.chunk_size,
        )
        loss = 0.0
        if "temp_head" in config.train_heads:
            loss = loss + out["temp_loss"]
        if "top_p_head" in config.train_heads:
            loss = loss + out["top_p_loss"]
        return loss, (out, temperature, top_p)

    return loss_fn


def make_train_step(
    module: AutoDecoHeads, optimizer: optax.GradientTransformation, config: AutoDecoTrainConfig
):
    """train_step(state, batch) -> (new_state, metrics); pure, wrap in ``jax.jit``. The shared step
    builder (`jaxllm.train.step.make_step`, one microbatch) around the AutoDeco loss; the easy-token
    draws come from the step's key (``batch["rand_vals"]`` replaces them)."""
    loss_fn = make_loss_fn(module, config)

    def step_loss(params, batch, rng):
        B, S = batch["labels"].shape
        compute_dtype = jnp.promote_types(batch["logits"].dtype, jnp.float32)
        rand_vals = batch.get("rand_vals")
        if rand_vals is None:
            rand_vals = jax.random.uniform(rng, (B, S - 1), compute_dtype)
        loss, (out, temperature, top_p) = loss_fn(params, batch, rand_vals)
        # Mean predictions over the positions the loss covers (the same shift as the loss).
        valid = (batch["labels"][:, 1:] != -100).astype(compute_dtype)
        n = jnp.maximum(valid.sum(), 1.0)
        means = {
            "loss": loss,
            "temp_loss": out["temp_loss"],
            "top_p_loss": out["top_p_loss"],
            "mean_temperature": jnp.sum(temperature[:, :-1, 0] * valid) / n,
            "mean_top_p": jnp.sum(top_p[:, :-1, 0] * valid) / n,
        }
        totals = {"n_valid": out["n_valid"], "n_temp": out["n_temp"]}
        return loss, LossOutput(jnp.float32(1.0), means, totals)  # the loss is a mean already

    step = make_step(step_loss, optimizer, microbatched=False)

    def train_step(state, batch):
        check_batch(batch)
        return step(state, batch)

    return train_step
