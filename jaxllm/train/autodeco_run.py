"""Train AutoDeco heads on a trained base model's workdir, save them, and sample with them.

``jaxllm autodeco-train --workdir <trained run>`` (:func:`train_heads`):

1. restores the base model from the workdir's latest (or ``base_step``) checkpoint and freezes it;
2. reads the run's own dataset (same ``dataset``, tokenizer, ``seq_len``), packed as in training;
3. per step: one forward of the frozen base (final-normed hidden states and logits, no gradient),
   then :func:`jaxllm.train.autodeco.make_train_step` on the two heads (AdamW; the loss is the
   official ``temp_loss + top_p_loss``); labels are the run's targets where ``loss_mask`` is set,
   shifted the way the official loss expects (logits at t predict ``labels[t+1]``);
4. measures the AutoDeco loss of the initial and of the trained heads on ``eval_batches`` batches
   that follow the training ones, with the same fixed easy-token draws, and the mean predicted
   T and P over those positions (what ``fixed_mean`` sampling uses);
5. writes ``<workdir>/autodeco/heads.safetensors`` (the official torch layout and keys,
   ``temp_head.mlp.0.weight`` ..., via :func:`jaxllm.nn.autodeco.heads_to_official`),
   ``<workdir>/autodeco/heads.json`` (means, losses, settings) and
   ``<workdir>/autodeco/metrics.jsonl`` (one line per step).

:func:`load_heads` reads them back; :func:`sampling_config` builds the ``autodeco`` /
``fixed_mean`` :class:`~jaxllm.ops.sampling.SamplingConfig`; :func:`generate_ids` samples
(batched) with or without the heads.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxllm import run_dir
from jaxllm.data.pipeline import PackedBatches
from jaxllm.data.sources import load_source
from jaxllm.nn.autodeco import AutoDecoHeads, heads_to_official
from jaxllm.run_dir import load_trained
from jaxllm.train.autodeco import (
    AutoDecoTrainConfig,
    init_state,
    make_loss_fn,
    make_optimizer,
    make_train_step,
)
from jaxllm.train.config import ConfigError, load_config
from jaxllm.train.loop import checkpoint_dir
from jaxllm.train.step import check_finite


def shifted_labels(targets_BS, loss_mask_BS):
    """HF-style labels for the AutoDeco losses from the packed ``targets`` / ``loss_mask``.

    The loss reads logits at t against ``labels[t+1]``; the pipeline's ``targets[t]`` is the token
    after input t. So ``labels[:, t+1] = targets[:, t]`` where ``loss_mask[:, t]``, else -100;
    ``labels[:, 0]`` is -100 (and the last position's target has no label slot).
    """
    body = jnp.where(loss_mask_BS[:, :-1] > 0, targets_BS[:, :-1], -100)
    pad = jnp.full((targets_BS.shape[0], 1), -100, body.dtype)
    return jnp.concatenate([pad, body], axis=1).astype(jnp.int32)


def _flat(batch):
    """[grad_accum, rows, S] -> [grad_accum * rows, S] numpy int32."""
    return {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in batch.items()}


def _base_outputs(model):
    def fwd(base_params, inputs, segment_ids):
        out = model.apply(base_params, inputs, segment_ids=segment_ids)
        return jax.lax.stop_gradient(out.logits), jax.lax.stop_gradient(out.hidden)

    return fwd


def train_heads(
    workdir: str,
    *,
    steps: int = 200,
    learning_rate: float = 1e-3,
    batch_size: int | None = None,
    seed: int = 0,
    base_step: int | None = None,
    eval_batches: int = 4,
    variant: str = "hf",
    drop_prob: float = 0.6,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Trains fresh AutoDeco heads on the frozen base of ``workdir``; returns the ``heads.json`` dict."""
    log = log or (lambda msg: print(msg, flush=True))
    for name, v, ok in (
        ("steps", steps, isinstance(steps, int) and steps >= 1),
        ("eval_batches", eval_batches, isinstance(eval_batches, int) and eval_batches >= 1),
        ("batch_size", batch_size, batch_size is None or (isinstance(batch_size, int) and batch_size >= 1)),
    ):
        if not ok:
            raise ConfigError(f"autodeco-train: {name}={v!r} is not allowed; allowed: a positive integer")
    try:
        tcfg = AutoDecoTrainConfig(learning_rate=learning_rate, variant=variant, drop_prob=drop_prob)
    except ValueError as e:
        raise ConfigError(f"autodeco-train: {e}") from None

    model, base_params, tokenizer = load_trained(workdir, step=base_step)
    config = load_config(run_dir.config_file(workdir))
    H, V = model.config.hidden_size, model.config.vocab_size
    rows = batch_size or config.batch_size
    source = load_source(config.dataset, "train", data_dir=config.data_dir or None, text_key=config.text_key)
    data = PackedBatches(
        source,
        tokenizer,
        seq_len=config.seq_len,
        batch_size=rows,
        grad_accum=1,
        seed=config.seed,
        vocab_size=V,
    )

    heads = AutoDecoHeads()
    init_vars = nn.meta.unbox(
        heads.init(
            jax.random.PRNGKey(seed), jnp.zeros((1, 1, H), jnp.float32), jnp.zeros((1, 1, V), jnp.float32)
        )
    )
    tx = make_optimizer(tcfg)
    state = init_state(init_vars, tx, jax.random.PRNGKey(seed + 1))
    # The frozen base forward is compiled once and shared by training and evaluation (same shapes);
    # the head step and the eval loss are separate small programs.
    fwd = jax.jit(_base_outputs(model))
    inner = make_train_step(heads, tx, tcfg)

    @jax.jit
    def head_step(state, logits, hidden, targets, loss_mask):
        labels = shifted_labels(targets, loss_mask)
        return inner(state, {"hidden": hidden, "logits": logits, "labels": labels})

    def step_fn(state, base_params, batch):
        logits, hidden = fwd(base_params, batch["inputs"], batch["segment_ids"])
        return head_step(state, logits, hidden, batch["targets"], batch["loss_mask"])

    loss_fn = make_loss_fn(heads, tcfg)

    @jax.jit
    def eval_heads(head_params, logits, hidden, targets, loss_mask, rand_vals):
        labels = shifted_labels(targets, loss_mask)
        loss, (out, t, p) = loss_fn(
            head_params, {"hidden": hidden, "logits": logits, "labels": labels}, rand_vals
        )
        valid = (labels[:, 1:] != -100).astype(jnp.float32)
        return loss, jnp.sum(t[:, :-1, 0] * valid), jnp.sum(p[:, :-1, 0] * valid), valid.sum()

    def eval_fn(head_params, base_params, batch, rand_vals):
        logits, hidden = fwd(base_params, batch["inputs"], batch["segment_ids"])
        return eval_heads(head_params, logits, hidden, batch["targets"], batch["loss_mask"], rand_vals)

    out_dir = run_dir.autodeco_dir(workdir)
    os.makedirs(out_dir, exist_ok=True)
    log(
        f"autodeco-train: base {config.model} from {workdir} (hidden {H}, vocab {V}); heads "
        f"{sum(x.size for x in jax.tree.leaves(init_vars)):,} params; {steps} steps of {rows} x {config.seq_len} "
        f"tokens, lr {learning_rate}"
    )
    mpath = run_dir.metrics_file(out_dir)
    losses = []
    t_start = time.perf_counter()
    with open(mpath, "w", encoding="utf-8") as mf:
        for step in range(1, steps + 1):
            batch = {k: jnp.asarray(v) for k, v in _flat(next(data)).items()}
            t0 = time.perf_counter()
            state, m = step_fn(state, base_params, batch)
            m = jax.device_get(m)
            check_finite(m, step)  # the one NaN policy: nothing is saved before the end
            m = {k: float(v) for k, v in m.items() if k != "finite"}
            dt = time.perf_counter() - t0
            losses.append(m["loss"])
            mf.write(json.dumps({"step": step, **m, "step_time_s": dt}) + "\n")
            if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
                log(
                    f"  step {step}/{steps}: loss {m['loss']:.4f} (temp {m['temp_loss']:.4f}, top-p {m['top_p_loss']:.4f}) "
                    f"mean T {m['mean_temperature']:.3f} mean P {m['mean_top_p']:.3f}"
                )

    # Held-out-ish evaluation: the batches that follow the training ones, fixed draws for both heads.
    ev = {"init": [0.0, 0.0, 0.0, 0.0], "trained": [0.0, 0.0, 0.0, 0.0]}
    draw = jax.random.PRNGKey(seed + 2)
    for _ in range(eval_batches):
        batch = {k: jnp.asarray(v) for k, v in _flat(next(data)).items()}
        draw, sub = jax.random.split(draw)
        rv = jax.random.uniform(sub, (batch["inputs"].shape[0], batch["inputs"].shape[1] - 1), jnp.float32)
        for name, hp in (("init", init_vars), ("trained", state["params"])):
            vals = jax.device_get(eval_fn(hp, base_params, batch, rv))
            ev[name] = [a + float(b) for a, b in zip(ev[name], (vals[0], vals[1], vals[2], vals[3]))]
    n = max(ev["trained"][3], 1.0)
    info = {
        "format": "official AutoDeco heads (Zacks917/AutoDeco keys, torch (out, in) weights), safetensors",
        "hidden_size": H,
        "vocab_size": V,
        "mlp_dim": heads.mlp_dim,
        "base_step": base_step if base_step is not None else _latest_step(workdir, config),
        "steps": steps,
        "batch_size": rows,
        "seq_len": config.seq_len,
        "learning_rate": learning_rate,
        "variant": variant,
        "drop_prob": drop_prob,
        "seed": seed,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "eval_batches": eval_batches,
        "eval_loss_init": ev["init"][0] / eval_batches,
        "eval_loss_trained": ev["trained"][0] / eval_batches,
        "mean_temperature": ev["trained"][1] / n,
        "mean_top_p": ev["trained"][2] / n,
        "eval_positions": int(ev["trained"][3]),
        "train_time_s": time.perf_counter() - t_start,
    }
    run_dir.save_heads(out_dir, heads_to_official(state["params"]), info)
    log(
        f"autodeco-train: loss {losses[0]:.4f} -> {losses[-1]:.4f}; eval loss init {info['eval_loss_init']:.4f} -> "
        f"trained {info['eval_loss_trained']:.4f} over {eval_batches} batch(es); mean T {info['mean_temperature']:.3f}, "
        f"mean P {info['mean_top_p']:.3f}; saved {run_dir.heads_file(out_dir)}"
    )
    return info


def _latest_step(workdir: str, config) -> int | None:
    d = epath.Path(checkpoint_dir(config, workdir))
    steps = [int(x.name) for x in d.iterdir() if x.name.isdigit()] if d.is_dir() else []
    return max(steps) if steps else None
