"""ReAct rollouts with any model of the contract (``jaxllm.models.base``) and its decode caches: a
Python-segmented loop (``segmented_rollout``, any tokenizer and chat format) and the same loop
compiled as one ``lax.scan`` over turns (``scan_rollout``, byte tokenizer, chatml), where the
simulated wiki's environment step runs in jnp and ``io_callback`` is the bridge to Python tools;
both give identical results.

Per turn every running row decodes with its cache until a stop string (``protocol.STOP_STRINGS``,
plus ``<|im_end|>`` for a model that closes its own chatml turn), a stop id of the tokenizer (a
Hugging Face tokenizer's ``stop_ids``: ``<|im_end|>`` and the eos ids are single special ids,
which decoding drops, so they end a turn by id; see ``cut_turn_ids``) or the per-turn token cap;
the turn is parsed with ``protocol`` and executed by a ``tools.ToolExecutor`` (any backends: the
simulated wiki, the sandbox, real web tools); the observation's tokens (chat framing included) are
appended to the row's cache. Rows run batched and stop independently:

    from jaxllm.agent import rollout, synth
    from jaxllm.agent.wiki import SimulatedWiki, WikiConfig
    wiki = SimulatedWiki(WikiConfig(seed=0))
    out = rollout.segmented_rollout(model, params, ByteTokenizer(), synth.wiki_executor(wiki),
                                    ["What is the capital of Velonia?"] * 4,
                                    config=rollout.RolloutConfig(max_turns=8, turn_tokens=256,
                                                                 token_budget=8192))
    out.tokens, out.kind, out.status, out.answers, out.messages

**Chat formats.** ``chat_format`` (a ``protocol.ChatFormat``) renders the prompt, the observation
turns and the forced-answer turn: ``protocol.CHATML`` (default) or ``protocol.Qwen3Format`` (the
Qwen3 chat template of ``jaxllm.data.chat_template``, for Qwen3 / Tongyi-DeepResearch checkpoints
with their ``load_hf_tokenizer`` tokenizer). The messages are the same in both.

Statuses: ``ANSWERED`` (a well-formed ``<answer>``), ``MAX_TURNS`` (``max_turns`` assistant turns
without an answer), ``MAX_TOKENS`` (the token budget forced a final-answer turn, and that turn did
not answer), ``TOOL_ERROR`` (``max_tool_errors`` error observations in a row).

**Token budget.** ``token_budget`` bounds every row's length (prompt, model turns, observations;
it is also the MLA cache capacity). Before appending an observation the loop checks that the
observation plus one more full turn still leaves room for a forced final turn; if not, the
observation is replaced (as Tongyi DeepResearch does) by the user message
``protocol.FORCE_ANSWER`` and the row gets exactly one more turn (``forced_answer`` is set).

**One batched cache.** Rows of a rollout have different lengths. Both loops sit on the inference
engine (``jaxllm.decode``): one cache for the batch with a position per row, appends of up to
``chunk`` tokens per call in which row b's first ``n[b]`` tokens are real (``decode.append_tokens``:
a row with nothing to append, or past its end, keeps its state), and ``decode.pick`` for every
token (greedy, the ``SamplingConfig`` modes, AutoDeco heads through ``autodeco=(heads, params)``),
with one PRNG key per row.

**Masks.** ``kind[b, t]`` says who wrote each token: ``KIND_PROMPT`` (system + question + the
first generation prompt), ``KIND_MODEL`` (sampled by the model), ``KIND_FORCED`` (written into an
assistant turn by ``forced_turns``, not sampled), ``KIND_TOOL`` (observations and the chat framing
around them, the forced-answer message), ``KIND_PAD``. ``model_mask`` (sampled tokens) is the RL
loss mask; ``logprobs`` holds the model's log-probability of each sampled token (raw logits, before
any sampling transform).

**Text vs tokens.** The tokens of a turn are exactly what the model wrote (the stop token is fed to
the cache too); the parser and ``messages`` see ``truncate_at_stop`` of the turn's text. With the
byte tokenizer ``tokenizer.encode(protocol.render_chat(messages, add_generation_prompt=...))``
equals the token row whenever every turn ended at ``</tool_call>``/``</answer>``/``<|im_end|>``;
a turn cut at a ``<tool_response>`` the model forged, or at the per-turn cap, keeps those tokens in
the row but not in ``messages`` (they are never executed or trusted).

**The environment inside the scan** (``scan_rollout(env=...)``). With an executor from
``synth.wiki_executor(wiki)`` (``wiki_env.wiki_of`` recognises it), the byte tokenizer and chatml,
each finished turn is first judged in jnp (``wiki_env.jnp_judge``: ``react_jnp.canonical_action``
parses the canonical answers and ``search``/``visit`` calls, the wiki's ``search_step``/
``visit_step`` give the observation, the budget and status rules are the host judge's). Every other
turn goes to the host judge (``episodes.Episodes.judge``) through ``io_callback`` under a
``lax.cond``, so a batch of canonical turns makes no callback at all, and the result is the same as
the segmented loop's in every case (a fuzz test checks that). ``env="host"`` judges every turn on
the host (any executor, any tokenizer with byte-string tokens, any chat format); ``"auto"`` picks
``"jnp"`` when it can. ``RolloutResult.host_callbacks`` counts the callbacks. Messages and answers
of the scan loop are rebuilt from the tokens and per-turn spans afterwards.

Modules: ``episodes`` (host bookkeeping, config, result), ``react_jnp`` (a turn read in jnp: text
bytes, stops, the canonical-action parser), ``wiki_env`` (the simulated wiki's step in jnp), this
one (the two loops on the inference engine).
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxllm import decode
from jaxllm.agent import protocol, react_jnp, tools, wiki_env
from jaxllm.agent.episodes import (
    ANSWERED,
    KIND_FORCED,
    KIND_MODEL,
    KIND_PAD,
    KIND_PROMPT,
    KIND_TOOL,
    MAX_TOKENS,
    MAX_TURNS,
    RUNNING,
    STATUS_NAMES,
    TOOL_ERROR,
    TURN_STOPS,
    RolloutConfig,
    RolloutResult,
    cut_turn,
    cut_turn_ids,
    decode_turn,
    prepare,
)
from jaxllm.agent.wiki_env import wiki_of
from jaxllm.data.tokenizers import ByteTokenizer

__all__ = [
    "RolloutConfig",
    "RolloutResult",
    "segmented_rollout",
    "scan_rollout",
    "TURN_STOPS",
    "cut_turn",
    "cut_turn_ids",
    "decode_turn",
    "ENVS",
    "wiki_of",
    "RUNNING",
    "ANSWERED",
    "MAX_TURNS",
    "MAX_TOKENS",
    "TOOL_ERROR",
    "STATUS_NAMES",
    "KIND_PAD",
    "KIND_PROMPT",
    "KIND_MODEL",
    "KIND_FORCED",
    "KIND_TOOL",
]

ENVS = ("auto", "jnp", "host")
DEFAULT_CONFIG = RolloutConfig()


# ------------------------------------------------------------------------------------------
# Compiled pieces: one batched cache, the inference engine's append and pick
# ------------------------------------------------------------------------------------------


def _init_cache(model, B, T, C, mesh=None):
    """One cache for every row (its rows split over the mesh's data axis when there is one).
    Appends are padded to at most C tokens past a row's end. Built under jit so that every leaf is
    its own buffer (the steps donate the cache)."""
    return decode.shard_rows(jax.jit(lambda: model.init_cache(B, T + C))(), mesh, B)


def _penalized(sampling) -> bool:
    return sampling is not None and (sampling.presence_penalty != 0 or sampling.repetition_penalty != 1)


def _choose(last, keys, forced_R, *, sampling, heads, heads_params, seen=None):
    """The next token of every row (the engine's `pick`; a forced id wins), its log-probability
    under the raw logits, and the row keys to use next. ``seen``: (tokens, mask) the penalties
    look at (the row's assistant tokens so far)."""
    logits_RV, hidden_RD = last
    keys, draw = decode.split_rows(keys)
    prev_tokens, prev_mask = (None, None) if seen is None else seen
    tok = decode.pick(
        logits_RV,
        hidden_RD,
        draw,
        sampling=sampling,
        heads=heads,
        heads_params=heads_params,
        prev_tokens_BN=prev_tokens,
        prev_mask_BN=prev_mask,
    )
    tok = jnp.where(forced_R >= 0, forced_R, tok)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_RV, axis=-1), tok[:, None], -1)[:, 0]
    return tok, logp, keys


@jax.jit
def _take_rows(cache, last, keys, history, take_S):
    """The device batch's state of the slots ``take_S`` (a smaller batch)."""
    return jax.tree_util.tree_map(lambda x: x[take_S], (cache, last, keys, history))


@functools.lru_cache(maxsize=16)
def _feed_fn(model_cls, config):
    model = model_cls(config)

    def feed(params, cache, last, toks_RC, n_R):
        cache, logits, hidden = decode.append_tokens(model, params, cache, toks_RC, n_R, *last)
        return cache, (logits, hidden)

    return jax.jit(feed, donate_argnums=(1, 2))


@functools.lru_cache(maxsize=16)
def _step_fn(model_cls, config, sampling, heads):
    model = model_cls(config)

    def step(params, cache, last, forced_R, active_R, keys, heads_params, history):
        """history: the assistant tokens of each row so far (tokens, count), for the penalties."""
        hist_RT, count_R = history
        seen = (
            (hist_RT, jnp.arange(hist_RT.shape[1])[None] < count_R[:, None]) if _penalized(sampling) else None
        )
        tok, logp, keys = _choose(
            last, keys, forced_R, sampling=sampling, heads=heads, heads_params=heads_params, seen=seen
        )
        cache, logits, hidden = decode.append_tokens(
            model, params, cache, tok[:, None], active_R.astype(jnp.int32), *last
        )
        if _penalized(sampling):
            rows = jnp.arange(hist_RT.shape[0])
            slot = jnp.clip(count_R, 0, hist_RT.shape[1] - 1)
            hist_RT = hist_RT.at[rows, slot].set(jnp.where(active_R, tok, hist_RT[rows, slot]))
            count_R = count_R + active_R.astype(jnp.int32)
        return tok, logp, cache, (logits, hidden), keys, (hist_RT, count_R)

    return jax.jit(step, donate_argnums=(1, 2, 7))


def segmented_rollout(
    model,
    params,
    tokenizer,
    executor: tools.ToolExecutor,
    questions: Sequence[str],
    *,
    config: RolloutConfig = DEFAULT_CONFIG,
    system_prompt: str | None = None,
    sampling=None,
    rng=None,
    forced_turns: Sequence[Sequence[str]] | None = None,
    chat_format: protocol.ChatFormat | None = None,
    autodeco=None,
    mesh=None,
) -> RolloutResult:
    """Run one ReAct episode per question, batched; see the module docstring.

    Args:
      model, params: a model of the contract (``jaxllm.models.base``) and its params.
      tokenizer: ``encode(text) -> ids`` / ``decode(ids) -> text`` (e.g. ``ByteTokenizer``, or a
        ``PretrainedTokenizer`` from ``jaxllm.data.hf_tokenizer.load_hf_tokenizer``, whose
        ``stop_ids`` end a turn by id); ``pad_id`` pads the returned rows.
      executor: runs parsed actions (``synth.wiki_executor(wiki)`` for the simulated wiki).
      questions: one per row.
      system_prompt: default ``protocol.build_system_prompt(executor.tool_specs(),
        date=synth.SYNTH_DATE)``, the prompt synthesized trajectories carry.
      sampling: None for greedy, else a ``SamplingConfig`` (any mode) with ``rng`` (one key, split
        per row, or one key per row). Presence and repetition penalties look at the row's
        assistant tokens so far (every turn, sampled or forced; not the prompt or observations).
      autodeco: ``(heads_module, heads_params)`` for ``SamplingConfig(mode="autodeco")``: the
        heads read each row's last hidden state and logits (see ``jaxllm.decode.pick``).
      forced_turns: optional, per row a list of texts; turn i of that row starts with the tokens
        of ``forced_turns[row][i]`` (written, not sampled: ``KIND_FORCED``) and the model
        continues from there unless a stop string is already complete. For scripted episodes,
        replaying demonstrations, or forcing a ``<think>\\n`` prefix.
      chat_format: ``protocol.CHATML`` (None) or ``protocol.Qwen3Format(...)``: how the prompt,
        observations and the forced-answer message are framed.
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis: the rows (cache, tokens, keys) are split
        over it and each device decodes its own rows; params stay as placed when they already live
        on the mesh (e.g. sharded by ``load_hf_checkpoint``), else are replicated over it. The
        number of questions must divide by the axis size. ``RolloutResult.row_sharding`` says how
        the rows ran. Single-process meshes (results are gathered to the host).
    """
    cfg = config
    prompts, forced_ids, ep = prepare(
        model,
        tokenizer,
        executor,
        questions,
        cfg,
        system_prompt,
        sampling,
        rng,
        forced_turns,
        "segmented_rollout",
        chat_format,
        autodeco,
    )
    B = len(prompts)
    T = cfg.token_budget
    pad = getattr(tokenizer, "pad_id", 0) or 0
    tokens = np.full((B, T), pad, np.int32)
    kind = np.zeros((B, T), np.int8)
    logprobs = np.zeros((B, T), np.float32)
    length = np.zeros((B,), np.int32)

    def push(r, ids, k, lp=None):
        n = len(ids)
        tokens[r, length[r] : length[r] + n] = ids
        kind[r, length[r] : length[r] + n] = k
        if lp is not None:
            logprobs[r, length[r] : length[r] + n] = lp
        length[r] += n

    mcfg = model.config
    C = cfg.chunk
    cache = _init_cache(model, B, T, C, mesh)
    last = decode.shard_rows(decode.empty_last(model, B), mesh, B)
    heads, heads_params = (None, None) if autodeco is None else autodeco
    params, heads_params = decode.on_mesh(params, mesh), decode.on_mesh(heads_params, mesh)
    feed = _feed_fn(type(model), mcfg)
    step = _step_fn(type(model), mcfg, sampling, heads)
    keys = decode.shard_rows(decode.row_keys(jax.random.PRNGKey(0) if rng is None else rng, B), mesh, B)
    # the assistant tokens of each row, for penalties (empty when the sampling has none)
    width = T if _penalized(sampling) else 1
    history = decode.shard_rows((jnp.zeros((B, width), jnp.int32), jnp.zeros((B,), jnp.int32)), mesh, B)

    # The device batch holds slots; slots[s] is the row in slot s (-1: a filler that never
    # appends). Between turns the rows still running move into a smaller batch (compact).
    slots = np.arange(B)
    per_device = 1 if mesh is None else mesh.shape["data"]

    def compact():
        """Drop finished rows from the device batch once the running ones fit a smaller size of
        ``decode.row_buckets`` (the scan loop shrinks its batch by the same rule)."""
        nonlocal cache, last, keys, history, slots
        live = [s for s, r in enumerate(slots) if r >= 0 and ep.status[r] == RUNNING]
        if not live:
            return
        size = decode.row_bucket(-(-len(live) // per_device), len(slots), per_device)
        if size == len(slots):
            return
        take = np.array(live + [live[0]] * (size - len(live)))  # fillers copy a live row's state
        cache, last, keys, history = decode.shard_rows(
            _take_rows(cache, last, keys, history, jnp.asarray(take)), mesh, size
        )
        slots = np.concatenate([slots[live], np.full((size - len(live),), -1)])

    def feed_rows(pending):
        """Append each row's pending ids in chunks of at most C (rows with none are left alone)."""
        nonlocal cache, last
        rows = [pending[r] if r >= 0 else pending_none for r in slots]
        longest = max(len(p) for p in rows)
        for j in range(0, longest, C):
            parts = [p[j : j + C] for p in rows]
            width = min(C, decode.prompt_bucket(max(len(x) for x in parts), C))  # few shapes
            toks = np.full((len(slots), width), pad, np.int32)
            for s, x in enumerate(parts):
                toks[s, : len(x)] = x
            n = np.array([len(x) for x in parts], np.int32)
            cache, last = feed(params, cache, last, jnp.asarray(toks), jnp.asarray(n))

    pending_none = np.zeros((0,), np.int32)
    pending = []
    for r, p in enumerate(prompts):
        push(r, p, KIND_PROMPT)
        pending.append(p)
    device_rows = []
    while (ep.status == RUNNING).any():
        compact()
        device_rows.append(len(slots))
        feed_rows(pending)
        running = ep.status == RUNNING
        gen: list[list[int]] = [[] for _ in range(B)]
        generating = np.array([r >= 0 and running[r] for r in slots])  # per slot
        while generating.any():
            forced = np.full((len(slots),), -1, np.int32)
            for s in np.flatnonzero(generating):
                r = slots[s]
                t = ep.turns[r]
                script = forced_ids[r][t] if t < len(forced_ids[r]) else ()
                if len(gen[r]) < len(script):
                    forced[s] = script[len(gen[r])]
            tok, lp, cache, last, keys, history = step(
                params, cache, last, jnp.asarray(forced), jnp.asarray(generating), keys, heads_params, history
            )
            tok, lp = np.asarray(tok), np.asarray(lp)
            for s in np.flatnonzero(generating):
                r = slots[s]
                gen[r].append(int(tok[s]))
                was_forced = forced[s] >= 0
                push(r, [tok[s]], KIND_FORCED if was_forced else KIND_MODEL, None if was_forced else [lp[s]])
                _, stop = cut_turn_ids(tokenizer, gen[r])
                if stop is not None or len(gen[r]) >= cfg.turn_tokens:
                    generating[s] = False
        pending = [pending_none for _ in range(B)]
        for r in np.flatnonzero(running):
            ids = ep.judge(r, gen[r], length[r])
            if ids is not None:
                push(r, ids, KIND_TOOL)
                pending[r] = ids
    sharding = jax.tree_util.tree_leaves(cache)[0].sharding if mesh is not None else None
    return ep.result(tokens, kind, logprobs, length, row_sharding=sharding, device_rows=device_rows)


# ------------------------------------------------------------------------------------------
# The compiled loop: lax.scan over turns; jnp wiki step, io_callback to the host judge
# ------------------------------------------------------------------------------------------


_HOSTS: dict = {}  # call id -> the host judge of a running scan_rollout
_CALL_IDS = itertools.count()


def _host_trampoline(call_id, *args):
    return _HOSTS[int(call_id)](*args)


@flax.struct.dataclass
class _TurnRows:
    """What one turn of the scan loop reads and writes of each row; every leaf is batch-first, so
    ``decode.on_live_rows`` can move the running rows into a smaller batch."""

    cache: object
    last: tuple  # (logits [B, V], hidden [B, D]) at each row's last token
    tokens: jax.Array  # [B, T]
    kind: jax.Array  # [B, T]
    logprobs: jax.Array  # [B, T]
    length: jax.Array  # [B]
    pending: jax.Array  # [B, T] ids to append before decoding (prompt, observation)
    n_pending: jax.Array  # [B]
    forced: jax.Array  # [B, L] this turn's forced ids (-1: sample)
    keys: jax.Array  # [B] PRNG keys
    turn_ids: jax.Array  # [B, L] the ids this turn wrote
    turn_len: jax.Array  # [B]


@flax.struct.dataclass
class _ScanState:
    """The scan loop's carry from turn to turn (B rows)."""

    cache: object
    last: tuple
    tokens: jax.Array
    kind: jax.Array
    logprobs: jax.Array
    length: jax.Array
    pending: jax.Array
    n_pending: jax.Array
    status: jax.Array
    turns: jax.Array
    n_err: jax.Array
    consec: jax.Array  # tool errors in a row
    forced_ans: jax.Array
    rec: tuple  # per turn: (start [B, N], length [B, N], observation length [B, N], batch size [N])
    ans_span: jax.Array  # [B, 2] the answer's token span when the jnp judge took it
    keys: jax.Array


@functools.lru_cache(maxsize=8)
def _scan_fn(
    model_cls,
    config,
    T: int,
    C: int,
    L: int,
    max_turns: int,
    B: int,
    sampling,
    env_static: wiki_env.EnvStatic | None = None,
    pad: int = 0,
    heads=None,
    per_device: int = 1,
):
    """The jitted scan rollout. Per turn, rows the jnp wiki judge does not take (all rows without
    ``env_static``) go through one io_callback to the host judge of the call named by ``call_id``,
    under a ``lax.cond`` (no callback when there are none). Each turn runs on the running rows
    only (``decode.on_live_rows``: a smaller batch once they fit one; ``per_device`` rows blocks
    of the mesh's data axis)."""
    model = model_cls(config)

    def write(buf, length, vals_BN, n_B):
        """buf[r, length[r] + i] = vals[r, i] for i < n[r]."""
        rel = jnp.arange(T)[None] - length[:, None]
        inside = (rel >= 0) & (rel < n_B[:, None])
        got = jnp.take_along_axis(vals_BN, jnp.clip(rel, 0, vals_BN.shape[1] - 1), axis=1)
        return jnp.where(inside, got.astype(buf.dtype), buf)

    def feed_pending(params, cache, last, pending, n_B, active):
        """Append each running row's pending ids, C at a time (the engine's ragged append)."""
        n_B = jnp.where(active, n_B, 0)
        pending = jnp.pad(pending, ((0, 0), (0, C)), constant_values=pad)  # a last chunk may pass T

        def chunk_body(carry):
            j, cache, last = carry
            toks = jax.lax.dynamic_slice_in_dim(pending, j * C, C, axis=1)
            n = jnp.clip(n_B - j * C, 0, C)
            cache, logits, hidden = decode.append_tokens(model, params, cache, toks, n, *last)
            return j + 1, cache, (logits, hidden)

        _, cache, last = jax.lax.while_loop(
            lambda c: c[0] * C < n_B.max(), chunk_body, (jnp.int32(0), cache, last)
        )
        return cache, last

    def run(
        params,
        cache,
        tokens,
        kind,
        logprobs,
        length,
        pending,
        n_pending,
        forced_BNL,
        keys,
        call_id,
        env,
        limit,
        heads_params,
        turn_text: react_jnp.TurnText,
    ):
        zB = jnp.zeros((B,), jnp.int32)
        K = turn_text.stops_SK.shape[1]
        zBN = jnp.zeros((B, max_turns), jnp.int32)

        def decode_turn(r: _TurnRows, live) -> _TurnRows:
            """One turn of the rows of ``r`` (the live ones; the batch may be a compacted one):
            append their pending ids, then decode until each stops."""
            cache, last = feed_pending(params, r.cache, r.last, r.pending, r.n_pending, live)
            r = r.replace(cache=cache, last=last)
            row_idx = jnp.arange(live.shape[0])

            def dec_body(c):
                r, text, gen = c
                at = jnp.clip(r.turn_len, 0, L - 1)
                forced = jnp.where(r.turn_len < L, r.forced[row_idx, at], -1)
                seen = (
                    (r.tokens, (r.kind == KIND_MODEL) | (r.kind == KIND_FORCED))
                    if _penalized(sampling)
                    else None
                )
                tok, lp, keys = _choose(
                    r.last,
                    r.keys,
                    forced,
                    sampling=sampling,
                    heads=heads,
                    heads_params=heads_params,
                    seen=seen,
                )
                one = gen.astype(jnp.int32)
                cache, logits, hidden = decode.append_tokens(
                    model, params, r.cache, tok[:, None], one, *r.last
                )
                r = r.replace(
                    cache=cache,
                    last=(logits, hidden),
                    keys=keys,
                    tokens=write(r.tokens, r.length, tok[:, None], one),
                    kind=write(
                        r.kind, r.length, jnp.where(forced >= 0, KIND_FORCED, KIND_MODEL)[:, None], one
                    ),
                    logprobs=write(r.logprobs, r.length, jnp.where(forced >= 0, 0.0, lp)[:, None], one),
                    length=r.length + one,
                    turn_ids=r.turn_ids.at[row_idx, at].set(jnp.where(gen, tok, r.turn_ids[row_idx, at])),
                    turn_len=r.turn_len + one,
                )
                text, hit = react_jnp.stop_hit(turn_text, text, tok, gen)
                return r, text, gen & ~hit & (r.turn_len < L)

            text = jnp.full((live.shape[0], K), -1, jnp.int32)
            r, _, _ = jax.lax.while_loop(lambda c: c[-1].any(), dec_body, (r, text, live))
            return r

        def turn(s: _ScanState, n):
            running = s.status == RUNNING
            start = s.length
            rows = _TurnRows(
                s.cache,
                s.last,
                s.tokens,
                s.kind,
                s.logprobs,
                s.length,
                s.pending,
                s.n_pending,
                jax.lax.dynamic_index_in_dim(forced_BNL, n, axis=1, keepdims=False),
                s.keys,
                jnp.zeros((B, L), jnp.int32),
                zB,
            )
            r, size = decode.on_live_rows(decode_turn, rows, running, per_device)
            state = (s.status, s.turns, s.n_err, s.consec, s.forced_ans)
            if env_static is not None:
                (ok, j_status, j_turns, j_consec, j_forced, j_pending, j_n, j_ans, a_lo, a_hi) = (
                    wiki_env.jnp_judge(
                        env,
                        env_static,
                        r.turn_ids,
                        r.turn_len,
                        r.length,
                        running,
                        s.status,
                        s.turns,
                        s.consec,
                        s.forced_ans,
                        limit,
                        T=T,
                        L=L,
                        max_turns=max_turns,
                        pad=pad,
                    )
                )
                need_host = running & ~ok
                use_j = running & ok
            else:
                need_host = running
                use_j = jnp.zeros((B,), bool)
            shapes = (jax.ShapeDtypeStruct((B,), jnp.int32),) * 4 + (
                jax.ShapeDtypeStruct((B,), jnp.bool_),
                jax.ShapeDtypeStruct((B, T), jnp.int32),
                jax.ShapeDtypeStruct((B,), jnp.int32),
            )
            h = jax.lax.cond(
                need_host.any(),
                lambda: io_callback(
                    _host_trampoline,
                    shapes,
                    call_id,
                    r.turn_ids,
                    r.turn_len,
                    r.length,
                    need_host,
                    *state,
                    ordered=True,
                ),
                lambda: (*state, jnp.full((B, T), pad, jnp.int32), zB),
            )
            pending, n_pending = h[5:]
            status, turns, n_err, consec, forced_ans = (
                jnp.where(need_host, hv, old) for hv, old in zip(h[:5], state)
            )
            ans_span = s.ans_span
            if env_static is not None:
                status = jnp.where(use_j, j_status, status)
                turns = jnp.where(use_j, j_turns, turns)
                consec = jnp.where(use_j, j_consec, consec)
                forced_ans = jnp.where(use_j, j_forced, forced_ans)
                pending = jnp.where(use_j[:, None], j_pending, pending)
                n_pending = jnp.where(use_j, j_n, jnp.where(need_host, n_pending, 0))
                hit = use_j & j_ans
                ans_span = jnp.where(hit[:, None], jnp.stack([start + a_lo, start + a_hi], 1), ans_span)
            else:
                n_pending = jnp.where(need_host, n_pending, 0)
            rec_start, rec_len, rec_obs, rec_rows = s.rec
            rec = (
                rec_start.at[:, n].set(jnp.where(running, start, 0)),
                rec_len.at[:, n].set(jnp.where(running, r.turn_len, 0)),
                rec_obs.at[:, n].set(n_pending),
                rec_rows.at[n].set(jnp.where(running.any(), size, 0)),
            )
            return _ScanState(
                cache=r.cache,
                last=r.last,
                tokens=write(r.tokens, r.length, pending, n_pending),
                kind=write(r.kind, r.length, jnp.full((B, 1), KIND_TOOL, jnp.int8), n_pending),
                logprobs=r.logprobs,
                length=r.length + n_pending,
                pending=pending,
                n_pending=n_pending,
                status=status,
                turns=turns,
                n_err=n_err,
                consec=consec,
                forced_ans=forced_ans,
                rec=rec,
                ans_span=ans_span,
                keys=r.keys,
            ), None

        s = _ScanState(
            cache=cache,
            last=decode.empty_last(model, B),
            tokens=tokens,
            kind=kind,
            logprobs=logprobs,
            length=length,
            pending=pending,
            n_pending=n_pending,
            status=zB,
            turns=zB,
            n_err=zB,
            consec=zB,
            forced_ans=jnp.zeros((B,), bool),
            rec=(zBN, zBN, zBN, jnp.zeros((max_turns,), jnp.int32)),
            ans_span=jnp.full((B, 2), -1, jnp.int32),
            keys=keys,
        )
        s, _ = jax.lax.scan(turn, s, jnp.arange(max_turns))
        out = (
            s.tokens,
            s.kind,
            s.logprobs,
            s.length,
            s.status,
            s.turns,
            s.n_err,
            s.forced_ans,
            s.rec,
            s.ans_span,
        )
        # the cache is returned (and dropped by the caller) so that its donated buffer is updated in place
        return s.cache, out

    return jax.jit(run, donate_argnums=(1,))


def _decode_all(tokenizer, ids) -> str:
    """Text of ids with the chat template's special tokens kept (the framing around observations)."""
    if getattr(tokenizer, "special_ids", None) is not None:
        return tokenizer.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(ids)


def _rebuild_messages(tokenizer, fmt, initial, tokens_r, turns_r, start_r, len_r, obs_r):
    """A row's chat messages from its tokens and turn records (what ``Episodes.judge`` appends in
    the segmented loop: each turn's ``cut_turn`` text, and the observation content inside the
    format's framing of a user turn)."""
    mark = "\x00content\x00"
    msgs = list(initial)
    for i in range(int(turns_r)):
        s, n, o = int(start_r[i]), int(len_r[i]), int(obs_r[i])
        text, stop = cut_turn_ids(tokenizer, tokens_r[s : s + n])
        msgs.append({"role": "assistant", "content": text})
        if o:
            framed = _decode_all(tokenizer, tokens_r[s + n : s + n + o])
            head, tail = fmt.user_turn(mark, stop == protocol.IM_END).split(mark)
            if not (framed.startswith(head) and framed.endswith(tail)):
                raise AssertionError(f"scan_rollout: unexpected framing {framed[:40]!r}...")
            msgs.append({"role": "user", "content": framed[len(head) : len(framed) - len(tail)]})
    return msgs


def scan_rollout(
    model,
    params,
    tokenizer,
    executor: tools.ToolExecutor,
    questions: Sequence[str],
    *,
    config: RolloutConfig = DEFAULT_CONFIG,
    system_prompt: str | None = None,
    sampling=None,
    rng=None,
    forced_turns: Sequence[Sequence[str]] | None = None,
    env: str = "auto",
    chat_format: protocol.ChatFormat | None = None,
    autodeco=None,
    mesh=None,
) -> RolloutResult:
    """``segmented_rollout`` as one compiled program: ``lax.scan`` over turns, a ``while_loop``
    decode per turn with the stop strings and stop ids matched in jnp on each token's bytes
    (``react_jnp.stop_hit``), then the environment.

    ``env`` picks the environment step: ``"jnp"`` runs the simulated wiki in jnp inside the scan
    (``wiki_env.jnp_judge``) and sends only turns its canonical parser does not accept (malformed
    or unusual calls, other tools) to the host through ``io_callback`` under a ``lax.cond``; it
    needs an executor from ``synth.wiki_executor`` (see ``wiki_of``), the ``ByteTokenizer`` and
    chatml. ``"host"`` sends every turn to the host judge (any executor: sandbox, real tools).
    ``"auto"`` (default): ``"jnp"`` where it can, else ``"host"``. Results are identical either
    way, and identical to ``segmented_rollout``; ``host_callbacks`` counts the callbacks made.

    Tokenizers: the ``ByteTokenizer``, or a Hugging Face one whose tokens are byte strings
    (byte-level BPE: Qwen, Llama-3; ``react_jnp.turn_text`` checks, and refuses others: use
    ``segmented_rollout``, ``--rollout segmented``). Any ``chat_format``. Compiled once per (model
    config, batch size, budget, chunk, turn cap, max turns, sampling, env). ``mesh``: the rows split
    over its ``data`` axis, as in ``segmented_rollout``; the host judge's callbacks gather what
    they read to the host.
    """
    if env not in ENVS:
        raise ValueError(f"scan_rollout: env must be one of {ENVS}, got {env!r}")
    fmt = protocol.CHATML if chat_format is None else chat_format
    try:
        turn_text = react_jnp.turn_text(tokenizer, model.config.vocab_size)
    except ValueError as e:
        raise ValueError(
            f"scan_rollout: {e}; the compiled loop reads each token's bytes, use the segmented loop "
            f"(--rollout segmented, rollout.segmented_rollout)"
        ) from None
    cfg = config
    prompts, forced_ids, ep = prepare(
        model,
        tokenizer,
        executor,
        questions,
        cfg,
        system_prompt,
        sampling,
        rng,
        forced_turns,
        "scan_rollout",
        fmt,
        autodeco,
    )
    jnp_ok = isinstance(tokenizer, ByteTokenizer) and fmt == protocol.CHATML
    wiki = wiki_of(executor) if env != "host" and jnp_ok else None
    if env == "jnp" and wiki is None:
        raise ValueError(
            "scan_rollout: env='jnp' needs an executor made by synth.wiki_executor(wiki) (search and "
            "visit of a SimulatedWiki), the ByteTokenizer and the chatml format (observations are "
            f"gathered from pre-tokenised pieces); got {type(tokenizer).__name__} and {fmt.name}"
        )
    env_arrays, env_static = (
        wiki_env.build_env(wiki, tokenizer, executor) if wiki is not None else (None, None)
    )
    initial = [list(m) for m in ep.messages]
    ep.messages = None
    B, T, L = len(prompts), cfg.token_budget, cfg.turn_tokens
    pad = tokenizer.pad_id
    tokens = np.full((B, T), pad, np.int32)
    kind = np.zeros((B, T), np.int8)
    pending = np.full((B, T), pad, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
        kind[r, : len(p)] = KIND_PROMPT
        pending[r, : len(p)] = p
    n_pending = np.array([len(p) for p in prompts], np.int32)
    forced = np.full((B, cfg.max_turns, L), -1, np.int32)
    for r, row in enumerate(forced_ids):
        for i, ids in enumerate(row[: cfg.max_turns]):
            forced[r, i, : len(ids)] = ids
    calls = [0]

    def host(turn_ids, turn_len, length, need, status, turns, n_err, consec, forced_ans):
        calls[0] += 1
        ep.status, ep.turns, ep.n_err, ep.consec_err = (
            np.array(a, np.int32) for a in (status, turns, n_err, consec)
        )
        ep.forced_answer = np.array(forced_ans, bool)
        out = np.full((B, T), pad, np.int32)
        n = np.zeros((B,), np.int32)
        for r in np.flatnonzero(np.asarray(need)):
            ids = ep.judge(r, np.asarray(turn_ids)[r, : int(turn_len[r])], int(length[r]))
            if ids is not None:
                out[r, : len(ids)] = ids
                n[r] = len(ids)
        return (
            ep.status.copy(),
            ep.turns.copy(),
            ep.n_err.copy(),
            ep.consec_err.copy(),
            ep.forced_answer.copy(),
            out,
            n,
        )

    heads, heads_params = (None, None) if autodeco is None else autodeco
    per_device = 1 if mesh is None else mesh.shape["data"]
    fn = _scan_fn(
        type(model),
        model.config,
        T,
        cfg.chunk,
        L,
        cfg.max_turns,
        B,
        sampling,
        env_static,
        pad,
        heads,
        per_device,
    )
    call_id = next(_CALL_IDS)
    _HOSTS[call_id] = host
    try:
        rows = decode.shard_rows(
            (
                jnp.asarray(tokens),
                jnp.asarray(kind),
                jnp.zeros((B, T), jnp.float32),
                jnp.asarray(n_pending),
                jnp.asarray(pending),
                jnp.asarray(n_pending),
                jnp.asarray(forced),
                decode.row_keys(jax.random.PRNGKey(0) if rng is None else rng, B),
            ),
            mesh,
            B,
        )
        out = fn(
            decode.on_mesh(params, mesh),
            _init_cache(model, B, T, cfg.chunk, mesh),
            *rows,
            jnp.int32(call_id),
            env_arrays,
            jnp.int32(ep.limit),
            decode.on_mesh(heads_params, mesh),
            turn_text,
        )
        _, out = out
        sharding = out[0].sharding if mesh is not None else None
        out = jax.tree_util.tree_map(np.asarray, out)
    finally:
        del _HOSTS[call_id]
    toks, knd, lps, length, status, turns, n_err, forced_ans, rec, ans_span = out
    ep.status, ep.turns, ep.n_err = (np.array(a, np.int32) for a in (status, turns, n_err))
    ep.forced_answer = np.array(forced_ans, bool)
    ep.messages = [
        _rebuild_messages(tokenizer, fmt, initial[r], toks[r], ep.turns[r], *(x[r] for x in rec[:3]))
        for r in range(B)
    ]
    for r in range(B):
        if ep.status[r] == ANSWERED and ep.answers[r] is None:  # answered in the jnp judge
            lo, hi = ans_span[r]
            ep.answers[r] = tokenizer.decode(toks[r, lo:hi]).strip()
    return ep.result(
        toks,
        knd,
        lps,
        length,
        host_callbacks=calls[0],
        row_sharding=sharding,
        device_rows=[int(size) for size in rec[3] if size > 0],
    )
