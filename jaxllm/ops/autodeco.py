"""AutoDeco losses and probability statistics as pure functions on arrays.

AutoDeco (arXiv 2510.26697) puts two small heads beside the LM head that predict a temperature
``T`` and a top-p ``P`` for every position. This module holds the array-level half:

* :func:`prob_stats` -- the four statistics the top-p head reads (max prob, entropy, variance over
  the vocabulary, top-5 mass of ``softmax(logits / (T + 1e-8))``).
* :func:`soft_top_p_loss` -- the differentiable soft top-p loss.
* :func:`temperature_loss` -- the temperature loss with the random "easy token" drop.
* :func:`autodeco_loss` -- both at once, sharing the shift and the drop mask.

Conventions follow the official code (Zacks917/AutoDeco, ``model/templlm_auto.py``):
logits at position t predict ``labels[t + 1]`` (the shift happens here), ``-100`` labels are
ignored, ``T`` and ``P`` are shaped ``[B, S, 1]`` and the losses are means over the tokens they
cover. All epsilons of the official code are kept on purpose: where the gold token falls outside
the nucleus they set the gradient's size by orders of magnitude.

``variant="hf"`` (default) is the Hugging Face/TRL recipe used for the <=30B models:
  * temperature loss: ``T`` clamped at 1e-2, easy positions (base argmax == gold) dropped when
    ``rand_vals < drop_prob``, weight = stop_grad(softmax(logits)[gold]) (base model, T = 1);
  * soft top-p loss: ``T`` clamped at 1e-8, no drop, same weight.
``variant="megatron"`` is the NeMo/Megatron recipe (``autodeco_megatron/src/loss_utils.py``):
  * the drop mask applies to both losses;
  * temperature loss: no clamp, weight = stop_grad(softmax(logits / T)[gold]);
  * soft top-p loss: no clamp, weight = stop_grad(softmax(logits)[gold]).

Everything is computed in float32 at least (float64 when the inputs are float64 under
``jax_enable_x64``). Positions are processed in chunks (``chunk_size`` rows of ``[V]`` at a time,
upcast per chunk, each chunk rematerialised in the backward pass), so the temporaries of the
softmax, sort and cumsum take ``O(chunk_size * V)`` memory rather than ``O(B * S * V)``; the logits
themselves are never copied.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100
VARIANTS = ("hf", "megatron")
# Elements of one [chunk, V] float32 temporary (16 MiB); sets the default chunk size.
_CHUNK_ELEMENTS = 1 << 22

Variant = Literal["hf", "megatron"]


# --------------------------------------------------------------------------------------------
# validation helpers


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _compute_dtype(dtype) -> jnp.dtype:
    # float32 at least (bf16 logits are upcast); float64 stays float64 under x64.
    return jnp.promote_types(dtype, jnp.float32)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _check_logits(logits) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, S, V], got shape {tuple(logits.shape)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(
            f"logits needs at least 2 positions (position t predicts labels[t+1]), got shape "
            f"{tuple(logits.shape)}"
        )


def _check_head_output(name: str, x, logits) -> None:
    B, S, _ = logits.shape
    if tuple(x.shape) != (B, S, 1):
        raise ValueError(f"{name} must be [B, S, 1] = {(B, S, 1)}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_labels(labels, logits) -> None:
    B, S, V = logits.shape
    if tuple(labels.shape) != (B, S):
        raise ValueError(f"labels must be [B, S] = {(B, S)}, got shape {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if _is_concrete(labels):
        lab = np.asarray(labels)
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= V))
        if bad.any():
            raise ValueError(
                f"labels must lie in [0, {V}) or be {IGNORE_INDEX} (ignored); found "
                f"{np.unique(lab[bad])[:8].tolist()}"
            )


def _check_rand_vals(rand_vals, logits) -> None:
    B, S, _ = logits.shape
    if tuple(rand_vals.shape) != (B, S - 1):
        raise ValueError(
            f"rand_vals must be [B, S-1] = {(B, S - 1)} (one uniform draw per shifted position), "
            f"got shape {tuple(rand_vals.shape)}"
        )


def _check_drop_prob(drop_prob: float) -> None:
    if not 0.0 <= float(drop_prob) <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


# --------------------------------------------------------------------------------------------
# statistics for the top-p head


def _prob_stats_row(logits_V, temperature):
    # Matches TopPHead.compute_prob_stats on logits / (T + 1e-8).
    q_V = jax.nn.softmax(logits_V / (temperature + 1e-8))
    max_prob = jnp.max(q_V)
    entropy = -jnp.sum(q_V * jnp.log(q_V + 1e-8))
    var = jnp.var(q_V, ddof=1)  # torch.var is unbiased (divide by V - 1)
    top5 = jnp.sum(jax.lax.top_k(q_V, min(5, q_V.shape[-1]))[0])
    return jnp.stack([max_prob, entropy, var, top5])


def prob_stats(logits_BSV, temperature_BS1, *, chunk_size: int | None = None):
    """The top-p head's four statistics of ``q = softmax(logits / (T + 1e-8))``.

    Returns ``[B, S, 4]``: ``max q``, entropy ``-sum q log(q + 1e-8)``, unbiased variance over the
    vocabulary (divide by ``V - 1``, as ``torch.var``) and the sum of the 5 largest ``q``. Both
    inputs are treated as constants (the official code computes them under ``no_grad`` with a
    detached ``T``).
    """
    if logits_BSV.ndim != 3:
        raise ValueError(f"logits must be [B, S, V], got shape {tuple(logits_BSV.shape)}")
    B, S, V = logits_BSV.shape
    if V < 2:
        raise ValueError(f"vocabulary size must be >= 2 for the variance, got V={V}")
    if tuple(temperature_BS1.shape) != (B, S, 1):
        raise ValueError(
            f"temperature must be [B, S, 1] = {(B, S, 1)}, got shape {tuple(temperature_BS1.shape)}"
        )
    _check_chunk_size(chunk_size)
    return _prob_stats_impl(logits_BSV, temperature_BS1, chunk_size)


# Validation runs outside; the array work is one jitted computation, so eager callers compile
# once per shape instead of dispatching op by op (inside an outer jit it simply inlines).
@functools.partial(jax.jit, static_argnums=(2,))
def _prob_stats_impl(logits_BSV, temperature_BS1, chunk_size):
    B, S, V = logits_BSV.shape
    dtype = _compute_dtype(jnp.result_type(logits_BSV.dtype, temperature_BS1.dtype))
    logits_NV = jax.lax.stop_gradient(logits_BSV).reshape(B * S, V)
    t_N = jax.lax.stop_gradient(temperature_BS1).reshape(B * S).astype(dtype)
    stats_N4 = _map_rows(lambda r: _prob_stats_row(r[0].astype(dtype), r[1]), (logits_NV, t_N), V, chunk_size)
    return stats_N4.reshape(B, S, 4)


# --------------------------------------------------------------------------------------------
# per-row losses


def _gold_logprob(logits_V, label):
    return logits_V[label] - jax.nn.logsumexp(logits_V)


def _soft_top_p_nll_row(logits_V, temperature, top_p, label, alpha):
    """-log of the gold token's probability under the soft-top-p-masked distribution.

    p = softmax(logits / T); sort descending; inclusive cumsum c; mask = exp(-alpha relu(c - P))
    (the crossing token is itself partly suppressed, unlike hard top-p);
    q = p * mask / (sum(p * mask) + 1e-9); nll = -log(q_gold + 1e-9).

    Two choices that give the same value and gradient as the official scatter-based code:
    * Only q_gold is needed, so the mask stays in sorted order and is read at the gold token's
      rank (from the actual permutation, so tied tokens still get distinct cumsum slots).
    * The cumsum runs over unnormalised exponentials divided once by their total, instead of
      over already-normalised probabilities. Through alpha * (c - P) the loss's gradient is
      ~60x more sensitive to rounding in c than to anything else here; one rounding instead of
      V + log V keeps float32 gradients within a few 1e-6 of the float64 official values.
    """
    z_V = logits_V / temperature
    # Softmax is shift invariant, so the shift needs no gradient.
    e_V = jnp.exp(z_V - jax.lax.stop_gradient(jnp.max(z_V)))
    order_V = jnp.argsort(e_V, descending=True)
    e_sorted_V = e_V[order_V]
    total_e = jnp.sum(e_sorted_V)
    cum_V = jnp.cumsum(e_sorted_V) / total_e
    mask_sorted_V = jnp.exp(-alpha * jax.nn.relu(cum_V - top_p))
    masked_total = jnp.sum(e_sorted_V * mask_sorted_V) / total_e
    rank = jnp.argmax(order_V == label)
    q_gold = (e_V[label] / total_e) * mask_sorted_V[rank] / (masked_total + 1e-9)
    return -jnp.log(q_gold + 1e-9)


def _row_terms(row, *, alpha, variant, with_top_p=True):
    """Per-position pieces of both losses for one row; returns a [5] vector.

    [top-p nll, top-p weight, temperature CE, temperature weight, base argmax == gold].
    ``with_top_p=False`` skips the sort (the temperature loss alone does not need it).
    """
    logits_V, temperature, top_p, label = row
    logits_V = logits_V.astype(temperature.dtype)  # upcast (e.g. bf16 -> f32) one chunk at a time
    base_gold_prob = jax.lax.stop_gradient(jnp.exp(_gold_logprob(logits_V, label)))
    is_easy = (jnp.argmax(logits_V) == label).astype(logits_V.dtype)
    if variant == "hf":
        t_top_p = jnp.maximum(temperature, 1e-8)
        t_temp = jnp.maximum(temperature, 1e-2)
    else:  # megatron: T is used as predicted
        t_top_p = temperature
        t_temp = temperature
    if with_top_p:
        nll = _soft_top_p_nll_row(logits_V, t_top_p, top_p, label, alpha)
    else:
        nll = jnp.zeros((), logits_V.dtype)
    ce = -_gold_logprob(logits_V / t_temp, label)
    if variant == "hf":
        temp_w = base_gold_prob
    else:
        temp_w = jax.lax.stop_gradient(jnp.exp(-ce))  # T-scaled gold probability
    return jnp.stack([nll, base_gold_prob, ce, temp_w, is_easy])


def _default_chunk(V: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(V, 1))


def _map_rows(fn, rows, V, chunk_size):
    """Apply a per-row function over N rows, ``chunk_size`` rows at a time.

    A loop over chunk *indices*: each step slices its rows out of the full arrays and is
    rematerialised in the backward pass, so only the index is saved per step and neither the
    [chunk, V] temporaries nor slices of the logits pile up. When N is not a multiple of the
    chunk, the last chunk is shifted back to end at row N (overlapping its neighbour) instead of
    padding or slicing, either of which would copy the whole [N, V] logits.
    """
    n = rows[0].shape[0]
    chunk = _default_chunk(V) if chunk_size is None else chunk_size
    if n <= chunk:
        return jax.vmap(fn)(rows)
    n_chunks = -(-n // chunk)

    @jax.checkpoint
    def one_chunk(i):
        start = jnp.minimum(i * chunk, n - chunk)
        part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, 0), rows)
        return jax.vmap(fn)(part)

    out_CK = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # [n_chunks, chunk, ...]
    # Row r lives in chunk min(r // chunk, last) at offset r - that chunk's start.
    r = jnp.arange(n)
    c = jnp.minimum(r // chunk, n_chunks - 1)
    offset = r - jnp.minimum(c * chunk, n - chunk)
    return out_CK[c, offset]


# --------------------------------------------------------------------------------------------
# public losses


def _prepare(logits_BSV, temperature_BS1, top_p_BS1, labels_BS, rand_vals_BS, dtype):
    """Flatten to N = B * S rows with the shift moved onto the labels.

    Row (b, t) is scored against labels[b, t + 1]; the last position of each sequence gets the
    ignore label. Shifting the labels instead of slicing logits[:, :-1] keeps the [B, S, V]
    logits a free reshape instead of a copy; the float32 upcast happens per chunk.
    """
    B, S, V = logits_BSV.shape
    n = B * S
    # The base model is frozen: no gradient flows into the logits.
    logits_NV = jax.lax.stop_gradient(logits_BSV).reshape(n, V)
    t_N = temperature_BS1.astype(dtype).reshape(n)
    p_N = top_p_BS1.astype(dtype).reshape(n)
    pad_B1 = jnp.full((B, 1), IGNORE_INDEX, labels_BS.dtype)
    labels_N = jnp.concatenate([labels_BS[:, 1:], pad_B1], axis=1).reshape(n)
    valid_N = labels_N != IGNORE_INDEX
    safe_labels_N = jnp.where(valid_N, labels_N, 0).astype(jnp.int32)
    rand_N = None
    if rand_vals_BS is not None:
        ones_B1 = jnp.ones((B, 1), dtype)  # never read: the padded position is not valid
        rand_N = jnp.concatenate([rand_vals_BS.astype(dtype), ones_B1], axis=1).reshape(n)
    return logits_NV, t_N, p_N, safe_labels_N, valid_N, rand_N


def _masked_mean(values_N, mask_N):
    # Mean over covered tokens; 0 (not NaN) when no token is covered.
    mask = mask_N.astype(values_N.dtype)
    count = jnp.sum(mask)
    return jnp.where(count > 0, jnp.sum(values_N * mask) / jnp.maximum(count, 1), 0.0)


def autodeco_loss(
    logits,
    temperature,
    top_p,
    labels,
    rand_vals,
    *,
    variant: Variant = "hf",
    alpha: float = 30.0,
    drop_prob: float = 0.6,
    chunk_size: int | None = None,
    _with_top_p: bool = True,
) -> dict:
    """Both AutoDeco losses in one pass over the vocabulary.

    Args:
      logits: ``[B, S, V]`` unscaled base-model logits (treated as constants).
      temperature: ``[B, S, 1]`` predicted temperature ``T``.
      top_p: ``[B, S, 1]`` predicted top-p ``P``.
      labels: ``[B, S]`` int token ids, ``-100`` = ignore; position t's logits predict
        ``labels[t + 1]``.
      rand_vals: ``[B, S - 1]`` uniform draws in [0, 1) for the shifted positions; an easy
        position (base argmax == gold) is dropped when its draw is ``< drop_prob``.
      variant: ``"hf"`` (drop mask on the temperature loss only) or ``"megatron"`` (on both).
      alpha: steepness of the soft top-p mask (official: 30).
      drop_prob: probability of dropping an easy position (official: 0.6).
      chunk_size: rows ``[V]`` processed at once; ``None`` picks ~16M elements per chunk.

    Returns:
      dict with scalar ``loss`` (= ``temp_loss + top_p_loss``), ``temp_loss``, ``top_p_loss``
      and the token counts ``n_valid``, ``n_temp`` (kept by the drop), ``n_top_p``.
    """
    _check_variant(variant)
    _check_logits(logits)
    _check_head_output("temperature", temperature, logits)
    _check_head_output("top_p", top_p, logits)
    _check_labels(labels, logits)
    _check_rand_vals(rand_vals, logits)
    _check_drop_prob(drop_prob)
    _check_chunk_size(chunk_size)
    if not float(alpha) > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return _autodeco_loss_impl(
        logits,
        temperature,
        top_p,
        labels,
        rand_vals,
        variant,
        float(alpha),
        float(drop_prob),
        chunk_size,
        _with_top_p,
    )


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _autodeco_loss_impl(
    logits, temperature, top_p, labels, rand_vals, variant, alpha, drop_prob, chunk_size, _with_top_p
):
    dtype = _compute_dtype(jnp.result_type(logits.dtype, temperature.dtype, top_p.dtype))
    V = logits.shape[-1]
    logits_NV, t_N, p_N, labels_N, valid_N, rand_N = _prepare(
        logits, temperature, top_p, labels, rand_vals, dtype
    )
    row_fn = lambda row: _row_terms(  # noqa: E731
        row, alpha=alpha, variant=variant, with_top_p=_with_top_p
    )
    terms_N5 = _map_rows(row_fn, (logits_NV, t_N, p_N, labels_N), V, chunk_size)
    nll, tp_w, ce, temp_w, easy = (terms_N5[:, i] for i in range(5))
    dropped_N = jax.lax.stop_gradient((rand_N < drop_prob) & (easy > 0) & valid_N)
    kept_N = valid_N & ~dropped_N
    top_p_mask_N = valid_N if variant == "hf" else kept_N
    top_p_loss = _masked_mean(nll * tp_w, top_p_mask_N)
    temp_loss = _masked_mean(ce * temp_w, kept_N)
    return {
        "loss": temp_loss + top_p_loss,
        "temp_loss": temp_loss,
        "top_p_loss": top_p_loss,
        "n_valid": jnp.sum(valid_N),
        "n_temp": jnp.sum(kept_N),
        "n_top_p": jnp.sum(top_p_mask_N),
    }


def soft_top_p_loss(
    logits,
    temperature,
    top_p,
    labels,
    *,
    rand_vals=None,
    variant: Variant = "hf",
    alpha: float = 30.0,
    drop_prob: float = 0.6,
    chunk_size: int | None = None,
):
    """Soft top-p loss (scalar), the official ``_compute_top_p_loss``.

    ``p = softmax(logits / max(T, 1e-8))``, sorted descending, inclusive cumsum ``c``, mask
    ``exp(-alpha * relu(c - P))`` back in vocabulary order, ``q = p * mask / (sum(p * mask) + 1e-9)``,
    per-token loss ``-log(q_gold + 1e-9) * stop_grad(softmax(logits)[gold])``, mean over valid
    tokens. Gradients flow into both ``T`` and ``P``. ``rand_vals`` (``[B, S-1]``) is needed only
    for ``variant="megatron"``, which drops easy positions here as well.
    See :func:`autodeco_loss` for the arguments.
    """
    _check_variant(variant)
    if rand_vals is None:
        if variant == "megatron":
            raise ValueError("rand_vals is required for variant='megatron' (drop mask on both losses)")
        _check_logits(logits)
        rand_vals = jnp.ones(logits.shape[:1] + (logits.shape[1] - 1,), logits.dtype)
    return autodeco_loss(
        logits,
        temperature,
        top_p,
        labels,
        rand_vals,
        variant=variant,
        alpha=alpha,
        drop_prob=drop_prob,
        chunk_size=chunk_size,
    )["top_p_loss"]


def temperature_loss(
    logits,
    temperature,
    labels,
    rand_vals,
    *,
    variant: Variant = "hf",
    drop_prob: float = 0.6,
    chunk_size: int | None = None,
):
    """Temperature loss (scalar), the official ``_compute_temp_loss``.

    Per token ``CE(softmax(logits / max(T, 0.01)), gold) * stop_grad(softmax(logits)[gold])``,
    mean over valid positions that survive the easy-token drop (base argmax == gold and
    ``rand_vals < drop_prob``). ``variant="megatron"`` drops the clamp and weights by the
    T-scaled gold probability. See :func:`autodeco_loss` for the arguments.
    """
    _check_logits(logits)
    _check_head_output("temperature", temperature, logits)
    # No top-p head output here: a dummy P passes validation and the sort is skipped.
    return autodeco_loss(
        logits,
        temperature,
        jnp.ones_like(temperature),
        labels,
        rand_vals,
        variant=variant,
        drop_prob=drop_prob,
        chunk_size=chunk_size,
        _with_top_p=False,
    )["temp_loss"]
