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
``synth.wiki_executor(wiki)`` (``wiki_of`` recognises it) each finished turn is first judged in
jnp: ``_canonical_action`` matches the turn's bytes against the canonical forms (an ``<answer>``
with a non-blank body, or one ``<tool_call>`` whose JSON is the ``json.dumps`` form of a
``search``/``visit`` call, with plain strings), ``bytes_to_terms`` turns the query/URL/goal spans
into wiki terms, ``search_step``/``visit_step`` give the observation's piece ids, and the
pre-tokenised pieces plus the chat framing are gathered into the tokens to append; the budget,
force-answer, max-turns and status rules are the host judge's. Every other turn (malformed JSON,
escapes, other tools, ``PythonInterpreter``, several tags, a cap without a stop, special ids) goes
to the host judge through ``io_callback`` under a ``lax.cond``, so a batch of canonical turns makes
no callback at all, and the result is the same as the segmented loop's in every case (the jnp parser
only accepts what ``protocol.parse_assistant`` and ``ToolExecutor`` turn into the same answer or
observation; a fuzz test checks that). ``env="host"`` judges every turn on the host (any executor);
``"auto"`` picks ``"jnp"`` when it can. ``RolloutResult.host_callbacks`` counts the callbacks.
Messages and answers of the scan loop are rebuilt from the tokens and per-turn spans afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxllm import decode
from jaxllm.agent import protocol, tools

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

RUNNING, ANSWERED, MAX_TURNS, MAX_TOKENS, TOOL_ERROR = 0, 1, 2, 3, 4
STATUS_NAMES = {
    RUNNING: "running",
    ANSWERED: "answered",
    MAX_TURNS: "max_turns",
    MAX_TOKENS: "max_tokens",
    TOOL_ERROR: "tool_error",
}
KIND_PAD, KIND_PROMPT, KIND_MODEL, KIND_FORCED, KIND_TOOL = 0, 1, 2, 3, 4

#: Strings that end an assistant turn: the protocol's stops, and ``<|im_end|>`` (a chatml model
#: closing its own turn; the text before it is the turn).
TURN_STOPS = protocol.STOP_STRINGS + (protocol.IM_END,)


def cut_turn(text: str) -> tuple[str, str | None]:
    """The turn text the parser sees and the stop that ended it (None: no stop, e.g. the cap).

    The first of ``TURN_STOPS`` anywhere decides: ``</tool_call>`` / ``</answer>`` are kept,
    a forged ``<tool_response>`` is cut with everything after it (``protocol.truncate_at_stop``),
    ``<|im_end|>`` is cut (it is the chat template's, not the content's).
    """
    i_end = text.find(protocol.IM_END)
    kept, stop = protocol.truncate_at_stop(text)
    if i_end >= 0:
        first = min((text.find(s) for s in protocol.STOP_STRINGS if s in text), default=len(text))
        if i_end < first:
            return text[:i_end], protocol.IM_END
    return kept, stop


#: Tags the parser reads: kept in a turn's text even where a tokenizer flags them special.
_PROTOCOL_TAGS = (
    protocol.THINK_OPEN,
    protocol.THINK_CLOSE,
    protocol.TOOL_CALL_OPEN,
    protocol.TOOL_CALL_CLOSE,
    protocol.ANSWER_OPEN,
    protocol.ANSWER_CLOSE,
    protocol.TOOL_RESPONSE_OPEN,
    protocol.TOOL_RESPONSE_CLOSE,
    protocol.CODE_OPEN,
    protocol.CODE_CLOSE,
)


def decode_turn(tokenizer, ids) -> str:
    """The text of a turn's ids as the parser should see it.

    A tokenizer without ``special_ids`` (the byte tokenizer) decodes as usual. A Hugging Face one
    (``PretrainedTokenizer``) drops its special ids (``<|im_start|>``, ``<|endoftext|>``...) but
    keeps the protocol's tags even where the folder flags them special, and drops ids past its
    vocabulary (a model's embedding is padded beyond it: Qwen3's 151936 rows for 151669 tokens,
    and a model can sample those ids), as the byte tokenizer does.
    """
    special = getattr(tokenizer, "special_ids", None)
    if special is None:
        return tokenizer.decode(np.asarray(ids, np.int32))
    added = getattr(tokenizer, "added_tokens", {})
    drop = set(special) - {added[t] for t in _PROTOCOL_TAGS if t in added}
    keep = [int(i) for i in ids if 0 <= int(i) < tokenizer.vocab_size and int(i) not in drop]
    return tokenizer.decode(keep, skip_special_tokens=False)


def cut_turn_ids(tokenizer, ids) -> tuple[str, str | None]:
    """``cut_turn`` of a turn's ids, where a stop id of the tokenizer (``stop_ids``:
    ``<|im_end|>``, eos) also ends the turn: its text is what precedes the first stop id, cut by
    ``cut_turn`` (a stop string before it wins), and the stop is that token (``<|im_end|>``:
    the model closed its turn). Tokenizers without ``stop_ids`` give ``cut_turn(decode(ids))``.
    """
    stops = {int(i) for i in getattr(tokenizer, "stop_ids", ())}
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    k = next((j for j, i in enumerate(ids) if i in stops), len(ids))
    text, stop = cut_turn(decode_turn(tokenizer, ids[:k]))
    if stop is None and k < len(ids):
        return text, tokenizer.id_to_token(ids[k])
    return text, stop


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """max_turns: assistant turns per row. turn_tokens: tokens per turn at most.
    token_budget: tokens per row at most, prompt included (also the cache capacity).
    chunk: tokens per prefill call when appending prompts and observations.
    max_tool_errors: stop a row with TOOL_ERROR after this many error observations in a row
    (None: never; errors are observations the model can react to)."""

    max_turns: int = 8
    turn_tokens: int = 256
    token_budget: int = 8192
    chunk: int = 32
    max_tool_errors: int | None = None

    def __post_init__(self):
        for f in ("max_turns", "turn_tokens", "token_budget", "chunk"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RolloutConfig.{f} must be an int >= 1, got {v!r}")
        v = self.max_tool_errors
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"RolloutConfig.max_tool_errors must be None or an int >= 1, got {v!r}")


@dataclasses.dataclass
class RolloutResult:
    tokens: np.ndarray  # [B, token_budget] int32, pad_id after `lengths`
    kind: np.ndarray  # [B, token_budget] int8, KIND_*
    logprobs: np.ndarray  # [B, token_budget] float32, log p of sampled tokens (else 0)
    lengths: np.ndarray  # [B] int32
    status: np.ndarray  # [B] int32, ANSWERED | MAX_TURNS | MAX_TOKENS | TOOL_ERROR
    turns: np.ndarray  # [B] int32, assistant turns taken
    tool_errors: np.ndarray  # [B] int32, error observations received
    forced_answer: np.ndarray  # [B] bool, the budget forced a final-answer turn
    answers: list  # [B] answer text or None
    messages: list  # [B] chat messages (system, question, turns)
    host_callbacks: int | None = None  # scan_rollout: io_callback calls made (None: segmented)

    @property
    def model_mask(self) -> np.ndarray:
        """Tokens the model sampled (the RL loss mask)."""
        return self.kind == KIND_MODEL

    @property
    def assistant_mask(self) -> np.ndarray:
        """Tokens of assistant turns, sampled or forced."""
        return (self.kind == KIND_MODEL) | (self.kind == KIND_FORCED)

    @property
    def tool_mask(self) -> np.ndarray:
        """Observation tokens and the chat framing the environment added."""
        return self.kind == KIND_TOOL

    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(s)] for s in self.status]


# ------------------------------------------------------------------------------------------
# Compiled pieces: one batched cache, the inference engine's append and pick
# ------------------------------------------------------------------------------------------


def _init_cache(model, B, T, C):
    """One cache for every row. Appends are padded to at most C tokens past a row's end.
    Built under jit so that every leaf is its own buffer (the steps donate the cache)."""
    return jax.jit(lambda: model.init_cache(B, T + C))()


def _choose(last, keys, forced_R, *, sampling, heads, heads_params):
    """The next token of every row (the engine's `pick`; a forced id wins), its log-probability
    under the raw logits, and the row keys to use next."""
    logits_RV, hidden_RD = last
    keys, draw = decode.split_rows(keys)
    tok = decode.pick(logits_RV, hidden_RD, draw, sampling=sampling, heads=heads, heads_params=heads_params)
    tok = jnp.where(forced_R >= 0, forced_R, tok)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_RV, axis=-1), tok[:, None], -1)[:, 0]
    return tok, logp, keys


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

    def step(params, cache, last, forced_R, active_R, keys, heads_params):
        tok, logp, keys = _choose(
            last, keys, forced_R, sampling=sampling, heads=heads, heads_params=heads_params
        )
        cache, logits, hidden = decode.append_tokens(
            model, params, cache, tok[:, None], active_R.astype(jnp.int32), *last
        )
        return tok, logp, cache, (logits, hidden), keys

    return jax.jit(step, donate_argnums=(1, 2))


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def _framing(observation_content: str, model_closed_turn: bool) -> str:
    """Chatml text between an assistant turn's content and the next assistant turn's content
    (the scan loop's framing; the segmented loop asks its ``ChatFormat``)."""
    return protocol.CHATML.user_turn(observation_content, model_closed_turn)


class _Episodes:
    """Host-side bookkeeping shared by both loops: parse a finished turn, run the tool, decide the
    row's status and the tokens to append (observation or forced-answer message)."""

    def __init__(self, B, cfg, executor, tokenizer, messages, limit, fmt=protocol.CHATML):
        self.cfg, self.executor, self.tokenizer, self.limit = cfg, executor, tokenizer, limit
        self.fmt = fmt
        self.messages = messages
        self.status = np.full((B,), RUNNING, np.int32)
        self.turns = np.zeros((B,), np.int32)
        self.n_err = np.zeros((B,), np.int32)
        self.consec_err = np.zeros((B,), np.int32)
        self.forced_answer = np.zeros((B,), bool)
        self.answers: list = [None] * B

    def enc(self, text):
        return np.asarray(self.tokenizer.encode(text), np.int32)

    def judge(self, r, gen_ids, length_r):
        """After row r's turn (its tokens ``gen_ids``, the row now ``length_r`` long): the ids to
        append, or None when the row has ended."""
        cfg = self.cfg
        self.turns[r] += 1
        text, stop = cut_turn_ids(self.tokenizer, gen_ids)
        if self.messages is not None:  # scan_rollout rebuilds the messages from the tokens
            self.messages[r].append({"role": "assistant", "content": text})
        action = protocol.parse_assistant(text)
        if isinstance(action, protocol.Answer):
            self.status[r], self.answers[r] = ANSWERED, action.text
            return None
        if self.forced_answer[r]:
            self.status[r] = MAX_TOKENS
            return None
        obs = self.executor.execute(action)
        if obs.error:
            self.n_err[r] += 1
            self.consec_err[r] += 1
        else:
            self.consec_err[r] = 0
        if cfg.max_tool_errors is not None and self.consec_err[r] >= cfg.max_tool_errors:
            self.status[r] = TOOL_ERROR
            return None
        if self.turns[r] >= cfg.max_turns:
            self.status[r] = MAX_TURNS
            return None
        closed = stop == protocol.IM_END
        content = protocol.wrap_tool_response(obs.text)
        ids = self.enc(self.fmt.user_turn(content, closed))
        if length_r + len(ids) + cfg.turn_tokens > self.limit:
            content = protocol.FORCE_ANSWER
            ids = self.enc(self.fmt.forced_answer(closed))
            self.forced_answer[r] = True
        if self.messages is not None:
            self.messages[r].append({"role": "user", "content": content})
        return ids

    def result(self, tokens, kind, logprobs, length, host_callbacks=None):
        return RolloutResult(
            tokens=tokens,
            kind=kind,
            logprobs=logprobs,
            lengths=length,
            status=self.status,
            turns=self.turns,
            tool_errors=self.n_err,
            forced_answer=self.forced_answer,
            answers=self.answers,
            messages=self.messages,
            host_callbacks=host_callbacks,
        )


def _prepare(
    model,
    tokenizer,
    executor,
    questions,
    cfg,
    system_prompt,
    sampling,
    rng,
    forced_turns,
    who,
    fmt=None,
    autodeco=None,
):
    """Validate the arguments; returns (prompts, forced_ids, episodes)."""
    from jaxllm.agent import synth

    questions = list(questions)
    B = len(questions)
    if B == 0:
        raise ValueError(f"{who}: no questions")
    fmt = protocol.CHATML if fmt is None else fmt
    if not isinstance(fmt, protocol.ChatFormat):
        raise ValueError(f"{who}: chat_format must be a protocol.ChatFormat, got {type(fmt).__name__}")
    if not isinstance(executor, tools.ToolExecutor):
        raise ValueError(f"{who}: executor must be a tools.ToolExecutor, got {type(executor).__name__}")
    if sampling is not None:
        if sampling.presence_penalty != 0 or sampling.repetition_penalty != 1:
            raise ValueError(
                f"{who}: presence/repetition penalties are not applied in rollouts (they would need "
                f"each row's earlier turns); got {sampling}"
            )
        if rng is None:
            raise ValueError(f"{who}: sampling needs an `rng` key")
    if (autodeco is not None) != (sampling is not None and sampling.mode == "autodeco"):
        raise ValueError(f"{who}: AutoDeco heads (autodeco=) and SamplingConfig(mode='autodeco') go together")
    if forced_turns is not None:
        if len(forced_turns) != B or any(isinstance(f, str) for f in forced_turns):
            raise ValueError(
                f"{who}: forced_turns must hold one list of turn texts per "
                f"question ({B}), got {len(forced_turns)} entries"
            )
        forced_ids = [[np.asarray(tokenizer.encode(t), np.int32) for t in row] for row in forced_turns]
    else:
        forced_ids = [[] for _ in range(B)]
    if system_prompt is None:
        system_prompt = protocol.build_system_prompt(executor.tool_specs(), date=synth.SYNTH_DATE)
    vocab = model.config.vocab_size
    messages = [protocol.initial_messages(q, system_prompt) for q in questions]
    enc = lambda text: np.asarray(tokenizer.encode(text), np.int32)  # noqa: E731
    prompts = [enc(fmt.prompt(m)) for m in messages]
    force_len = len(enc(fmt.forced_answer(False)))
    reserve = force_len + cfg.turn_tokens  # room a forced final turn needs
    limit = cfg.token_budget - reserve  # a normal turn must end by here
    for r, p in enumerate(prompts):
        if len(p) + cfg.turn_tokens > limit:
            raise ValueError(
                f"{who}: token_budget {cfg.token_budget} is too small for row {r}: the "
                f"prompt has {len(p)} tokens, a turn up to {cfg.turn_tokens}, and {reserve} must "
                f"stay free for a forced final answer (turn_tokens + {force_len})"
            )
    for r, row in enumerate(forced_ids):
        for i, ids in enumerate(row):
            if len(ids) > cfg.turn_tokens:
                raise ValueError(
                    f"{who}: forced_turns[{r}][{i}] has {len(ids)} tokens, "
                    f"more than turn_tokens={cfg.turn_tokens}"
                )
    for ids in prompts + [i for row in forced_ids for i in row]:
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"{who}: the tokenizer gives ids outside the model's vocabulary [0, {vocab})")
    return prompts, forced_ids, _Episodes(B, cfg, executor, tokenizer, messages, limit, fmt)


def segmented_rollout(
    model,
    params,
    tokenizer,
    executor: tools.ToolExecutor,
    questions: Sequence[str],
    *,
    config: RolloutConfig = RolloutConfig(),
    system_prompt: str | None = None,
    sampling=None,
    rng=None,
    forced_turns: Sequence[Sequence[str]] | None = None,
    chat_format: protocol.ChatFormat | None = None,
    autodeco=None,
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
      sampling: None for greedy, else a ``SamplingConfig`` (any mode, no penalties) with ``rng``
        (one key, split per row, or one key per row).
      autodeco: ``(heads_module, heads_params)`` for ``SamplingConfig(mode="autodeco")``: the
        heads read each row's last hidden state and logits (see ``jaxllm.decode.pick``).
      forced_turns: optional, per row a list of texts; turn i of that row starts with the tokens
        of ``forced_turns[row][i]`` (written, not sampled: ``KIND_FORCED``) and the model
        continues from there unless a stop string is already complete. For scripted episodes,
        replaying demonstrations, or forcing a ``<think>\\n`` prefix.
      chat_format: ``protocol.CHATML`` (None) or ``protocol.Qwen3Format(...)``: how the prompt,
        observations and the forced-answer message are framed.
    """
    cfg = config
    prompts, forced_ids, ep = _prepare(
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
    cache = _init_cache(model, B, T, C)
    last = decode.empty_last(model, B)
    heads, heads_params = (None, None) if autodeco is None else autodeco
    feed = _feed_fn(type(model), mcfg)
    step = _step_fn(type(model), mcfg, sampling, heads)
    keys = decode.row_keys(jax.random.PRNGKey(0) if rng is None else rng, B)

    def feed_rows(pending):
        """Append each row's pending ids in chunks of at most C (rows with none are left alone)."""
        nonlocal cache, last
        longest = max(len(p) for p in pending)
        for j in range(0, longest, C):
            parts = [p[j : j + C] for p in pending]
            width = min(C, decode.prompt_bucket(max(len(x) for x in parts), C))  # few shapes
            toks = np.full((B, width), pad, np.int32)
            for r, x in enumerate(parts):
                toks[r, : len(x)] = x
            n = np.array([len(x) for x in parts], np.int32)
            cache, last = feed(params, cache, last, jnp.asarray(toks), jnp.asarray(n))

    pending = []
    for r, p in enumerate(prompts):
        push(r, p, KIND_PROMPT)
        pending.append(p)
    while (ep.status == RUNNING).any():
        feed_rows(pending)
        running = ep.status == RUNNING
        gen: list[list[int]] = [[] for _ in range(B)]
        generating = running.copy()
        while generating.any():
            forced = np.full((B,), -1, np.int32)
            for r in np.flatnonzero(generating):
                t = ep.turns[r]
                script = forced_ids[r][t] if t < len(forced_ids[r]) else ()
                if len(gen[r]) < len(script):
                    forced[r] = script[len(gen[r])]
            tok, lp, cache, last, keys = step(
                params, cache, last, jnp.asarray(forced), jnp.asarray(generating), keys, heads_params
            )
            tok, lp = np.asarray(tok), np.asarray(lp)
            for r in np.flatnonzero(generating):
                gen[r].append(int(tok[r]))
                was_forced = forced[r] >= 0
                push(r, [tok[r]], KIND_FORCED if was_forced else KIND_MODEL, None if was_forced else [lp[r]])
                _, stop = cut_turn_ids(tokenizer, gen[r])
                if stop is not None or len(gen[r]) >= cfg.turn_tokens:
                    generating[r] = False
        pending = [np.zeros((0,), np.int32) for _ in range(B)]
        for r in np.flatnonzero(running):
            ids = ep.judge(r, gen[r], length[r])
            if ids is not None:
                push(r, ids, KIND_TOOL)
                pending[r] = ids
    return ep.result(tokens, kind, logprobs, length)


# ------------------------------------------------------------------------------------------
# The simulated wiki's environment step in jnp (for scan_rollout)
# ------------------------------------------------------------------------------------------

ENVS = ("auto", "jnp", "host")
_A_NONE, _A_ANSWER, _A_SEARCH, _A_VISIT = 0, 1, 2, 3
_WS_JSON = (9, 10, 13, 32)  # JSON whitespace; also stripped by str.strip
_WS_LEAD = (9, 10, 11, 12, 13, 32)  # ASCII whitespace that str.lstrip removes before <think>
#: skeletons of the canonical calls (``json.dumps`` of ``render_tool_call``, string contents
#: removed): name, tool, "arguments", then the argument object; [LIST] is ``""(, "")*``
_CALL_HEAD = '{"": "", "": {"": '
_PERIOD = '"", '


def _b(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32)


def wiki_of(executor) -> "object | None":
    """The ``SimulatedWiki`` behind ``executor`` when the jnp environment step reproduces its
    ``search``/``visit`` exactly (a plain ``tools.ToolExecutor`` whose search and visit backends
    are the wiki's ``WikiTool``s with the released schemas), else None."""
    from jaxllm.agent import wiki as wk

    if (
        not isinstance(executor, tools.ToolExecutor)
        or type(executor).execute is not tools.ToolExecutor.execute
    ):
        return None
    s, v = executor.backends.get("search"), executor.backends.get("visit")
    if not (
        isinstance(s, wk.WikiTool)
        and isinstance(v, wk.WikiTool)
        and s.wiki is v.wiki
        and s.name == "search"
        and v.name == "visit"
        and type(s) is wk.WikiTool
        and type(v) is wk.WikiTool
    ):
        return None
    if executor.specs.get("search") != tools.SEARCH or executor.specs.get("visit") != tools.VISIT:
        return None
    w = s.wiki
    methods = ("search", "visit", "join", "search_ids", "visit_ids", "encode", "_encode_many")
    if any(getattr(type(w), m) is not getattr(wk.SimulatedWiki, m) for m in methods):
        return None
    if any("<" in p for p in w.pieces):  # wrap_tool_response would escape tags: keep it on the host
        return None
    return w


class _EnvArrays(NamedTuple):
    """Device arrays of the jnp wiki environment (a jit argument)."""

    wiki: object  # wiki.WikiArrays
    hashes_2V: jax.Array  # term hashes for bytes_to_terms
    piece_flat: jax.Array  # tokens of all pieces, concatenated
    piece_start: jax.Array  # [P + 3]
    piece_len: jax.Array  # [P + 3]


@dataclasses.dataclass(frozen=True)
class _EnvStatic:
    """Static side of the jnp wiki environment (part of the compiled program's key)."""

    layout: object  # wiki.PieceLayout
    n_terms: int  # terms kept per query / URL / goal (SimulatedWiki.max_terms)
    cap: int  # executor.max_observation_chars
    prefix_len: int
    suffix_len: int

    @property
    def prefix(self):  # piece ids of the framing around an observation, and the force message
        return self.layout.size

    @property
    def suffix(self):
        return self.layout.size + 1

    @property
    def force(self):
        return self.layout.size + 2


def _wiki_env(wiki, tokenizer, executor):
    """Piece tokens (the wiki's pieces, then the chat framing before and after a tool response
    and the framed force-answer message) as device arrays, and the static side."""
    head = f"{protocol.IM_END}\n{protocol.IM_START}user\n{protocol.TOOL_RESPONSE_OPEN}\n"
    tail = f"\n{protocol.TOOL_RESPONSE_CLOSE}{protocol.IM_END}\n{protocol.IM_START}assistant\n"
    assert _framing(protocol.wrap_tool_response("x"), False) == head + "x" + tail
    texts = list(wiki.pieces) + [head, tail, _framing(protocol.FORCE_ANSWER, False)]
    toks = [np.asarray(tokenizer.encode(t), np.int32) for t in texts]
    lens = np.array([len(t) for t in toks], np.int32)
    start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    flat = np.concatenate(toks + [np.zeros((1,), np.int32)])
    arrays = _EnvArrays(
        wiki._arrays,
        jnp.asarray(wiki.term_hashes_2V),
        jnp.asarray(flat),
        jnp.asarray(start),
        jnp.asarray(lens),
    )
    static = _EnvStatic(
        wiki.layout, int(wiki.max_terms), int(executor.max_observation_chars), int(lens[-3]), int(lens[-2])
    )
    return arrays, static


class _Action(NamedTuple):
    kind: jax.Array  # _A_*
    ans_lo: jax.Array  # answer body span in the turn
    ans_hi: jax.Array
    q_terms: jax.Array  # [Q, n_terms] search queries
    q_mask: jax.Array
    q_valid: jax.Array  # [Q]
    q_more: jax.Array
    u_terms: jax.Array  # [U, n_terms] visit URLs
    u_mask: jax.Array
    u_valid: jax.Array  # [U]
    u_more: jax.Array
    g_terms: jax.Array  # [n_terms] visit goal
    g_mask: jax.Array


def _canonical_action(tok_L, n, hashes_2V, *, Q: int, U: int, n_terms: int) -> _Action:
    """One turn's byte tokens (``n`` of them) as a canonical action, in jnp.

    Accepted (``kind != _A_NONE``) are only turns that ``protocol.parse_assistant`` parses into
    an ``Answer`` with a non-blank body, or a ``search``/``visit`` ``ToolCall`` that
    ``ToolExecutor`` validates and runs: no special ids; optional leading ASCII whitespace and
    one ``<think>...</think>``; any prose; the action last, ending the turn. A call's body must be
    the ``json.dumps`` form (``", "`` and ``": "`` separators, keys name/arguments, then
    query | url,goal | goal,url) with plain strings (no escapes, no control characters). Everything
    else (malformed or odd JSON, other tools, ``<code>``, several tags) is left to the host
    judge, which gives the same result as always.
    """
    from jaxllm.agent.wiki import bytes_to_terms
    from jaxllm.data.tokenizers import ByteTokenizer

    L = tok_L.shape[0]
    PADW = 64
    pos = jnp.arange(L)
    inside = pos < n
    b = jnp.where(inside, tok_L - ByteTokenizer.offset, -1)
    plain = (~inside | ((tok_L >= ByteTokenizer.offset) & (tok_L < ByteTokenizer.vocab_size))).all()
    bp = jnp.concatenate([b, jnp.full((PADW,), -1, b.dtype)])

    def occ(s):
        p = _b(s)
        hit = inside & (pos + len(p) <= n)
        for j, c in enumerate(p):
            hit &= bp[j : j + L] == c
        return hit

    def at(arr_p, i, s):
        p = _b(s)
        got = jax.lax.dynamic_slice(arr_p, (jnp.clip(i, 0, L),), (len(p),))
        return (got == p).all() & (i >= 0)

    def isin(x, vals):
        return functools.reduce(jnp.logical_or, [x == v for v in vals])

    o_think, c_think = occ(protocol.THINK_OPEN), occ(protocol.THINK_CLOSE)
    n_ot, n_ct = o_think.sum(), c_think.sum()
    p0, p1 = jnp.argmax(o_think), jnp.argmax(c_think)
    think_a = (n_ot == 0) & (n_ct == 0)
    think_b = (
        (n_ot == 1)
        & (n_ct == 1)
        & (isin(b, _WS_LEAD) | (pos >= p0)).all()
        & (p1 >= p0 + len(protocol.THINK_OPEN))
    )
    act_min = jnp.where(think_b, p1 + len(protocol.THINK_CLOSE), 0)
    o_call, o_ans = occ(protocol.TOOL_CALL_OPEN), occ(protocol.ANSWER_OPEN)
    n_call, n_ans = o_call.sum(), o_ans.sum()
    c0, a0 = jnp.argmax(o_call), jnp.argmax(o_ans)
    n_ccall, n_cans = occ(protocol.TOOL_CALL_CLOSE).sum(), occ(protocol.ANSWER_CLOSE).sum()
    others = (
        occ(protocol.TOOL_RESPONSE_OPEN).any()
        | occ(protocol.IM_END).any()
        | occ(protocol.CODE_OPEN).any()
        | occ(protocol.CODE_CLOSE).any()
    )
    base = plain & (think_a | think_b) & ~others
    # an answer: <answer> once, after the thinking, </answer> once, ending the turn
    e_ans = n - len(protocol.ANSWER_CLOSE)
    lo_a = a0 + len(protocol.ANSWER_OPEN)
    is_ans = (
        base
        & at(bp, e_ans, protocol.ANSWER_CLOSE)
        & (n_ans == 1)
        & (n_cans == 1)
        & (n_call == 0)
        & (n_ccall == 0)
        & (a0 >= act_min)
        & (e_ans >= lo_a)
    )
    is_ans &= ((pos >= lo_a) & (pos < e_ans) & (b >= 0x21) & (b <= 0x7E)).any()  # strip() != ""
    # a tool call: <tool_call> once, after the thinking, </tool_call> once, ending the turn
    e_call = n - len(protocol.TOOL_CALL_CLOSE)
    lo_c = c0 + len(protocol.TOOL_CALL_OPEN)
    is_call = (
        base
        & at(bp, e_call, protocol.TOOL_CALL_CLOSE)
        & (n_call == 1)
        & (n_ccall == 1)
        & (n_ans == 0)
        & (n_cans == 0)
        & (c0 >= act_min)
        & (e_call >= lo_c)
    )
    in_body = (pos >= lo_c) & (pos < e_call)
    solid = in_body & ~isin(b, _WS_JSON)
    bs = jnp.argmax(solid)
    be = L - jnp.argmax(solid[::-1])
    region = (pos >= bs) & (pos < be) & solid.any()
    quote = region & (b == 34)
    content = region & ~quote & ((jnp.cumsum(quote) - quote) % 2 == 1)
    is_call &= ~(content & (b < 32)).any() & ~(region & (b == 92)).any()
    keep = region & ~content
    m = keep.sum()
    skel = jnp.where(pos < m, b[jnp.argsort(~keep, stable=True)], -1)
    sp = jnp.concatenate([skel, jnp.full((PADW,), -1, skel.dtype)])
    qpos = jnp.argsort(~quote, stable=True)
    n_q = quote.sum()

    def span(j):
        j = jnp.asarray(j)
        return (qpos[jnp.clip(2 * j, 0, L - 1)] + 1, qpos[jnp.clip(2 * j + 1, 0, L - 1)], 2 * j + 1 < n_q)

    def str_is(j, lit):
        lo, hi, ok = span(j)
        return ok & (hi - lo == len(_b(lit))) & at(bp, lo, lit)

    def template(head, tail, listed):
        hp, tp = _b(head), _b(tail)
        mm = m - len(hp) - len(tp)
        ok = (sp[: len(hp)] == hp).all() & (mm >= 0)
        if len(tp):
            ok &= (jax.lax.dynamic_slice(sp, (jnp.clip(m - len(tp), 0, L),), (len(tp),)) == tp).all()
        if not listed:
            return ok & (mm == 0), jnp.int32(1)
        j = pos - len(hp)
        per = jnp.asarray(_b(_PERIOD))[j % 4]
        ok &= ((j < 0) | (j >= mm) | (skel == per)).all() & (mm >= 2) & (mm % 4 == 2)
        return ok, (mm + 2) // 4

    common = is_call & str_is(0, "name") & str_is(2, "arguments")
    f_s, k_s = template(_CALL_HEAD + "[", "]}}", True)
    f_v1, _ = template(_CALL_HEAD + '"", "": ""}}', "", False)
    f_vug, k_ug = template(_CALL_HEAD + "[", '], "": ""}}', True)
    f_vgu, k_gu = template(_CALL_HEAD + '"", "": [', "]}}", True)
    search = common & str_is(1, "search") & f_s & str_is(3, "query")
    vis = common & str_is(1, "visit")
    v1_ug = vis & f_v1 & str_is(3, "url") & str_is(5, "goal")
    v1_gu = vis & f_v1 & str_is(3, "goal") & str_is(5, "url")
    vl_ug = vis & f_vug & str_is(3, "url") & str_is(4 + k_ug, "goal")
    vl_gu = vis & f_vgu & str_is(3, "goal") & str_is(5, "url")
    visit = v1_ug | v1_gu | vl_ug | vl_gu
    url0 = jnp.where(v1_ug | vl_ug, 4, 6)
    n_url = jnp.where(vl_ug, k_ug, jnp.where(vl_gu, k_gu, 1))
    goal_j = jnp.where(v1_ug, 6, jnp.where(vl_ug, 5 + k_ug, 4))

    bb = jnp.clip(b, 0, 255)

    def terms_of(j, valid):
        lo, hi, _ = span(j)
        return bytes_to_terms(hashes_2V, bb, (pos >= lo) & (pos < hi) & valid, max_terms=n_terms)

    qv = search & (jnp.arange(Q) < k_s)
    q_terms, q_mask = jax.vmap(terms_of)(4 + jnp.arange(Q), qv)
    uv = visit & (jnp.arange(U) < n_url)
    u_terms, u_mask = jax.vmap(terms_of)(url0 + jnp.arange(U), uv)
    g_terms, g_mask = terms_of(goal_j, visit)
    kind = jnp.where(is_ans, _A_ANSWER, jnp.where(search, _A_SEARCH, jnp.where(visit, _A_VISIT, _A_NONE)))
    return _Action(
        kind.astype(jnp.int32),
        lo_a,
        e_ans,
        q_terms,
        q_mask,
        qv,
        search & (k_s > Q),
        u_terms,
        u_mask,
        uv,
        visit & (n_url > U),
        g_terms,
        g_mask,
    )


def _gather_pieces(env: _EnvArrays, ids_BP, T: int, pad: int):
    """Tokens ``[B, T]`` of each row's piece ids (-1: none) and their total lengths ``[B]``."""
    n_p = env.piece_len.shape[0]
    lens = jnp.where(ids_BP >= 0, env.piece_len[jnp.clip(ids_BP, 0, n_p - 1)], 0)
    cum = jnp.cumsum(lens, axis=-1)
    t = jnp.arange(T)
    j = jax.vmap(lambda c: jnp.searchsorted(c, t, side="right"))(cum)  # piece holding t
    j = jnp.clip(j, 0, ids_BP.shape[1] - 1)
    off = t[None] - (jnp.take_along_axis(cum, j, -1) - jnp.take_along_axis(lens, j, -1))
    pid = jnp.clip(jnp.take_along_axis(ids_BP, j, -1), 0, n_p - 1)
    src = jnp.clip(env.piece_start[pid] + off, 0, env.piece_flat.shape[0] - 1)
    total = cum[:, -1]
    return jnp.where(t[None] < total[:, None], env.piece_flat[src], pad), total


def _jnp_judge(
    env: _EnvArrays,
    st: _EnvStatic,
    turn_ids,
    turn_len,
    length,
    running,
    status,
    turns,
    consec,
    forced,
    limit,
    *,
    T: int,
    L: int,
    max_turns: int,
    pad: int,
):
    """``_Episodes.judge`` for canonical turns (see ``_canonical_action``) on the simulated
    wiki: ``search_step``/``visit_step`` and the piece tokens of their observation, the chat
    framing, the budget and status rules. Returns ``ok`` (rows it judged) and their new state."""
    from jaxllm.agent.wiki import search_step, visit_step

    lay = st.layout
    act = jax.vmap(
        functools.partial(_canonical_action, Q=lay.max_queries, U=lay.max_urls, n_terms=st.n_terms),
        in_axes=(0, 0, None),
    )(turn_ids, turn_len, env.hashes_2V)
    s_ids = jax.vmap(lambda q, m, v, more: search_step(env.wiki, q, m, v, more, layout=lay))(
        act.q_terms, act.q_mask, act.q_valid, act.q_more
    )
    v_ids = jax.vmap(lambda u, um, uv, g, gm, more: visit_step(env.wiki, u, um, uv, g, gm, more, layout=lay))(
        act.u_terms, act.u_mask, act.u_valid, act.g_terms, act.g_mask, act.u_more
    )
    W = max(s_ids.shape[1], v_ids.shape[1])
    padw = lambda x: jnp.pad(x, ((0, 0), (0, W - x.shape[1])), constant_values=-1)  # noqa: E731
    obs = jnp.where((act.kind == _A_SEARCH)[:, None], padw(s_ids), padw(v_ids))
    B = turn_ids.shape[0]
    row = jnp.concatenate([jnp.full((B, 1), st.prefix), obs, jnp.full((B, 1), st.suffix)], 1)
    n_p = env.piece_len.shape[0]
    total = jnp.where(row >= 0, env.piece_len[jnp.clip(row, 0, n_p - 1)], 0).sum(-1)
    is_ans = act.kind == _A_ANSWER
    is_call = (act.kind == _A_SEARCH) | (act.kind == _A_VISIT)
    too_long = is_call & ~forced & (total - st.prefix_len - st.suffix_len > st.cap)
    ok = running & (act.kind != _A_NONE) & ~too_long
    turns1 = turns + 1
    new_status = jnp.where(
        is_ans, ANSWERED, jnp.where(forced, MAX_TOKENS, jnp.where(turns1 >= max_turns, MAX_TURNS, RUNNING))
    )
    consec1 = jnp.where(is_call & ~forced, 0, consec)
    emit = is_call & ~forced & (turns1 < max_turns)
    force = length + total + L > limit
    force_row = jnp.full_like(row, -1).at[:, 0].set(st.force)
    row = jnp.where(force[:, None], force_row, row)
    pending, n_pending = _gather_pieces(env, row, T, pad)
    return (
        ok,
        new_status.astype(jnp.int32),
        turns1,
        consec1,
        forced | (emit & force),
        pending,
        jnp.where(emit, n_pending, 0).astype(jnp.int32),
        is_ans,
        act.ans_lo,
        act.ans_hi,
    )


# ------------------------------------------------------------------------------------------
# The compiled loop: lax.scan over turns; jnp wiki step, io_callback to the host judge
# ------------------------------------------------------------------------------------------


def _stop_patterns(tokenizer):
    """Stop strings as byte-token rows (-1 padded on the left) for the jnp tail match."""
    pats = [np.asarray(tokenizer.encode(s), np.int32) for s in TURN_STOPS]
    k = max(len(p) for p in pats)
    out = np.full((len(pats), k), -1, np.int32)
    for i, p in enumerate(pats):
        out[i, k - len(p) :] = p
    return out, np.array([len(p) for p in pats], np.int32)


_HOSTS: dict = {}  # call id -> the host judge of a running scan_rollout
_CALL_IDS = itertools.count()


def _host_trampoline(call_id, *args):
    return _HOSTS[int(call_id)](*args)


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
    env_static: _EnvStatic | None = None,
    pad: int = 0,
    heads=None,
):
    """The jitted scan rollout (byte tokenizer). Per turn, rows the jnp wiki judge does not take
    (all rows without ``env_static``) go through one io_callback to the host judge of the call
    named by ``call_id``, under a ``lax.cond`` (no callback when there are none)."""
    from jaxllm.data.tokenizers import ByteTokenizer

    model = model_cls(config)
    pats, lens = _stop_patterns(ByteTokenizer())
    stop_pats, stop_lens, special_below = jnp.asarray(pats), jnp.asarray(lens), ByteTokenizer.offset
    K = stop_pats.shape[1]
    row_idx = jnp.arange(B)

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
    ):
        zB = jnp.zeros((B,), jnp.int32)
        zBN = jnp.zeros((B, max_turns), jnp.int32)

        def turn(carry, n):
            (
                cache,
                last,
                tokens,
                kind,
                logprobs,
                length,
                pending,
                n_pending,
                status,
                turns,
                n_err,
                consec,
                forced_ans,
                rec,
                ans_span,
                keys,
            ) = carry
            running = status == RUNNING
            cache, last = feed_pending(params, cache, last, pending, n_pending, running)
            forced_BL = jax.lax.dynamic_index_in_dim(forced_BNL, n, axis=1, keepdims=False)
            start = length

            def dec_body(c):
                (
                    cache,
                    last,
                    tokens,
                    kind,
                    logprobs,
                    length,
                    turn_ids,
                    turn_len,
                    text,
                    text_len,
                    gen,
                    keys,
                ) = c
                forced = jnp.where(turn_len < L, forced_BL[row_idx, jnp.clip(turn_len, 0, L - 1)], -1)
                tok, lp, keys = _choose(
                    last, keys, forced, sampling=sampling, heads=heads, heads_params=heads_params
                )
                cache, logits, hidden = decode.append_tokens(
                    model, params, cache, tok[:, None], gen.astype(jnp.int32), *last
                )
                last = (logits, hidden)
                one = gen.astype(jnp.int32)
                tokens = write(tokens, length, tok[:, None], one)
                kind = write(kind, length, jnp.where(forced >= 0, KIND_FORCED, KIND_MODEL)[:, None], one)
                logprobs = write(logprobs, length, jnp.where(forced >= 0, 0.0, lp)[:, None], one)
                length = length + one
                turn_ids = turn_ids.at[row_idx, jnp.clip(turn_len, 0, L - 1)].set(
                    jnp.where(gen, tok, turn_ids[row_idx, jnp.clip(turn_len, 0, L - 1)])
                )
                turn_len = turn_len + one
                # decoded text drops special ids (and ids past the byte vocabulary, which a model
                # with a larger vocab can sample): match stops on the text bytes only
                is_text = gen & (tok >= special_below) & (tok < ByteTokenizer.vocab_size)
                text = jnp.where(is_text[:, None], jnp.concatenate([text[:, 1:], tok[:, None]], 1), text)
                text_len = text_len + is_text.astype(jnp.int32)
                tail_ok = ((text[:, None, :] == stop_pats[None]) | (stop_pats[None] < 0)).all(-1)
                hit = (tail_ok & (text_len[:, None] >= stop_lens[None])).any(-1) & is_text
                gen = gen & ~hit & (turn_len < L)
                return (
                    cache,
                    last,
                    tokens,
                    kind,
                    logprobs,
                    length,
                    turn_ids,
                    turn_len,
                    text,
                    text_len,
                    gen,
                    keys,
                )

            init = (
                cache,
                last,
                tokens,
                kind,
                logprobs,
                length,
                jnp.zeros((B, L), jnp.int32),
                zB,
                jnp.full((B, K), -1, jnp.int32),
                zB,
                running,
                keys,
            )
            (cache, last, tokens, kind, logprobs, length, turn_ids, turn_len, _, _, _, keys) = (
                jax.lax.while_loop(lambda c: c[-2].any(), dec_body, init)
            )

            state = (status, turns, n_err, consec, forced_ans)
            if env_static is not None:
                (ok, j_status, j_turns, j_consec, j_forced, j_pending, j_n, j_ans, a_lo, a_hi) = _jnp_judge(
                    env,
                    env_static,
                    turn_ids,
                    turn_len,
                    length,
                    running,
                    *state[:2],
                    consec,
                    forced_ans,
                    limit,
                    T=T,
                    L=L,
                    max_turns=max_turns,
                    pad=pad,
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
                    turn_ids,
                    turn_len,
                    length,
                    need_host,
                    *state,
                    ordered=True,
                ),
                lambda: (*state, jnp.full((B, T), pad, jnp.int32), zB),
            )
            h_status, h_turns, h_err, h_consec, h_forced, pending, n_pending = h
            status, turns, n_err, consec, forced_ans = (
                jnp.where(need_host, hv, old) for hv, old in zip(h[:5], state)
            )
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
            rec_start, rec_len, rec_obs = rec
            rec = (
                rec_start.at[:, n].set(jnp.where(running, start, 0)),
                rec_len.at[:, n].set(jnp.where(running, turn_len, 0)),
                rec_obs.at[:, n].set(n_pending),
            )
            tokens = write(tokens, length, pending, n_pending)
            kind = write(kind, length, jnp.full((B, 1), KIND_TOOL, jnp.int8), n_pending)
            length = length + n_pending
            return (
                cache,
                last,
                tokens,
                kind,
                logprobs,
                length,
                pending,
                n_pending,
                status,
                turns,
                n_err,
                consec,
                forced_ans,
                rec,
                ans_span,
                keys,
            ), None

        carry = (
            cache,
            decode.empty_last(model, B),
            tokens,
            kind,
            logprobs,
            length,
            pending,
            n_pending,
            zB,
            zB,
            zB,
            zB,
            jnp.zeros((B,), bool),
            (zBN, zBN, zBN),
            jnp.full((B, 2), -1, jnp.int32),
            keys,
        )
        carry, _ = jax.lax.scan(turn, carry, jnp.arange(max_turns))
        (
            _,
            _,
            tokens,
            kind,
            logprobs,
            length,
            _,
            _,
            status,
            turns,
            n_err,
            _,
            forced_ans,
            rec,
            ans_span,
            _,
        ) = carry
        return tokens, kind, logprobs, length, status, turns, n_err, forced_ans, rec, ans_span

    return jax.jit(run)


def _rebuild_messages(tokenizer, initial, tokens_r, turns_r, start_r, len_r, obs_r):
    """A row's chat messages from its tokens and turn records (what ``_Episodes.judge`` appends
    in the segmented loop: each turn's ``cut_turn`` text and the observation content)."""
    msgs = list(initial)
    for i in range(int(turns_r)):
        s, n, o = int(start_r[i]), int(len_r[i]), int(obs_r[i])
        text, stop = cut_turn_ids(tokenizer, tokens_r[s : s + n])
        msgs.append({"role": "assistant", "content": text})
        if o:
            framed = tokenizer.decode(tokens_r[s + n : s + n + o])
            head = ("" if stop == protocol.IM_END else protocol.IM_END) + f"\n{protocol.IM_START}user\n"
            tail = f"{protocol.IM_END}\n{protocol.IM_START}assistant\n"
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
    config: RolloutConfig = RolloutConfig(),
    system_prompt: str | None = None,
    sampling=None,
    rng=None,
    forced_turns: Sequence[Sequence[str]] | None = None,
    env: str = "auto",
    chat_format: protocol.ChatFormat | None = None,
    autodeco=None,
) -> RolloutResult:
    """``segmented_rollout`` as one compiled program: ``lax.scan`` over turns, a ``while_loop``
    decode per turn with the stop strings matched on byte tokens in jnp, then the environment.

    ``env`` picks the environment step: ``"jnp"`` runs the simulated wiki in jnp inside the scan
    (turns parsed from their bytes, ``search_step``/``visit_step``, observation piece tokens
    gathered, budget and statuses applied) and sends only turns its canonical parser does not
    accept (malformed or unusual calls, other tools) to the host through ``io_callback`` under a
    ``lax.cond``; it needs an executor from ``synth.wiki_executor`` (see ``wiki_of``).
    ``"host"`` sends every turn to the host (any executor: sandbox, real tools). ``"auto"``
    (default): ``"jnp"`` when the executor is the simulated wiki, else ``"host"``. Results are
    identical either way, and identical to ``segmented_rollout``; ``host_callbacks`` counts the
    callbacks made. Byte-level tokenizers only (``ByteTokenizer``), since stops and calls are
    matched on tokens; chatml only (the jnp environment gathers chatml framing). Any other
    tokenizer or format is refused: use ``segmented_rollout`` (``--rollout segmented``). Compiled
    once per (model config, batch size, budget, chunk, turn cap, max turns, sampling, env).
    """
    from jaxllm.data.tokenizers import ByteTokenizer

    if not isinstance(tokenizer, ByteTokenizer):
        raise ValueError(
            f"scan_rollout: needs a ByteTokenizer (stop strings and tool calls are matched on "
            f"byte tokens in jnp), got {type(tokenizer).__name__}; use the segmented loop "
            f"(--rollout segmented, rollout.segmented_rollout)"
        )
    if chat_format is not None and chat_format != protocol.CHATML:
        raise ValueError(
            f"scan_rollout: renders chatml only, got the {chat_format.name} chat format; use the "
            f"segmented loop (--rollout segmented, rollout.segmented_rollout)"
        )
    if env not in ENVS:
        raise ValueError(f"scan_rollout: env must be one of {ENVS}, got {env!r}")
    cfg = config
    prompts, forced_ids, ep = _prepare(
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
        autodeco=autodeco,
    )
    wiki = wiki_of(executor) if env != "host" else None
    if env == "jnp" and wiki is None:
        raise ValueError(
            "scan_rollout: env='jnp' needs an executor made by "
            "synth.wiki_executor(wiki) (search and visit of a SimulatedWiki)"
        )
    env_arrays, env_static = _wiki_env(wiki, tokenizer, executor) if wiki is not None else (None, None)
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
    fn = _scan_fn(
        type(model), model.config, T, cfg.chunk, L, cfg.max_turns, B, sampling, env_static, pad, heads
    )
    call_id = next(_CALL_IDS)
    _HOSTS[call_id] = host
    try:
        out = fn(
            params,
            _init_cache(model, B, T, cfg.chunk),
            jnp.asarray(tokens),
            jnp.asarray(kind),
            jnp.zeros((B, T), jnp.float32),
            jnp.asarray(n_pending),
            jnp.asarray(pending),
            jnp.asarray(n_pending),
            jnp.asarray(forced),
            decode.row_keys(jax.random.PRNGKey(0) if rng is None else rng, B),
            jnp.int32(call_id),
            env_arrays,
            jnp.int32(ep.limit),
            heads_params,
        )
        out = jax.tree_util.tree_map(np.asarray, out)
    finally:
        del _HOSTS[call_id]
    toks, knd, lps, length, status, turns, n_err, forced_ans, rec, ans_span = out
    ep.status, ep.turns, ep.n_err = (np.array(a, np.int32) for a in (status, turns, n_err))
    ep.forced_answer = np.array(forced_ans, bool)
    ep.messages = [
        _rebuild_messages(tokenizer, initial[r], toks[r], ep.turns[r], *(x[r] for x in rec)) for r in range(B)
    ]
    for r in range(B):
        if ep.status[r] == ANSWERED and ep.answers[r] is None:  # answered in the jnp judge
            lo, hi = ans_span[r]
            ep.answers[r] = tokenizer.decode(toks[r, lo:hi]).strip()
    return ep.result(toks, knd, lps, length, host_callbacks=calls[0])
