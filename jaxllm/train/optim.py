"""Optimizer: AdamW + linear warmup + cosine decay + global-norm clipping.

No weight decay on the KDA decay parameters (``A_log``, ``dt_bias``), on norm
scales, or on biases (``decay_mask``).
"""

from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("A_log", "dt_bias", "bias")


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decays(path, leaf) -> bool:
    """True if the param at ``path`` gets weight decay."""
    names = [_key_name(k) for k in path]
    if names and names[-1] in NO_DECAY_NAMES:
        return False
    if any("norm" in n.lower() for n in names):
        return False
    return getattr(leaf, "ndim", 0) >= 2


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """lr of update ``count`` (0-based): linear warmup reaching ``lr`` at update ``warmup_steps``
    (update 0 already uses ``lr / warmup_steps``), then cosine decay to ``lr * min_lr_ratio`` at
    the last update."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=lr * min_lr_ratio,
    )
    return lambda count: base(count + 1)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) from a RunConfig."""
    schedule = lr_schedule(config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )
    return tx, schedule
