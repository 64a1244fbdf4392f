"""The ReAct text protocol of Tongyi DeepResearch, and a chatml chat template.

An assistant turn is ``<think>...</think>`` followed by exactly one action: either

    <tool_call>
    {"name": "search", "arguments": {"query": ["..."]}}
    </tool_call>

(for ``PythonInterpreter`` the arguments are ``{}`` and the code follows the JSON inside
``<code>...</code>``, still within ``<tool_call>``), or ``<answer>...</answer>``. The tool's result
comes back as a **user** turn ``<tool_response>\\n...\\n</tool_response>``. Decoding stops at
``</tool_call>``, ``</answer>``, or at a ``<tool_response>`` the model starts writing itself; text
from such a self-written ``<tool_response>`` on is never trusted: ``truncate_at_stop`` drops it.

Everything here is pure string processing: parsing never raises on model output; a malformed turn
becomes a ``ParseError`` whose ``message`` is the observation the model sees next.

Messages are plain dicts ``{"role": "system" | "user" | "assistant", "content": str}`` so they
serialise to JSONL as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import ClassVar, Iterable, Sequence, Union

from jaxllm.data import chat_template
from jaxllm.errors import TrajectoryError

__all__ = [
    "THINK_OPEN",
    "THINK_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
    "ANSWER_OPEN",
    "ANSWER_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "CODE_OPEN",
    "CODE_CLOSE",
    "STOP_STRINGS",
    "IM_START",
    "IM_END",
    "ROLES",
    "ToolCall",
    "Answer",
    "ParseError",
    "Action",
    "truncate_at_stop",
    "strip_forged_response",
    "parse_assistant",
    "render_tool_call",
    "render_assistant",
    "wrap_tool_response",
    "unwrap_tool_response",
    "is_tool_response",
    "error_observation",
    "render_chat",
    "render_segments",
    "parse_chat",
    "build_system_prompt",
    "initial_messages",
    "split_turns",
    "TrajectoryError",
    "FORCE_ANSWER",
    "force_answer_message",
    "ChatFormat",
    "Qwen3Format",
    "CHATML",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
#: Strings that end an assistant segment. The first two are kept in the turn (they close its
#: action); a ``<tool_response>`` the model starts is cut off with everything after it.
STOP_STRINGS = (TOOL_CALL_CLOSE, ANSWER_CLOSE, TOOL_RESPONSE_OPEN)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------------------
# Actions
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call. ``code`` holds the ``<code>`` body for PythonInterpreter, else None."""

    name: str
    arguments: dict
    code: str | None = None
    think: str | None = None


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    think: str | None = None


@dataclasses.dataclass(frozen=True)
class ParseError:
    """A turn that is not exactly one well-formed action. ``message`` names what was wrong."""

    message: str


Action = Union[ToolCall, Answer, ParseError]


# ------------------------------------------------------------------------------------------
# Stop handling and parsing of one assistant turn
# ------------------------------------------------------------------------------------------


def truncate_at_stop(text: str) -> tuple[str, str | None]:
    """Cut generated text at its first stop string.

    Returns ``(kept_text, stop)`` where ``stop`` is the stop string that ended the segment or
    None. ``</tool_call>`` and ``</answer>`` are kept (they close the action); a
    ``<tool_response>`` the model writes itself is removed together with everything after it and
    the whitespace before it, so a model-forged observation never enters the context.
    The rule is positional only (the first stop string anywhere, thinking included), so a
    token-level stop check in a compiled decode loop can implement exactly the same rule.
    """
    best = None
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    if best is None:
        return text, None
    i, stop = best
    if stop == TOOL_RESPONSE_OPEN:
        return text[:i].rstrip(), stop
    return text[: i + len(stop)], stop


def strip_forged_response(text: str) -> str:
    """Drop a ``<tool_response>`` the model started itself and everything after it."""
    i = text.find(TOOL_RESPONSE_OPEN)
    return text if i < 0 else text[:i].rstrip()


def _split_think(text: str) -> tuple[str | None, str, str | None]:
    """Return (think_body, rest, error)."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        if THINK_CLOSE in text or THINK_OPEN in text:
            return None, text, f"{THINK_OPEN} must open the turn and be closed once"
        return None, text, None
    body_start = len(text) - len(stripped) + len(THINK_OPEN)
    close = text.find(THINK_CLOSE, body_start)
    if close < 0:
        return None, text, f"unclosed {THINK_OPEN}: no {THINK_CLOSE} before the action"
    think = text[body_start:close]
    if THINK_OPEN in think:
        return None, text, f"nested {THINK_OPEN} inside the thinking block"
    rest = text[close + len(THINK_CLOSE) :]
    think = think.strip()
    if THINK_OPEN in rest or THINK_CLOSE in rest:
        return None, text, f"more than one {THINK_OPEN} block in one turn"
    return think, rest, None


def _blocks(text: str, open_tag: str, close_tag: str):
    """(start, end, body) of each open..close block; an unclosed open gives end=None."""
    out, pos = [], 0
    while True:
        i = text.find(open_tag, pos)
        if i < 0:
            return out
        j = text.find(close_tag, i + len(open_tag))
        if j < 0:
            out.append((i, None, text[i + len(open_tag) :]))
            return out
        out.append((i, j + len(close_tag), text[i + len(open_tag) : j]))
        pos = j + len(close_tag)


def _json_error(body: str, e: json.JSONDecodeError) -> str:
    lo = max(0, e.pos - 20)
    near = body[lo : e.pos + 20].replace("\n", "\\n")
    return (
        f"the tool call is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}, "
        f'near {near!r}); write {{"name": ..., "arguments": {{...}}}} with double quotes'
    )


def _parse_call_body(body: str) -> ToolCall | ParseError:
    code = None
    if CODE_OPEN in body or CODE_CLOSE in body:
        blocks = _blocks(body, CODE_OPEN, CODE_CLOSE)
        if len(blocks) != 1 or blocks[0][1] is None:
            return ParseError(f"expected exactly one {CODE_OPEN}...{CODE_CLOSE} block in the tool call")
        start, end, code = blocks[0]
        code = code.strip("\n")  # render_tool_call puts the code on its own lines
        if body[end:].strip():
            return ParseError(f"unexpected text after {CODE_CLOSE} inside the tool call")
        body = body[:start]
    body = body.strip()
    if not body:
        return ParseError('empty tool call: expected {"name": ..., "arguments": {...}}')
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ParseError(_json_error(body, e))
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, 100000-deep nesting
        return ParseError(f"the tool call JSON cannot be read: {type(e).__name__}: {str(e)[:120]}")
    if not isinstance(obj, dict):
        return ParseError(f"the tool call must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("name", "arguments") if k not in obj]
    if missing:
        return ParseError(f"the tool call lacks {' and '.join(repr(m) for m in missing)}")
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        return ParseError(
            f"unexpected keys {extra} in the tool call; only 'name' and 'arguments' are allowed"
        )
    name, args = obj["name"], obj["arguments"]
    if not isinstance(name, str) or not name:
        return ParseError(f"'name' must be a non-empty string, got {json.dumps(name)}")
    if not isinstance(args, dict):
        return ParseError(
            f"'arguments' must be a JSON object, got {type(args).__name__} {json.dumps(args)[:80]}"
        )
    return ToolCall(name=name, arguments=args, code=code)


def parse_assistant(text: str) -> Action:
    """Parse one assistant turn into exactly one ToolCall or Answer, else a ParseError.

    A ``<tool_response>`` the model wrote itself is cut off first, with everything after it
    (``strip_forged_response``); the other stop strings are *not* applied here, so a text holding
    several calls (e.g. from a server that ignores stop strings) is reported as such. Prose
    between ``</think>`` and the action is allowed; text after the action is not. Never raises
    on any string input.
    """
    if not isinstance(text, str):
        return ParseError(f"assistant turn must be text, got {type(text).__name__}")
    text = strip_forged_response(text)
    n_calls = text.count(TOOL_CALL_OPEN)
    if n_calls > 1:  # checked first: the most useful message for think/call/think/call turns
        return ParseError(
            f"{n_calls} tool calls in one turn; make exactly one call per turn "
            "(search and visit take arrays, so batch inside one call)"
        )
    think, rest, err = _split_think(text)
    if err:
        return ParseError(err)
    calls = _blocks(rest, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    answers = _blocks(rest, ANSWER_OPEN, ANSWER_CLOSE)
    stray = [
        t
        for t in (TOOL_CALL_CLOSE, ANSWER_CLOSE)
        if rest.count(t) > sum(b[1] is not None for b in (calls if t == TOOL_CALL_CLOSE else answers))
    ]
    if calls and answers:
        return ParseError("a turn must contain either one tool call or one answer, not both")
    if len(calls) > 1:
        return ParseError(
            f"{len(calls)} tool calls in one turn; make exactly one call per turn "
            "(search and visit take arrays, so batch inside one call)"
        )
    if len(answers) > 1:
        return ParseError(
            f"{len(answers)} answers in one turn; give exactly one {ANSWER_OPEN}...{ANSWER_CLOSE}"
        )
    if stray:
        return ParseError(f"{stray[0]} without a matching opening tag")
    if not calls and not answers:
        return ParseError(
            f"no action: end the turn with one {TOOL_CALL_OPEN}...{TOOL_CALL_CLOSE} "
            f"or one {ANSWER_OPEN}...{ANSWER_CLOSE}"
        )
    start, end, body = (calls or answers)[0]
    if end is None:
        tag = TOOL_CALL_CLOSE if calls else ANSWER_CLOSE
        return ParseError(f"unclosed {TOOL_CALL_OPEN if calls else ANSWER_OPEN}: missing {tag}")
    if rest[end:].strip():
        return ParseError("unexpected text after the action; the turn must end with it")
    if answers:
        answer = body.strip()
        if not answer:
            return ParseError("empty answer")
        return Answer(text=answer, think=think)
    call = _parse_call_body(body)
    if isinstance(call, ToolCall):
        call = dataclasses.replace(call, think=think)
    return call


# ------------------------------------------------------------------------------------------
# Rendering actions and observations
# ------------------------------------------------------------------------------------------


def render_tool_call(name: str, arguments: dict, code: str | None = None) -> str:
    """The ``<tool_call>`` block for a call (inverse of the call part of ``parse_assistant``)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    if code is not None:
        body += f"\n{CODE_OPEN}\n{code}\n{CODE_CLOSE}"
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def render_assistant(think: str, action: ToolCall | Answer) -> str:
    """``<think>\\n...\\n</think>\\n`` followed by the action, as the released trajectories do."""
    head = f"{THINK_OPEN}\n{think.strip()}\n{THINK_CLOSE}\n"
    if isinstance(action, ToolCall):
        return head + render_tool_call(action.name, action.arguments, action.code)
    if isinstance(action, Answer):
        return head + f"{ANSWER_OPEN}\n{action.text}\n{ANSWER_CLOSE}"
    raise TypeError(f"render_assistant: action must be ToolCall or Answer, got {type(action)}")


_NEUTRALISE = {
    TOOL_RESPONSE_CLOSE: "&lt;/tool_response&gt;",
    IM_END: "&lt;|im_end|&gt;",
    IM_START: "&lt;|im_start|&gt;",
}


def wrap_tool_response(observation: str) -> str:
    """User-turn content for an observation: ``<tool_response>\\n{obs}\\n</tool_response>``.

    Tags inside the observation that would end the response or the turn early
    (``</tool_response>``, ``<|im_end|>``, ``<|im_start|>``) are HTML-escaped, so a hostile page
    cannot inject turns.
    """
    for tag, repl in _NEUTRALISE.items():
        observation = observation.replace(tag, repl)
    return f"{TOOL_RESPONSE_OPEN}\n{observation}\n{TOOL_RESPONSE_CLOSE}"


def is_tool_response(content: str) -> bool:
    return content.startswith(TOOL_RESPONSE_OPEN) and content.endswith(TOOL_RESPONSE_CLOSE)


def unwrap_tool_response(content: str) -> str:
    if not is_tool_response(content):
        raise ValueError(
            "not a tool response: content must start with <tool_response> and end with </tool_response>"
        )
    inner = content[len(TOOL_RESPONSE_OPEN) : -len(TOOL_RESPONSE_CLOSE)]
    if inner.startswith("\n"):
        inner = inner[1:]
    if inner.endswith("\n"):
        inner = inner[:-1]
    return inner


def error_observation(message: str) -> str:
    """The observation text for a turn that could not be executed."""
    return f"Error: {message}"


# ------------------------------------------------------------------------------------------
# Chat template (chatml, as Qwen3 and the released model use)
# ------------------------------------------------------------------------------------------


def _check_message(i: int, m) -> None:
    if not isinstance(m, dict) or set(m) != {"role", "content"}:
        raise ValueError(f"message {i}: must be a dict with exactly 'role' and 'content', got {m!r:.80}")
    if m["role"] not in ROLES:
        raise ValueError(f"message {i}: role must be one of {ROLES}, got {m['role']!r}")
    if not isinstance(m["content"], str):
        raise ValueError(f"message {i}: content must be a str, got {type(m['content']).__name__}")
    for marker in (IM_START, IM_END):
        if marker in m["content"]:
            raise ValueError(
                f"message {i} ({m['role']}): content contains the chat marker "
                f"{marker!r}, which would break the template"
            )


def render_segments(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The chat text as ``(piece, is_model)`` pieces; ``is_model`` marks assistant content and
    its ``<|im_end|>`` (the tokens a policy is trained on). ``"".join`` gives ``render_chat``."""
    out: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        _check_message(i, m)
        out.append((f"{IM_START}{m['role']}\n", False))
        if m["role"] == "assistant":
            out.append((m["content"] + IM_END, True))
            out.append(("\n", False))
        else:
            out.append((m["content"] + IM_END + "\n", False))
    if add_generation_prompt:
        out.append((f"{IM_START}assistant\n", False))
    return out


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; contents are kept verbatim
    (``<think>`` blocks of earlier turns included), so ``parse_chat`` inverts it exactly."""
    return "".join(p for p, _ in render_segments(messages, add_generation_prompt))


def parse_chat(text: str) -> list[dict]:
    """Inverse of ``render_chat`` (without a trailing generation prompt). Raises ValueError
    naming the offset of the first malformed piece."""
    msgs, pos = [], 0
    while pos < len(text):
        if not text.startswith(IM_START, pos):
            raise ValueError(
                f"parse_chat: expected {IM_START!r} at offset {pos}, got {text[pos : pos + 20]!r}"
            )
        head_end = text.find("\n", pos)
        if head_end < 0:
            raise ValueError(f"parse_chat: no newline after the role at offset {pos}")
        role = text[pos + len(IM_START) : head_end]
        if role not in ROLES:
            raise ValueError(f"parse_chat: unknown role {role!r} at offset {pos}")
        end = text.find(IM_END, head_end + 1)
        if end < 0:
            raise ValueError(f"parse_chat: message at offset {pos} ({role}) has no {IM_END!r}")
        content = text[head_end + 1 : end]
        if IM_START in content:
            raise ValueError(f"parse_chat: {IM_START!r} inside the {role} message at offset {pos}")
        msgs.append({"role": role, "content": content})
        pos = end + len(IM_END)
        if not text.startswith("\n", pos):
            raise ValueError(f"parse_chat: expected a newline after {IM_END!r} at offset {pos}")
        pos += 1
    return msgs


# ------------------------------------------------------------------------------------------
# System prompt and trajectories
# ------------------------------------------------------------------------------------------

DEFAULT_PREAMBLE = (
    "You are a research agent that answers questions by looking things up. Work in steps. In "
    "each step, first reason inside <think></think>, then either call exactly one tool or give "
    "the final answer. Check facts against what the tools return instead of relying on memory. "
    "When the evidence is sufficient, reply with <think>your final reasoning</think> followed by "
    "<answer>the answer, as short as possible</answer>."
)


def build_system_prompt(
    tool_specs: Iterable[dict], date: str | datetime.date | None = None, preamble: str = DEFAULT_PREAMBLE
) -> str:
    """Our own system prompt: preamble, one JSON tool signature per line in ``<tools>``, the call
    format, and ``Current date: YYYY-MM-DD``. A model trained on another prompt should be given
    that prompt instead (pass it as the system message yourself)."""
    if date is None:
        date = datetime.date.today()
    if isinstance(date, datetime.date):
        date = date.isoformat()
    sigs = "\n".join(json.dumps({"type": "function", "function": s}, ensure_ascii=False) for s in tool_specs)
    return (
        f"{preamble}\n\n# Tools\n\nThe tools you can call are described by these JSON function "
        f"signatures:\n<tools>\n{sigs}\n</tools>\n\nTo call a tool, write one JSON object with "
        f"the tool's name and its arguments between tool-call tags:\n{TOOL_CALL_OPEN}\n"
        '{"name": <tool name>, "arguments": <JSON object of arguments>}\n'
        f"{TOOL_CALL_CLOSE}\nFor PythonInterpreter the arguments are {{}} and the "
        f"program goes right after the JSON, still inside the tool call, between {CODE_OPEN} and "
        f"{CODE_CLOSE}; print what you want to see. The result of each call comes back in "
        f"{TOOL_RESPONSE_OPEN}{TOOL_RESPONSE_CLOSE} tags.\n\nCurrent date: {date}"
    )


#: User turn that forces a final answer when a budget (context tokens, turns) is used up; the
#: next assistant turn should be an answer, and anything else counts as a format error.
FORCE_ANSWER = (
    "The budget for this task is used up, so no more tools can be called. Based on everything "
    "found so far, reason once more and give your best answer now, as "
    "<think>your final reasoning</think> followed by <answer>your answer</answer>."
)


def force_answer_message(text: str = FORCE_ANSWER) -> dict:
    return {"role": "user", "content": text}


def initial_messages(question: str, system_prompt: str) -> list[dict]:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("initial_messages: question must be a non-empty string")
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def split_turns(messages: Sequence[dict]) -> list[tuple[Action, str | None]]:
    """Check a trajectory's shape and parse it into ``(action, observation)`` steps.

    Shape: optional system, one user question, then assistant turns, each followed by a user
    ``<tool_response>`` turn except the last. ``observation`` is the unwrapped tool response (None
    for the last step). Raises ``TrajectoryError`` naming the first message out of place; the
    actions themselves may be ParseErrors (for the caller to judge).
    """
    for i, m in enumerate(messages):
        try:
            _check_message(i, m)
        except ValueError as e:
            raise TrajectoryError(str(e)) from None
    i = 1 if messages and messages[0]["role"] == "system" else 0
    if i >= len(messages) or messages[i]["role"] != "user":
        raise TrajectoryError(f"message {i}: expected the user question")
    i += 1
    steps: list[tuple[Action, str | None]] = []
    while i < len(messages):
        if messages[i]["role"] != "assistant":
            raise TrajectoryError(f"message {i}: expected an assistant turn, got {messages[i]['role']}")
        action = parse_assistant(messages[i]["content"])
        obs = None
        if i + 1 < len(messages):
            nxt = messages[i + 1]
            if nxt["role"] != "user" or not is_tool_response(nxt["content"]):
                raise TrajectoryError(f"message {i + 1}: expected a user <tool_response> turn")
            obs = unwrap_tool_response(nxt["content"])
        steps.append((action, obs))
        i += 2
    return steps


# ------------------------------------------------------------------------------------------
# Chat formats: how a rollout frames its prompt and the user turns between assistant turns
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """The text a rollout writes around the model's turns; the default is the chatml above.

    ``prompt(messages)``: system + question + the generation prompt. ``user_turn(content,
    model_closed_turn)``: the text between one assistant turn's content and the next one's (the
    assistant's ``<|im_end|>`` unless the model wrote it, the user turn, the generation prompt);
    ``observation`` and ``forced_answer`` are the two user turns a rollout appends. Messages are
    the same for every format: the observation is a user turn ``<tool_response>...`` (Tongyi's
    way), so a trajectory reads the same whatever format produced it.
    """

    name: ClassVar[str] = "chatml"

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: Sequence[dict]) -> str:
        return self.render(messages, add_generation_prompt=True)

    def user_turn(self, content: str, model_closed_turn: bool = False) -> str:
        # Rendered through the format's own template, so both formats frame a turn as they render it.
        head = "" if model_closed_turn else IM_END
        return f"{head}\n" + self.render([{"role": "user", "content": content}], add_generation_prompt=True)

    def observation(self, observation: str, model_closed_turn: bool = False) -> str:
        return self.user_turn(wrap_tool_response(observation), model_closed_turn)

    def forced_answer(self, model_closed_turn: bool = False) -> str:
        return self.user_turn(FORCE_ANSWER, model_closed_turn)


@dataclasses.dataclass(frozen=True)
class Qwen3Format(ChatFormat):
    """The Qwen3 chat template (``jaxllm.data.chat_template.render_chat``), as Qwen3 and
    Tongyi-DeepResearch (a Qwen3-MoE) were trained on. ``tools``: schemas the template lists in
    the system turn (Tongyi lists them in its system prompt instead and passes none);
    ``enable_thinking=False`` pre-fills an empty ``<think>`` block in every generation prompt."""

    name: ClassVar[str] = "qwen3"
    tools: tuple = ()
    enable_thinking: bool = True

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return chat_template.render_chat(
            messages,
            tools=list(self.tools) or None,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
        )

    def __post_init__(self):
        object.__setattr__(self, "tools", tuple(self.tools or ()))

    def user_turn(self, content: str, model_closed_turn: bool = False) -> str:
        # A lone user message has no system turn: the template must not list the tools again.
        return ChatFormat.user_turn(dataclasses.replace(self, tools=()), content, model_closed_turn)


#: The default format: chatml (``render_chat`` above).
CHATML = ChatFormat()
