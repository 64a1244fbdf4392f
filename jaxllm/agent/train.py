"""SFT and agentic RL for the ReAct agent (Tongyi DeepResearch recipe, report §3.4), on top of
``jaxllm.train`` (model registry, ``RunConfig``, optimizer, train step, orbax checkpoints).

Pure pieces (numpy / jnp, tested against hand-computed numbers):

* SFT data: ``strip_think`` (optional: drop ``<think>`` blocks of a demonstration),
  ``sft_example`` (chat template -> token ids + a mask of the assistant tokens, from
  ``protocol.render_segments``), ``pack_examples`` (first-fit packing into rows of ``seq_len + 1``
  slots with segment ids), ``sft_batch`` (rows -> ``{inputs, targets, segment_ids, loss_mask}``, the
  batch layout of ``jaxllm.train.step``: the loss counts a target only when it is an assistant
  token of the same segment; system, user and tool-response tokens never count).
* RL: ``exact_match_rewards`` (0/1), ``loo_advantages`` (A_i = r_i - mean_{j != i} r_j over the
  group, no std division), ``keep_mask`` (drop trajectories that hit a turn or token limit without
  an answer: statuses ``MAX_TURNS`` / ``MAX_TOKENS``), ``token_logprobs`` and
  ``clipped_policy_loss`` (PPO-style ratio against the rollout's logprobs, clipped to
  ``[1 - eps_low, 1 + eps_high]``, token-mean over all kept model tokens of the batch), and
  ``make_rl_step`` (one optimizer update; no KL, no entropy term).

Drivers: ``train_sft`` (SFT from scratch on synthesized trajectories), ``train_rl`` (on-policy RL
from an SFT workdir), ``run_questions`` (roll out a trained agent on questions), and
``load_hf_agent`` (a Hugging Face checkpoint folder as an agent: model, tokenizer, chat format,
system prompt; ``chat_setup`` picks the last two). Workdirs have the
layout of ``jaxllm train`` (``run_config.json``, ``checkpoints/``, ``metrics.jsonl``) plus
``agent.json`` (system prompt, wiki config, rollout limits), so ``jaxllm.run_dir.
load_trained`` loads them.

**On-policy.** Each RL step samples a fresh batch (``questions_per_step`` questions x ``group``
rollouts, temperature 1, raw logits, current params), then makes exactly one optimizer update on
it, so the ratio is 1 up to the numerical difference between cached decoding and the full forward
pass (logged as ``ratio_dev``); the clip is implemented and tested but inactive in practice, as in
the report.

**Dropped rows.** A dropped trajectory still counts in its group's leave-one-out baseline (it is a
sample of the policy with reward 0), but contributes no tokens to the loss or its denominator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxllm
from jaxllm import run_dir
from jaxllm import sharding as shd
from jaxllm.agent import evaluate, protocol, rollout, synth
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig
from jaxllm.data.chat_template import tongyi_system_prompt
from jaxllm.data.hf_tokenizer import load_hf_tokenizer
from jaxllm.ops.sampling import SamplingConfig
from jaxllm.run_dir import load_trained
from jaxllm.train import checkpoint as ckpt_lib
from jaxllm.train import loop
from jaxllm.train import metrics as metrics_lib
from jaxllm.train.config import ConfigError, save_config
from jaxllm.train.step import (
    LossOutput,
    apply_with_load,
    cast_for_compute,
    check_finite,
    make_step,
)

__all__ = [
    "AgentSettings",
    "strip_think",
    "sft_example",
    "pack_examples",
    "sft_batch",
    "exact_match_rewards",
    "loo_advantages",
    "keep_mask",
    "token_logprobs",
    "clipped_policy_loss",
    "rl_batch",
    "make_rl_step",
    "train_sft",
    "train_rl",
    "run_questions",
    "chat_setup",
    "load_hf_agent",
    "load_settings",
    "AGENT_FILE",
    "DROP_STATUSES",
]

AGENT_FILE = run_dir.AGENT_FILE
#: Statuses whose trajectories are left out of the RL loss: a turn or token limit was hit and no
#: answer was given. A wrong answer (ANSWERED, reward 0) and TOOL_ERROR stay in as negatives.
DROP_STATUSES = (rollout.MAX_TURNS, rollout.MAX_TOKENS)


# ------------------------------------------------------------------------------------------
# Settings stored with a workdir
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """What a trained agent needs besides its weights: the prompt it was trained on, the world
    it acts in and the rollout limits."""

    system_prompt: str
    wiki: dict  # WikiConfig fields
    max_turns: int = 4
    turn_tokens: int = 128
    token_budget: int = 1536
    chunk: int = 32

    def wiki_config(self) -> WikiConfig:
        try:
            return WikiConfig(**self.wiki)
        except TypeError as e:
            raise ValueError(f"wiki config {self.wiki}: {e}") from None

    def rollout_config(self) -> rollout.RolloutConfig:
        return rollout.RolloutConfig(
            max_turns=self.max_turns,
            turn_tokens=self.turn_tokens,
            token_budget=self.token_budget,
            chunk=self.chunk,
        )

    def save(self, workdir: str) -> None:
        with open(run_dir.agent_file(workdir), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)


def load_settings(workdir: str) -> AgentSettings:
    path = run_dir.agent_file(workdir)
    if not os.path.exists(path):
        raise ValueError(
            f"{workdir!r} is not an agent workdir: {AGENT_FILE} not found (train one with `jaxllm agent sft`)"
        )
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    try:
        return AgentSettings(**d)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------
# SFT data
# ------------------------------------------------------------------------------------------


def strip_think(messages: Sequence[dict]) -> list[dict]:
    """The trajectory with every assistant turn re-rendered as its bare action (no ``<think>``
    block): shorter sequences for a small model. Observations are unchanged."""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            out.append(dict(m))
            continue
        action = protocol.parse_assistant(m["content"])
        if isinstance(action, protocol.ToolCall):
            text = protocol.render_tool_call(action.name, action.arguments, action.code)
        elif isinstance(action, protocol.Answer):
            text = f"{protocol.ANSWER_OPEN}\n{action.text}\n{protocol.ANSWER_CLOSE}"
        else:
            raise ValueError(f"message {i}: assistant turn does not parse ({action.message})")
        out.append({"role": "assistant", "content": text})
    return out


def sft_example(messages: Sequence[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, model [n] bool): the chat template's tokens and which of them the assistant
    wrote (its turn contents and their ``<|im_end|>``). No BOS, as the rollout's prompts."""
    ids, model = [], []
    for piece, is_model in protocol.render_segments(messages):
        t = np.asarray(tokenizer.encode(piece), np.int32)
        ids.append(t)
        model.append(np.full(t.shape, is_model, bool))
    return np.concatenate(ids), np.concatenate(model)


def pack_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, *, pad_id: int = 0, seed: int = 0
) -> dict[str, np.ndarray]:
    """First-fit packing of (ids, model) examples into rows of ``seq_len + 1`` slots.

    Returns ``tokens``/``segments``/``model`` [R, seq_len + 1] (segments 1, 2, ... per example,
    0 = padding). Examples are placed in a seeded random order. An example longer than
    ``seq_len + 1`` is an error (never silently cut).
    """
    S = seq_len + 1
    for i, (ids, _) in enumerate(examples):
        if len(ids) > S:
            raise ValueError(
                f"example {i} has {len(ids)} tokens, more than seq_len + 1 = {S}; "
                "raise seq_len or shorten the trajectories"
            )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    for i in order:
        n = len(examples[i][0])
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(S - n)
    R = len(rows)
    tokens = np.full((R, S), pad_id, np.int32)
    segments = np.zeros((R, S), np.int32)
    model = np.zeros((R, S), bool)
    for r, idx in enumerate(rows):
        p = 0
        for s, i in enumerate(idx, 1):
            ids, m = examples[i]
            tokens[r, p : p + len(ids)] = ids
            segments[r, p : p + len(ids)] = s
            model[r, p : p + len(ids)] = m
            p += len(ids)
    return {"tokens": tokens, "segments": segments, "model": model}


def sft_batch(packed: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """``{inputs, targets, segment_ids, loss_mask}`` [len(rows), seq_len] for ``jaxllm.train.step``:
    a target counts when it is an assistant token in the same segment as its input."""
    t, s, m = (packed[k][np.asarray(rows)] for k in ("tokens", "segments", "model"))
    return {
        "inputs": t[:, :-1],
        "targets": t[:, 1:],
        "segment_ids": s[:, :-1],
        "loss_mask": ((s[:, 1:] == s[:, :-1]) & (s[:, :-1] > 0) & m[:, 1:]).astype(np.int32),
    }


# ------------------------------------------------------------------------------------------
# RL pieces
# ------------------------------------------------------------------------------------------


def exact_match_rewards(predictions: Sequence[str | None], golds: Sequence) -> np.ndarray:
    """0/1 per row: SQuAD-normalised exact match of the answer (None, no answer, scores 0)."""
    return np.array(
        [0.0 if p is None else evaluate.exact_match(p, g) for p, g in zip(predictions, golds)], np.float32
    )


def loo_advantages(rewards_NG) -> jax.Array:
    """Leave-one-out advantage per group (axis -1): A_i = r_i - mean_{j != i} r_j. No std
    division. Equal to G/(G-1) * (r_i - mean_j r_j)."""
    r = jnp.asarray(rewards_NG, jnp.float32)
    G = r.shape[-1]
    if G < 2:
        raise ValueError(f"loo_advantages: a group needs at least 2 rollouts, got {G}")
    return r - (jnp.sum(r, axis=-1, keepdims=True) - r) / (G - 1)


def keep_mask(status, drop_statuses: Sequence[int] = DROP_STATUSES) -> np.ndarray:
    """True for trajectories that enter the loss."""
    return ~np.isin(np.asarray(status), np.asarray(list(drop_statuses), np.int32))


def token_logprobs(logits_BTV, tokens_BT) -> jax.Array:
    """logp[b, t] = log p(tokens[b, t] | tokens[b, :t]) from the logits of position t - 1; the
    first position (no prediction) is 0. Same alignment as ``RolloutResult.logprobs``."""
    lp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(lp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))


def clipped_policy_loss(logp_BT, old_logp_BT, adv_B, mask_BT, eps_low: float = 0.2, eps_high: float = 0.28):
    """PPO-style clipped surrogate with clip-higher, token-mean over the batch's masked tokens:

        loss = -(1 / sum mask) * sum_{b,t} mask * min(rho * A_b, clip(rho, 1 - eps_low, 1 + eps_high) * A_b)

    with rho = exp(logp - old_logp). Returns (loss, stats) where stats holds the token count, the
    fractions of tokens clipped below / above, and the mean |rho - 1|.
    """
    mask = mask_BT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ratio = jnp.exp(logp_BT - old_logp_BT)
    adv = adv_B[:, None].astype(jnp.float32)
    obj = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    loss = -jnp.sum(obj * mask) / n
    clipped_low = (adv < 0) & (ratio < 1.0 - eps_low)
    clipped_high = (adv > 0) & (ratio > 1.0 + eps_high)
    stats = {
        "tokens": jnp.sum(mask),
        "clip_low": jnp.sum(clipped_low * mask) / n,
        "clip_high": jnp.sum(clipped_high * mask) / n,
        "ratio_dev": jnp.sum(jnp.abs(ratio - 1.0) * mask) / n,
    }
    return loss, stats


def rl_batch(
    result: rollout.RolloutResult,
    golds: Sequence,
    group: int,
    *,
    drop_statuses: Sequence[int] = DROP_STATUSES,
    length_multiple: int = 128,
) -> dict:
    """Training arrays from a rollout whose rows are ``N`` questions x ``group`` consecutive
    rollouts: ``tokens``, ``mask`` (sampled tokens of kept rows), ``old_logp``, ``adv`` [B],
    and host-side ``rewards``/``keep``. Rows are cut to the longest row rounded up to
    ``length_multiple`` (fewer shapes to compile)."""
    B = len(golds)
    if B % group:
        raise ValueError(f"rl_batch: {B} rows are not a multiple of group={group}")
    rewards = exact_match_rewards(result.answers, golds)
    keep = keep_mask(result.status, drop_statuses)
    adv = np.asarray(loo_advantages(rewards.reshape(-1, group))).reshape(-1)
    T = min(
        result.tokens.shape[1],
        max(length_multiple, -(-int(result.lengths.max()) // length_multiple) * length_multiple),
    )
    mask = result.model_mask[:, :T] & keep[:, None]
    return {
        "tokens": result.tokens[:, :T].astype(np.int32),
        "mask": mask.astype(np.int32),
        "old_logp": result.logprobs[:, :T].astype(np.float32),
        "adv": adv.astype(np.float32),
        "rewards": rewards,
        "keep": keep,
    }


def make_rl_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    compute_dtype=jnp.float32,
    bias_update_rate: float = 0.0,
):
    """rl_step(state, batch) -> (new_state, metrics): one optimizer update on the clipped
    token-mean objective (no KL, no entropy bonus) plus the model's aux losses. ``batch``: tokens,
    mask, old_logp [B, T] and adv [B]. The shared step builder (``jaxllm.train.step.make_step``,
    one microbatch: its NaN policy and MoE load balancing included)."""

    def loss_fn(params, batch, rng=None):
        del rng
        tokens = batch["tokens"]
        out, load = apply_with_load(
            apply_fn, cast_for_compute(params, compute_dtype), tokens, segment_ids=jnp.ones_like(tokens)
        )
        logp = token_logprobs(out.logits, tokens)
        loss, stats = clipped_policy_loss(
            logp, batch["old_logp"], batch["adv"], batch["mask"], eps_low, eps_high
        )
        # The step divides by the token count: hand it sums (the policy loss is a token mean over
        # max(tokens, 1), so the sums below divide back to exactly the means).
        n = jnp.maximum(stats["tokens"], 1.0)
        means = {k: v * n for k, v in stats.items() if k != "tokens"}
        means["loss"], means["aux_loss"] = loss * n, out.aux_loss() * n
        objective = (loss + out.aux_loss()) * n
        return objective, LossOutput(stats["tokens"], means, {"tokens": stats["tokens"]}, load)

    return make_step(loss_fn, tx, schedule=schedule, microbatched=False, bias_update_rate=bias_update_rate)


def rl_setup(config, model, rows: int, *, mesh=None) -> loop.Setup:
    """Mesh, optimizer and state shardings of an RL run whose updates take ``rows`` rollouts: the
    config's ``mesh_*`` axes (or ``mesh``), the update's rows over data x fsdp x expert, the
    rollouts' rows over data (``rollout.*_rollout(mesh=)``), params by the logical-axis rules."""
    mesh = mesh or loop.make_run_mesh(config)
    shards = shd.batch_shard_count(mesh)
    if rows % shards:
        raise ConfigError(
            f"questions_per_step x group = {rows} rollouts per update must split evenly over the "
            f"{shards} batch shards of mesh {dict(mesh.shape)} (data x fsdp x expert)"
        )
    if shd.context_size(mesh) > 1:
        raise ConfigError("agent rl keeps whole sequences on a device: mesh_context must be 1")
    return loop.setup(dataclasses.replace(config, batch_size=rows, grad_accum=1), model=model, mesh=mesh)


def rows_on_mesh(mesh, batch: dict) -> dict:
    """Host arrays whose first dim is the update's rows, split over the mesh's batch axes."""
    rows = shd.batch_spec()[0]
    return {
        k: jax.device_put(v, NamedSharding(mesh, P(rows, *[None] * (np.ndim(v) - 1))))
        for k, v in batch.items()
    }


# ------------------------------------------------------------------------------------------
# Drivers
# ------------------------------------------------------------------------------------------


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def read_records(path: str, need_trajectory: bool = False) -> list[dict]:
    """Records of a JSONL file with ``question`` and ``answer`` (and ``trajectory``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    recs = list(synth.read_jsonl(path))
    if not recs:
        raise ValueError(f"{path}: no records")
    keys = ("question", "answer") + (("trajectory",) if need_trajectory else ())
    for i, r in enumerate(recs, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{i}: a record must be a JSON object")
        for k in keys:
            if k not in r:
                raise ValueError(f"{path}:{i}: missing '{k}'")
    return recs


def settings_from_records(
    records: Sequence[dict], wiki: dict | None, world: int | None = None, **limits
) -> AgentSettings:
    """Settings for training on ``records``: their system prompt (all must share one) and the
    world the agent acts in: the records' own (``wiki_seed``; their ``wiki`` config when they
    carry one), or ``world`` (a wiki seed), which records from several worlds require; then the
    ``wiki`` overrides. Records from several worlds must agree on every other wiki field."""
    prompts = {
        r["trajectory"][0]["content"]
        for r in records
        if r["trajectory"] and r["trajectory"][0].get("role") == "system"
    }
    if len(prompts) != 1:
        raise ValueError(f"the trajectories must share one system prompt, found {len(prompts)}")
    seeds = {r.get("wiki_seed", r.get("seed")) for r in records}
    if None in seeds:
        raise ValueError("every record needs its world's seed (wiki_seed)")
    if world is None and len(seeds) != 1:
        raise ValueError(
            f"the records come from {len(seeds)} worlds (wiki_seed "
            f"{', '.join(map(str, sorted(seeds)[:5]))}{', ...' if len(seeds) > 5 else ''}); "
            "name the one the agent acts in (--wiki-seed)"
        )
    shapes = {
        json.dumps({k: v for k, v in r["wiki"].items() if k != "seed"}, sort_keys=True)
        for r in records
        if "wiki" in r
    }
    if len(shapes) > 1:
        raise ValueError(f"the records carry {len(shapes)} different wiki configs")
    w = json.loads(shapes.pop()) if shapes else {}
    w.update(wiki or {})
    seed = seeds.pop() if world is None else world
    if "seed" in w and w["seed"] != seed:
        raise ValueError(f"wiki seed {w['seed']} differs from the agent's world {seed}")
    w["seed"] = seed
    s = AgentSettings(system_prompt=prompts.pop(), wiki=w, **limits)
    s.wiki_config()
    s.rollout_config()
    return s


def check_world(records: Sequence[dict], settings: AgentSettings, what: str = "records") -> None:
    """Refuse questions from another world than the agent's (their answers would be wrong there)."""
    other = sorted(
        {
            str(r["wiki_seed"])
            for r in records
            if r.get("wiki_seed") is not None and r["wiki_seed"] != settings.wiki["seed"]
        }
    )
    if other:
        raise ValueError(
            f"the {what} come from world(s) {', '.join(other[:5])}, but the agent acts "
            f"in world {settings.wiki['seed']}"
        )


def _make_run_config(config, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    save_config(config, run_dir.config_file(workdir))


def _save_checkpoint(workdir: str, config, state) -> str:
    ck = ckpt_lib.Checkpointer(run_dir.checkpoints(workdir), save_every=1, keep=1, async_save=False)
    try:
        ck.save(int(state["step"]), state, {}, ckpt_lib.make_meta(config, state["params"]), force=True)
    finally:
        ck.close()
    return ck.directory


def train_sft(
    config,
    workdir: str,
    records: Sequence[dict],
    settings: AgentSettings,
    *,
    strip: bool = False,
    init_workdir: str | None = None,
    log: Callable[[str], None] = _log_default,
) -> dict:
    """SFT on synthesized trajectories with ``config`` (a ``RunConfig``: model, seq_len,
    batch_size, steps, lr, save_every, ...), from scratch or from the params of ``init_workdir``
    (fresh optimizer state and schedule). Saves checkpoints every ``config.save_every`` steps and
    at the end (keeping ``config.keep_checkpoints``), ``run_config.json`` and ``agent.json`` in
    ``workdir``; returns a summary."""
    t0 = time.perf_counter()
    s = loop.setup(config)
    tok = s.tokenizer
    examples = []
    for i, r in enumerate(records):
        msgs = strip_think(r["trajectory"]) if strip else r["trajectory"]
        try:
            examples.append(sft_example(msgs, tok))
        except (ValueError, TypeError) as e:
            raise ValueError(f"record {i}: {e}") from None
    packed = pack_examples(examples, config.seq_len, pad_id=tok.pad_id, seed=config.seed)
    R = packed["tokens"].shape[0]
    rows_per_step = config.batch_size
    _make_run_config(config, workdir)
    settings.save(workdir)
    mlog = metrics_lib.MetricsLog(run_dir.metrics_file(workdir))
    lengths = [len(e[0]) for e in examples]
    log(
        f"sft: {len(examples)} trajectories ({np.mean(lengths):.0f} tokens on average, max "
        f"{max(lengths)}), packed into {R} rows of {config.seq_len + 1}; {config.steps} steps of "
        f"{rows_per_step} rows"
    )
    rng = np.random.default_rng(config.seed)
    with jax.set_mesh(s.mesh):
        step_fn = loop.compile_step(s)
        if init_workdir is None:
            state = loop.init_state(s)
        else:  # no random init to throw away
            state = loop.state_from_params(s, load_trained(init_workdir)[1], config.seed)
            log(f"sft: starting from the params of {init_workdir}")
        ck = ckpt_lib.Checkpointer(
            run_dir.checkpoints(workdir), save_every=1, keep=config.keep_checkpoints, async_save=False
        )
        meta = ckpt_lib.make_meta(config, state["params"])
        order = rng.permutation(R)
        pos, losses = 0, []
        for step in range(1, config.steps + 1):
            idx = []
            while len(idx) < rows_per_step:
                if pos == len(order):
                    order, pos = rng.permutation(R), 0
                idx.append(order[pos])
                pos += 1
            b = sft_batch(packed, idx)
            b = {k: v.reshape((config.grad_accum, -1) + v.shape[1:]) for k, v in b.items()}
            ts = time.perf_counter()
            state, m = step_fn(state, loop.global_batch(s, b))
            m = jax.device_get(m)
            check_finite(m, step, last_good=ck.latest_step(), directory=ck.directory)
            loss = float(m["loss"])
            losses.append(loss)
            mlog.write(
                {
                    "step": step,
                    "loss": loss,
                    "grad_norm": float(m["grad_norm"]),
                    "lr": float(m["lr"]),
                    "tokens": int(m["tokens"]),
                    "step_time_s": time.perf_counter() - ts,
                    **metrics_lib.aux_and_load_record(m),
                }
            )
            if step % max(1, config.log_every) == 0 or step == config.steps:
                log(f"sft step {step}/{config.steps}: loss {loss:.4f}")
            if step % config.save_every == 0 or step == config.steps:
                ck.save(step, state, {}, meta, force=True)
        mlog.close()
        ck.close()
        ckpt_dir = ck.directory
    return {
        "steps": config.steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trajectories": len(examples),
        "rows": R,
        "checkpoints": ckpt_dir,
        "seconds": time.perf_counter() - t0,
    }


def _rollout_fn(impl: str):
    if impl not in ("scan", "segmented"):
        raise ValueError(f"rollout impl must be 'scan' or 'segmented', got {impl!r}")
    return rollout.scan_rollout if impl == "scan" else rollout.segmented_rollout


def run_questions(
    model,
    params,
    tokenizer,
    settings: AgentSettings,
    questions: Sequence[str],
    *,
    batch_size: int = 32,
    sampling=None,
    seed: int = 0,
    impl: str = "scan",
    wiki: SimulatedWiki | None = None,
    chat_format: protocol.ChatFormat | None = None,
) -> list[dict]:
    """Roll the agent out on ``questions`` (fixed-size batches; the last one is padded with
    repeats so only one shape compiles). Returns per question {question, prediction, status,
    turns, trajectory}. ``chat_format``: default chatml (``rollout.segmented_rollout``)."""
    fn = _rollout_fn(impl)
    wiki = wiki or SimulatedWiki(settings.wiki_config())
    executor = synth.wiki_executor(wiki)
    questions = list(questions)
    if not questions:
        raise ValueError("run_questions: no questions")
    B = min(batch_size, len(questions))
    out = []
    key = jax.random.PRNGKey(seed)
    for i in range(0, len(questions), B):
        chunk = questions[i : i + B]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (B - n)
        key, sub = jax.random.split(key)
        res = fn(
            model,
            params,
            tokenizer,
            executor,
            chunk,
            config=settings.rollout_config(),
            system_prompt=settings.system_prompt,
            sampling=sampling,
            rng=sub if sampling is not None else None,
            chat_format=chat_format,
        )
        names = res.status_names()
        for r in range(n):
            out.append(
                {
                    "question": chunk[r],
                    "prediction": res.answers[r],
                    "status": names[r],
                    "turns": int(res.turns[r]),
                    "trajectory": res.messages[r],
                }
            )
    return out


def chat_setup(tokenizer, tool_specs, date=synth.SYNTH_DATE) -> tuple[protocol.ChatFormat, str]:
    """The chat format and system prompt for a released model's tokenizer: the Qwen3 template and
    Tongyi DeepResearch's system prompt (tools listed in it, as Tongyi does) when the tokenizer is
    a chat model's (it has a chat template or ``<|im_start|>`` as a token); else chatml and
    ``protocol.build_system_prompt``. ``date``: the simulated wiki's by default."""
    specs = list(tool_specs)
    chat = getattr(tokenizer, "chat_template", None) or protocol.IM_START in getattr(
        tokenizer, "added_tokens", {}
    )
    if chat:
        return protocol.Qwen3Format(), tongyi_system_prompt(specs, date=date)
    return protocol.CHATML, protocol.build_system_prompt(specs, date=date)


def _check_hf_folder(path: str) -> None:
    """Fail before loading any weights when ``path`` is not a model folder with a tokenizer."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r}: no such directory")
    for name, what in (("config.json", "a Hugging Face model folder"), ("tokenizer.json", "its tokenizer")):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(
                f"--checkpoint {path!r} has no {name}: give {what} (config.json, weights, tokenizer.json)"
            )


def load_hf_agent(
    path: str,
    *,
    wiki: dict | None = None,
    max_turns: int | None = None,
    turn_tokens: int | None = None,
    token_budget: int | None = None,
    dtype=None,
):
    """A Hugging Face checkpoint folder as an agent in the simulated wiki: ``(model, params,
    tokenizer, settings, chat_format)``. The model comes from ``jaxllm.load_hf_checkpoint`` (any
    registered model_type), the tokenizer from ``load_hf_tokenizer(path)``, the format and system
    prompt from ``chat_setup``; there is no agent workdir, so the rollout limits (None: the
    ``AgentSettings`` defaults) and the wiki config (WikiConfig fields) are given here."""
    _check_hf_folder(path)
    tokenizer = load_hf_tokenizer(path)
    limits = {
        k: v
        for k, v in (("max_turns", max_turns), ("turn_tokens", turn_tokens), ("token_budget", token_budget))
        if v is not None
    }
    settings = AgentSettings(system_prompt="", wiki={"seed": 0, **(wiki or {})}, **limits)
    settings.rollout_config()  # limits and wiki are valid before any weights are read
    specs = synth.wiki_executor(SimulatedWiki(settings.wiki_config())).tool_specs()
    fmt, system_prompt = chat_setup(tokenizer, specs)
    settings = dataclasses.replace(settings, system_prompt=system_prompt)
    model, params = jaxllm.load_hf_checkpoint(path, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"--checkpoint {path!r}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size {model.config.vocab_size}"
        )
    return model, params, tokenizer, settings, fmt


def train_rl(
    config,
    workdir: str,
    init_workdir: str,
    records: Sequence[dict],
    *,
    init_step: int | None = None,
    group: int = 8,
    questions_per_step: int = 8,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    impl: str = "scan",
    drop_statuses: Sequence[int] = DROP_STATUSES,
    length_multiple: int = 512,
    log: Callable[[str], None] = _log_default,
) -> dict:
    """On-policy RL from the checkpoint in ``init_workdir`` (an SFT or RL workdir; its latest
    checkpoint, or step ``init_step``) for
    ``config.steps`` updates with ``config.lr`` etc.; each step draws ``questions_per_step``
    questions (epochs over a seeded shuffle of ``records``), samples ``group`` rollouts of each at
    temperature 1 and makes one update. Writes ``metrics.jsonl`` (reward, answered, kept, loss,
    clip fractions, ratio deviation, times per step) and the final checkpoint in ``workdir``.
    The update's rows are padded to a multiple of ``length_multiple`` tokens, so only a few
    shapes compile."""
    if group < 2:
        raise ValueError(f"group must be >= 2 (leave-one-out baseline), got {group}")
    if questions_per_step < 1:
        raise ValueError(f"questions_per_step must be >= 1, got {questions_per_step}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    t0 = time.perf_counter()
    settings = load_settings(init_workdir)
    check_world(records, settings, "RL questions")
    model, params, tok = load_trained(init_workdir, init_step)
    wiki = SimulatedWiki(settings.wiki_config())
    executor = synth.wiki_executor(wiki)
    s = rl_setup(config, model, questions_per_step * group)
    rollout_mesh = s.mesh if s.mesh.size > 1 else None  # one device: the plain single-device loops
    _make_run_config(config, workdir)
    settings.save(workdir)
    rl_step = make_rl_step(
        model.apply,
        s.tx,
        s.schedule,
        eps_low=eps_low,
        eps_high=eps_high,
        bias_update_rate=config.moe_bias_update_rate,
    )
    step_fn = jax.jit(rl_step, donate_argnums=(0,))
    with jax.set_mesh(s.mesh):
        state = loop.state_from_params(s, params, config.seed)
    key = jax.random.PRNGKey(config.seed + 1)
    sampling = SamplingConfig(mode="sample", temperature=1.0)
    fn = _rollout_fn(impl)
    rng = random.Random(config.seed)
    order, pos = list(range(len(records))), len(records)
    mlog = metrics_lib.MetricsLog(run_dir.metrics_file(workdir))
    rewards_hist = []
    log(
        f"rl: {len(records)} questions; {config.steps} steps x {questions_per_step} questions x "
        f"group {group}; lr {config.lr}; eps {eps_low}/{eps_high}; rollout {impl}"
    )
    for step in range(1, config.steps + 1):
        picked = []
        while len(picked) < questions_per_step:
            if pos == len(order):
                rng.shuffle(order)
                pos = 0
            picked.append(records[order[pos]])
            pos += 1
        qs = [r["question"] for r in picked for _ in range(group)]
        golds = [r["answer"] for r in picked for _ in range(group)]
        key, sub = jax.random.split(key)
        ts = time.perf_counter()
        res = fn(
            model,
            state["params"],
            tok,
            executor,
            qs,
            config=settings.rollout_config(),
            system_prompt=settings.system_prompt,
            sampling=sampling,
            rng=sub,
            mesh=rollout_mesh,
        )
        t_roll = time.perf_counter() - ts
        b = rl_batch(res, golds, group, drop_statuses=drop_statuses, length_multiple=length_multiple)
        ts = time.perf_counter()
        with jax.set_mesh(s.mesh):
            batch = rows_on_mesh(s.mesh, {k: b[k] for k in ("tokens", "mask", "old_logp", "adv")})
            state, m = step_fn(state, batch)
        m = jax.device_get(m)
        t_upd = time.perf_counter() - ts
        check_finite(m, step)  # the one NaN policy (RL saves only at the end)
        rec = {
            "step": step,
            "reward": float(b["rewards"].mean()),
            "answered": float(np.mean(res.status == rollout.ANSWERED)),
            "kept": float(b["keep"].mean()),
            "solved_groups": float(np.mean(b["rewards"].reshape(-1, group).max(-1))),
            "loss": float(m["loss"]),
            "grad_norm": float(m["grad_norm"]),
            "lr": float(m["lr"]),
            "tokens": int(m["tokens"]),
            "clip_low": float(m["clip_low"]),
            "clip_high": float(m["clip_high"]),
            "ratio_dev": float(m["ratio_dev"]),
            "mean_length": float(res.lengths.mean()),
            "rollout_s": t_roll,
            "update_s": t_upd,
            **metrics_lib.aux_and_load_record(m),
        }
        mlog.write(rec)
        rewards_hist.append(rec["reward"])
        if step % max(1, config.log_every) == 0 or step == config.steps:
            log(
                f"rl step {step}/{config.steps}: reward {rec['reward']:.3f} answered "
                f"{rec['answered']:.2f} kept {rec['kept']:.2f} loss {rec['loss']:+.4f} "
                f"ratio_dev {rec['ratio_dev']:.1e} ({t_roll:.1f}s rollout, {t_upd:.1f}s update)"
            )
    mlog.close()
    _save_checkpoint(workdir, config, state)
    return {
        "steps": config.steps,
        "reward_first": rewards_hist[0],
        "reward_last": rewards_hist[-1],
        "reward_mean_last10": float(np.mean(rewards_hist[-10:])),
        "seconds": time.perf_counter() - t0,
    }
