"""Host-side bookkeeping of ReAct episodes, shared by both rollout loops (``jaxllm.agent.rollout``):
statuses and token kinds, where a turn ends (``cut_turn``/``cut_turn_ids``), the rollout's config and
result, and ``Episodes.judge`` (parse a finished turn, run the tool, decide the row's status and the
tokens to append). Nothing here runs on a device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.agent import protocol, synth, tools

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
PARSER_TAGS = (
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
    drop = set(special) - {added[t] for t in PARSER_TAGS if t in added}
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
    row_sharding: object = None  # how the rows were laid out on the devices (rollouts with a mesh)
    device_rows: list | None = None  # rows in the device batch each turn (finished rows leave it)

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


class Episodes:
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

    def result(
        self, tokens, kind, logprobs, length, host_callbacks=None, row_sharding=None, device_rows=None
    ):
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
            row_sharding=row_sharding,
            device_rows=device_rows,
        )


def prepare(
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
    questions = list(questions)
    B = len(questions)
    if B == 0:
        raise ValueError(f"{who}: no questions")
    fmt = protocol.CHATML if fmt is None else fmt
    if not isinstance(fmt, protocol.ChatFormat):
        raise ValueError(f"{who}: chat_format must be a protocol.ChatFormat, got {type(fmt).__name__}")
    if not isinstance(executor, tools.ToolExecutor):
        raise ValueError(f"{who}: executor must be a tools.ToolExecutor, got {type(executor).__name__}")
    if sampling is not None and rng is None:
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
    return prompts, forced_ids, Episodes(B, cfg, executor, tokenizer, messages, limit, fmt)
