"""Batched next-token sampling as pure, jit-able functions.

One step turns ``logits_BV`` into ``token_B``. The pipeline follows vLLM's v1 sampler, which is
what the official AutoDeco evaluation ran on:

1. penalties over previously generated tokens (repetition: divide positive / multiply negative
   logits by the penalty; presence: subtract a constant),
2. greedy rows take the argmax here (``mode="greedy"`` or an effective temperature < 1e-5),
3. divide by the temperature,
4. min-p on the tempered probabilities (keep ``p >= min_p * max p``),
5. top-k (ties with the k-th logit are kept),
6. hard top-p on what is left: keep the smallest set of most likely tokens whose mass reaches
   ``p``, *including* the token that crosses ``p`` (the top token is always kept),
7. draw from the renormalised distribution.

Modes:
  * ``"greedy"``: argmax after penalties.
  * ``"sample"``: the user's temperature / top-k / top-p / min-p.
  * ``"autodeco"``: per-row ``T`` and ``P`` predicted by the AutoDeco heads, combined with the
    user's values as the official vLLM path does: ``T = T_head * temperature`` (greedy when the
    user temperature is 0) and ``P = clip(P_head * top_p, 0, 1)``.
  * ``"fixed_mean"``: like autodeco but with constant ``mean_temperature`` / ``mean_top_p`` (the
    mean of the heads' predictions; "MeanShift" in the cminst/SimpleDeco critique) in place of
    the per-token predictions.

``SamplingConfig`` is a frozen (hashable) dataclass, so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("greedy", "sample", "autodeco", "fixed_mean")
# vLLM treats temperatures below this as greedy.
SAMPLING_EPS = 1e-5


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Validated at construction; errors name the field.

    Attributes:
      mode: one of ``"greedy"``, ``"sample"``, ``"autodeco"``, ``"fixed_mean"``.
      temperature: user temperature (>= 0; 0 means greedy). In autodeco/fixed_mean modes it
        multiplies the predicted/mean temperature.
      top_k: keep the k most likely tokens; 0 disables.
      top_p: nucleus mass in (0, 1]; 1 disables in "sample" mode. In autodeco/fixed_mean modes it
        multiplies the predicted/mean top-p (then clipped to [0, 1]).
      min_p: keep tokens with probability >= min_p * max probability; 0 disables.
      presence_penalty: subtracted from the logits of previously generated tokens.
      repetition_penalty: > 0; previously generated tokens' positive logits are divided by it,
        negative ones multiplied (1 disables).
      mean_temperature, mean_top_p: the static T / P of ``mode="fixed_mean"`` (required there,
        rejected elsewhere so that they are never silently ignored).
    """

    mode: str = "sample"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    mean_temperature: float | None = None
    mean_top_p: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"SamplingConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise ValueError(f"SamplingConfig.{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingConfig.min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"SamplingConfig.repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.mode == "fixed_mean":
            t, p = self.mean_temperature, self.mean_top_p
            if t is None or not _is_number(t) or not math.isfinite(t) or t <= 0:
                raise ValueError(
                    f"SamplingConfig.mean_temperature must be a number > 0 for mode='fixed_mean', got {t!r}"
                )
            if p is None or not _is_number(p) or not 0.0 < p <= 1.0:
                raise ValueError(
                    f"SamplingConfig.mean_top_p must be in (0, 1] for mode='fixed_mean', got {p!r}"
                )
        else:
            for name in ("mean_temperature", "mean_top_p"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"SamplingConfig.{name} is only used by mode='fixed_mean' (mode is {self.mode!r})"
                    )

    @property
    def is_greedy(self) -> bool:
        """True when every row is decoded greedily whatever the heads say."""
        return self.mode == "greedy" or self.temperature < SAMPLING_EPS


# --------------------------------------------------------------------------------------------
# building blocks (each a pure function on a batch of rows)


def seen_mask(prev_tokens_BT, prev_mask_BT, vocab_size: int):
    """[B, V] bool: which tokens occur among the (unmasked) previous tokens of each row."""
    B = prev_tokens_BT.shape[0]
    # Masked-out slots are sent out of range and dropped by the scatter.
    ids_BT = jnp.where(prev_mask_BT, prev_tokens_BT, vocab_size)
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], ids_BT.shape)
    return jnp.zeros((B, vocab_size), bool).at[rows_BT, ids_BT].set(True, mode="drop")


def apply_penalties(logits_BV, seen_BV, *, presence_penalty=0.0, repetition_penalty=1.0):
    """Repetition penalty (vLLM/HF convention) then presence penalty on previously seen tokens."""
    if repetition_penalty != 1.0:
        penalised = jnp.where(logits_BV > 0, logits_BV / repetition_penalty, logits_BV * repetition_penalty)
        logits_BV = jnp.where(seen_BV, penalised, logits_BV)
    if presence_penalty != 0.0:
        logits_BV = logits_BV - presence_penalty * seen_BV.astype(logits_BV.dtype)
    return logits_BV


def min_p_keep_mask(logits_BV, min_p):
    """Keep tokens whose probability is >= ``min_p`` times the row's largest probability."""
    # p_i / p_max = exp(l_i - l_max): no normalisation needed.
    rel_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))
    return rel_BV >= min_p


def top_k_keep_mask(logits_BV, k: int):
    """Keep the k largest logits of each row (ties with the k-th are kept)."""
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return logits_BV >= kth_B1


def top_p_keep_mask(logits_BV, top_p_B):
    """Hard nucleus: the most likely tokens whose mass reaches ``top_p``, crossing token included.

    vLLM's formulation: sort ascending, drop tokens while the ascending cumsum is <= 1 - p, never
    drop the top token. Accumulating from the tail keeps ``p = 1`` from dropping tiny-but-nonzero
    tokens through rounding. ``logits_BV`` may contain -inf (already masked tokens).
    """
    sorted_BV = jnp.sort(logits_BV, axis=-1)
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    drop_BV = cum_BV <= (1.0 - top_p_B)[:, None]
    drop_BV = drop_BV.at[:, -1].set(False)
    # The dropped set is a prefix of the ascending order; its length points at the threshold.
    n_drop_B = jnp.sum(drop_BV, axis=-1)
    thresh_B1 = jnp.take_along_axis(sorted_BV, n_drop_B[:, None], axis=-1)
    return logits_BV >= thresh_B1


def row_temperature_top_p(
    config: SamplingConfig, batch: int, temperature_B=None, top_p_B=None, dtype=jnp.float32
):
    """Effective per-row (temperature, top_p) for ``config`` (see module docstring)."""
    if config.mode == "autodeco":
        t_B = temperature_B.astype(dtype) * config.temperature
        p_B = jnp.clip(top_p_B.astype(dtype) * config.top_p, 0.0, 1.0)
    elif config.mode == "fixed_mean":
        t_B = jnp.full((batch,), config.mean_temperature * config.temperature, dtype)
        p_B = jnp.full((batch,), min(max(config.mean_top_p * config.top_p, 0.0), 1.0), dtype)
    else:
        t_B = jnp.full((batch,), config.temperature, dtype)
        p_B = jnp.full((batch,), config.top_p, dtype)
    return t_B, p_B


def processed_logits(
    logits_BV,
    config: SamplingConfig,
    *,
    prev_tokens_BT=None,
    prev_mask_BT=None,
    temperature_B=None,
    top_p_B=None,
):
    """The pipeline up to the draw.

    Returns ``(final_logits_BV, greedy_B, argmax_B)``: tempered logits with -inf on every excluded
    token (the sampling distribution is their softmax), which rows are greedy, and the greedy
    choice (argmax after penalties).
    """
    B, V = logits_BV.shape
    logits_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
    if prev_tokens_BT is not None and (config.presence_penalty != 0.0 or config.repetition_penalty != 1.0):
        seen_BV = seen_mask(prev_tokens_BT, prev_mask_BT, V)
        logits_BV = apply_penalties(
            logits_BV,
            seen_BV,
            presence_penalty=config.presence_penalty,
            repetition_penalty=config.repetition_penalty,
        )
    argmax_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    t_B, p_B = row_temperature_top_p(config, B, temperature_B, top_p_B, logits_BV.dtype)
    greedy_B = (t_B < SAMPLING_EPS) | config.is_greedy
    scaled_BV = logits_BV / jnp.where(greedy_B, 1.0, t_B)[:, None]
    neg_inf = jnp.array(-jnp.inf, scaled_BV.dtype)
    if config.min_p > 0.0:
        scaled_BV = jnp.where(min_p_keep_mask(scaled_BV, config.min_p), scaled_BV, neg_inf)
    if 0 < config.top_k < V:
        scaled_BV = jnp.where(top_k_keep_mask(scaled_BV, config.top_k), scaled_BV, neg_inf)
    # In "sample" mode top_p == 1 is a no-op; the head-driven modes always apply it.
    if config.mode in ("autodeco", "fixed_mean") or config.top_p < 1.0:
        scaled_BV = jnp.where(top_p_keep_mask(scaled_BV, p_B), scaled_BV, neg_inf)
    return scaled_BV, greedy_B, argmax_B


def sampling_probs(
    logits_BV,
    config: SamplingConfig,
    *,
    prev_tokens_BT=None,
    prev_mask_BT=None,
    temperature_B=None,
    top_p_B=None,
):
    """[B, V] distribution that :func:`sample_next` draws from (one-hot on greedy rows).

    Same arguments as :func:`sample_next` without the key; useful for diagnostics and for
    scoring (e.g. the probability AutoDeco's decoding gives a reference token).
    """
    extra = _validate(logits_BV, config, prev_tokens_BT, prev_mask_BT, temperature_B, top_p_B)
    return _sampling_probs_impl(logits_BV, config, **extra)


@functools.partial(jax.jit, static_argnames=("config",))
def _sampling_probs_impl(logits_BV, config, **extra):
    final_BV, greedy_B, argmax_B = processed_logits(logits_BV, config, **extra)
    onehot_BV = jax.nn.one_hot(argmax_B, logits_BV.shape[-1], dtype=final_BV.dtype)
    return jnp.where(greedy_B[:, None], onehot_BV, jax.nn.softmax(final_BV, axis=-1))


# --------------------------------------------------------------------------------------------
# entry point


def _validate_rng(rng, batch: int):
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.dtype == jnp.uint32 and rng.ndim in (1, 2):
        rng = jax.random.wrap_key_data(rng)  # raw PRNGKey data: [2] one key, [B, 2] one per row
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.shape not in ((), (batch,)):
        raise ValueError(
            f"rng must be one PRNG key (jax.random.key(...) or PRNGKey) or one per row ([B] = [{batch}] "
            f"keys), got dtype {rng.dtype} shape {tuple(rng.shape)}"
        )
    return rng


def _validate(logits_BV, config, prev_tokens_BT, prev_mask_BT, temperature_B, top_p_B):
    if not isinstance(config, SamplingConfig):
        raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
    if logits_BV.ndim != 2:
        raise ValueError(f"logits_BV must be [B, V], got shape {tuple(logits_BV.shape)}")
    if not jnp.issubdtype(logits_BV.dtype, jnp.floating):
        raise ValueError(f"logits_BV must be floating point, got dtype {logits_BV.dtype}")
    B, V = logits_BV.shape
    if prev_tokens_BT is None:
        if prev_mask_BT is not None:
            raise ValueError("prev_mask_BT given without prev_tokens_BT")
    else:
        if prev_tokens_BT.ndim != 2 or prev_tokens_BT.shape[0] != B:
            raise ValueError(f"prev_tokens_BT must be [B={B}, T], got shape {tuple(prev_tokens_BT.shape)}")
        if not jnp.issubdtype(prev_tokens_BT.dtype, jnp.integer):
            raise ValueError(f"prev_tokens_BT must be integers, got dtype {prev_tokens_BT.dtype}")
        if prev_mask_BT is None:
            prev_mask_BT = jnp.ones(prev_tokens_BT.shape, bool)
        if tuple(prev_mask_BT.shape) != tuple(prev_tokens_BT.shape):
            raise ValueError(
                f"prev_mask_BT must match prev_tokens_BT's shape {tuple(prev_tokens_BT.shape)}, got "
                f"{tuple(prev_mask_BT.shape)}"
            )
        prev_mask_BT = prev_mask_BT.astype(bool)
        if not isinstance(prev_tokens_BT, jax.core.Tracer) and not isinstance(prev_mask_BT, jax.core.Tracer):
            tok, m = np.asarray(prev_tokens_BT), np.asarray(prev_mask_BT)
            bad = m & ((tok < 0) | (tok >= V))
            if bad.any():
                raise ValueError(
                    f"prev_tokens_BT has ids outside [0, {V}) where prev_mask_BT is True: "
                    f"{np.unique(tok[bad])[:8].tolist()}"
                )
    heads = {"temperature_B": temperature_B, "top_p_B": top_p_B}
    if config.mode == "autodeco":
        for name, x in heads.items():
            if x is None:
                raise ValueError(f"{name} (the AutoDeco head's prediction) is required for mode='autodeco'")
            if x.ndim == 2 and x.shape[-1] == 1:
                x = x[:, 0]
            if tuple(x.shape) != (B,):
                raise ValueError(f"{name} must be [B] = ({B},), got shape {tuple(heads[name].shape)}")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
            heads[name] = x
    else:
        for name, x in heads.items():
            if x is not None:
                raise ValueError(f"{name} is only used by mode='autodeco' (mode is {config.mode!r})")
    return dict(
        prev_tokens_BT=prev_tokens_BT,
        prev_mask_BT=prev_mask_BT,
        temperature_B=heads["temperature_B"],
        top_p_B=heads["top_p_B"],
    )


def sample_next(
    logits_BV,
    rng,
    config: SamplingConfig,
    *,
    prev_tokens_BT=None,
    prev_mask_BT=None,
    temperature_B=None,
    top_p_B=None,
):
    """Pick the next token of every row.

    Args:
      logits_BV: ``[B, V]`` next-token logits.
      rng: one PRNG key for the whole batch (rows draw independently), or ``[B]`` keys, one per
        row: a row's draw then depends on its own key only, whatever else is in the batch.
      config: a :class:`SamplingConfig` (static under ``jax.jit``).
      prev_tokens_BT: ``[B, T]`` previously generated tokens, for the penalties.
      prev_mask_BT: ``[B, T]`` which of ``prev_tokens_BT`` count (default: all).
      temperature_B, top_p_B: ``[B]`` (or ``[B, 1]``) AutoDeco head predictions; required for
        ``mode="autodeco"`` and rejected otherwise.

    Returns:
      ``[B]`` int32 token ids.
    """
    rng = _validate_rng(rng, logits_BV.shape[0] if getattr(logits_BV, "ndim", 0) == 2 else -1)
    extra = _validate(logits_BV, config, prev_tokens_BT, prev_mask_BT, temperature_B, top_p_B)
    return _sample_impl(logits_BV, rng, config, **extra)


# Validation runs outside; the array work is one jitted computation (inlined under an outer jit).
@functools.partial(jax.jit, static_argnames=("config",))
def _sample_impl(logits_BV, rng, config, **extra):
    final_BV, greedy_B, argmax_B = processed_logits(logits_BV, config, **extra)
    if config.is_greedy:
        return argmax_B
    if rng.shape:  # one key per row
        drawn_B = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, final_BV)
    else:
        drawn_B = jax.random.categorical(rng, final_BV, axis=-1)
    drawn_B = drawn_B.astype(jnp.int32)
    return jnp.where(greedy_B, argmax_B, drawn_B)
