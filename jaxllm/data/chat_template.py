"""The Qwen3 chat template in Python, and the Tongyi DeepResearch system prompt.

``render_chat(messages, tools=..., add_generation_prompt=..., enable_thinking=...)`` gives the text
that Qwen3's Jinja ``chat_template`` (tokenizer_config.json of Qwen/Qwen3-30B-A3B, the base of
Tongyi-DeepResearch-30B-A3B) renders for the same arguments, character for character, without
jinja2 or transformers:

- every turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
- with ``tools``, the system turn is the system message (if any), a blank line, and a ``# Tools``
  block listing one JSON schema per line inside ``<tools></tools>``;
- an assistant's ``tool_calls`` follow its content as ``<tool_call>\\n{"name": ..., "arguments":
  ...}\\n</tool_call>``, and ``tool`` messages become one user turn of ``<tool_response>`` blocks;
- an assistant turn after the last real user query (tool responses do not count) keeps its
  reasoning as ``<think>\\n...\\n</think>\\n\\n``; earlier turns drop it;
- ``add_generation_prompt`` opens an assistant turn; ``enable_thinking=False`` pre-fills an empty
  ``<think>`` block so the model answers without thinking.

Messages are dicts: ``role`` (system, user, assistant, tool), ``content`` (str; None counts as
empty), and for assistants optionally ``reasoning_content`` (str) and ``tool_calls`` (a list of
``{"name", "arguments"}`` or OpenAI's ``{"type": "function", "function": {...}}``). Keys the
template would ignore are rejected, so a typo cannot silently drop a turn's content.

``tongyi_system_prompt(tools, date)`` builds a system prompt with the structure of Tongyi
DeepResearch's (a role paragraph asking for the answer in ``<answer></answer>``, the same ``#
Tools`` block, then ``Current date: YYYY-MM-DD``) over jaxllm's agent tools. Tongyi puts its tools
in that system text and passes no ``tools`` to the template.
"""

from __future__ import annotations

import datetime
import json
from typing import Iterable, Mapping, Sequence

__all__ = [
    "IM_START",
    "IM_END",
    "THINK_OPEN",
    "THINK_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "QWEN_SPECIAL_TOKENS",
    "ROLES",
    "tool_schema",
    "tools_block",
    "last_query_index",
    "split_reasoning",
    "render_chat",
    "TONGYI_TOOLS",
    "TONGYI_PREAMBLE",
    "tongyi_system_prompt",
]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
#: The Qwen3 tokens this template writes, each one id in Qwen's tokenizer.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    IM_START,
    IM_END,
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE,
    THINK_OPEN,
    THINK_CLOSE,
)
ROLES = ("system", "user", "assistant", "tool")
_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "tool": {"role", "content", "name", "tool_call_id"},
    "assistant": {"role", "content", "reasoning_content", "tool_calls"},
}


def _tojson(obj) -> str:
    """JSON as transformers' ``tojson`` filter writes it: ", " and ": " separators, keys in
    their order, non-ASCII kept (jinja2's own filter would sort keys and escape ``<>&'``)."""
    return json.dumps(obj, ensure_ascii=False)


# ------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------


def tool_schema(spec: Mapping) -> dict:
    """A tool as the template lists it: ``{"type": "function", "function": spec}``. A bare spec
    (``name``, ``description``, ``parameters``, as ``jaxllm.agent.tools`` holds them) is wrapped;
    one already in that form is kept."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a tool must be a JSON schema object, got {type(spec).__name__}")
    if "function" in spec:
        return dict(spec)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(
            f"a tool schema needs a non-empty 'name' (or a 'function' object), got {dict(spec)!r:.100}"
        )
    return {"type": "function", "function": dict(spec)}


def tools_block(tools: Iterable[Mapping]) -> str:
    """The ``# Tools`` section: one schema per line in ``<tools></tools>`` and the call format.
    Qwen3's template and Tongyi's system prompt share this text word for word."""
    lines = "".join("\n" + _tojson(tool_schema(t)) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        f"{TOOL_CALL_CLOSE}"
    )


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def _check_message(i: int, m) -> None:
    if not isinstance(m, Mapping) or "role" not in m:
        raise ValueError(f"message {i}: must be a dict with a 'role', got {m!r:.80}")
    role = m["role"]
    if role not in ROLES:
        raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
    extra = sorted(set(m) - _KEYS[role])
    if extra:
        raise ValueError(f"message {i} ({role}): unexpected keys {extra}; allowed: {sorted(_KEYS[role])}")
    for key in ("content", "reasoning_content"):
        value = m.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"message {i} ({role}): {key} must be a str or None, got {type(value).__name__}")
        # A turn marker inside a message would end the turn early: another role could be injected.
        for marker in (IM_START, IM_END):
            if value and marker in value:
                raise ValueError(
                    f"message {i} ({role}): {key} contains the chat marker {marker!r}, which would break the template"
                )
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, (list, tuple)):
        raise ValueError(f"message {i}: tool_calls must be a list, got {type(calls).__name__}")


def _call_parts(i: int, j: int, call) -> tuple[str, str]:
    """(name, arguments JSON text) of one tool call; OpenAI's ``{"function": {...}}`` or flat."""
    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
        call = call["function"]
    if not isinstance(call, Mapping):
        raise ValueError(f"message {i}: tool_calls[{j}] must be an object, got {type(call).__name__}")
    name, args = call.get("name"), call.get("arguments")
    if not isinstance(name, str) or not name:
        raise ValueError(f"message {i}: tool_calls[{j}] needs a non-empty string 'name', got {name!r}")
    if isinstance(args, str):  # already JSON text (as OpenAI clients send it): written as is
        return name, args
    if not isinstance(args, Mapping):
        raise ValueError(
            f"message {i}: tool_calls[{j}] ({name}) 'arguments' must be an object or a JSON string, "
            f"got {type(args).__name__}"
        )
    return name, _tojson(dict(args))


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def _is_tool_response(content: str) -> bool:
    return content.startswith(TOOL_RESPONSE_OPEN) and content.endswith(TOOL_RESPONSE_CLOSE)


def last_query_index(messages: Sequence[Mapping]) -> int:
    """Index of the last user message that is a real query, not a ``<tool_response>`` carried as a
    user turn (Tongyi's way); assistant turns after it keep their reasoning. The last index if none."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "user" and isinstance(m.get("content"), str) and not _is_tool_response(m["content"]):
            return i
    return len(messages) - 1


def split_reasoning(message: Mapping) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: ``reasoning_content`` if given; else the
    text before the first ``</think>`` (after the last ``<think>`` in it) and the text after the
    last ``</think>``, with the template's newline trims."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_CLOSE not in content:
        return "", content
    reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, content.split(THINK_CLOSE)[-1].lstrip("\n")


def _system_header(messages: Sequence[Mapping], tools: Sequence[Mapping] | None) -> str:
    system = (messages[0].get("content") or "") if messages and messages[0]["role"] == "system" else None
    if tools:
        head = "" if system is None else system + "\n\n"
        return f"{IM_START}system\n{head}{tools_block(tools)}{IM_END}\n"
    return "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"


def _render_assistant(i: int, m: Mapping, *, keep_reasoning: bool, is_last: bool) -> str:
    reasoning, content = split_reasoning(m)
    if keep_reasoning and (is_last or reasoning):
        think, rest = reasoning.strip("\n"), content.lstrip("\n")
        out = f"{IM_START}assistant\n{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n\n{rest}"
    else:
        out = f"{IM_START}assistant\n{content}"
    for j, call in enumerate(m.get("tool_calls") or ()):
        name, args = _call_parts(i, j, call)
        # The template tests the content before its lstrip: a newline separates non-empty content.
        if j > 0 or content:
            out += "\n"
        out += f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{TOOL_CALL_CLOSE}'
    return out + f"{IM_END}\n"


def _render_tool(i: int, messages: Sequence[Mapping]) -> str:
    """A tool message: consecutive ones share one user turn, each in its own block."""
    first = i == 0 or messages[i - 1]["role"] != "tool"
    last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    body = f"\n{TOOL_RESPONSE_OPEN}\n{messages[i].get('content') or ''}\n{TOOL_RESPONSE_CLOSE}"
    return (f"{IM_START}user" if first else "") + body + (f"{IM_END}\n" if last else "")


def render_chat(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """The Qwen3 chat template's text for ``messages`` (see the module docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        _check_message(i, m)
    tools = list(tools) if tools else None
    out = [_system_header(messages, tools)]
    query = last_query_index(messages)
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            continue  # rendered in the header
        if role in ("user", "system"):
            out.append(f"{IM_START}{role}\n{m.get('content') or ''}{IM_END}\n")
        elif role == "assistant":
            out.append(_render_assistant(i, m, keep_reasoning=i > query, is_last=i == len(messages) - 1))
        else:
            out.append(_render_tool(i, messages))
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
        if not enable_thinking:
            out.append(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n")
    return "".join(out)


# ------------------------------------------------------------------------------------------
# Tongyi DeepResearch system prompt
# ------------------------------------------------------------------------------------------

#: Tongyi DeepResearch's tools, in the order its released prompt lists them: short name -> the
#: name jaxllm's agent serves the tool under (``jaxllm.agent.tools.TOOL_SPECS``, which keeps
#: Tongyi's released names, so a model trained on them calls the right tool).
TONGYI_TOOLS = {
    "search": "search",
    "visit": "visit",
    "python": "PythonInterpreter",
    "scholar": "google_scholar",
    "parse_file": "parse_file",
}

#: Our wording of the role paragraph. For the released model, pass its exact paragraph as
#: ``preamble``: it was trained on that text and scores lower on other wordings.
TONGYI_PREAMBLE = (
    "You are a deep research assistant. You investigate questions thoroughly, across many "
    "sources, in open domains as well as specialised academic fields, and you base your response "
    "on credible, diverse sources so that it is comprehensive, accurate and objective. Once you "
    "have gathered enough information to give the definitive response, put the whole final answer "
    "inside <answer></answer> tags."
)


def _default_specs() -> Mapping[str, dict]:
    # Imported here: jaxllm.agent sits above jaxllm.data, and callers may pass their own specs.
    from jaxllm.agent.tools import TOOL_SPECS  # noqa: PLC0415 (layering: jaxllm.agent sits above jaxllm.data)

    return TOOL_SPECS


def _resolve_tool(tool, specs: Mapping[str, dict]) -> dict:
    if isinstance(tool, Mapping):
        return dict(tool)
    name = TONGYI_TOOLS.get(tool, tool)
    if not isinstance(name, str) or name not in specs:
        allowed = sorted(set(TONGYI_TOOLS) | set(specs))
        raise ValueError(
            f"unknown tool {tool!r} for the Tongyi system prompt; allowed: {allowed}, or a schema dict"
        )
    return specs[name]


def _date_text(date) -> str:
    if date is None:
        return datetime.date.today().isoformat()
    if isinstance(date, datetime.date):
        return date.isoformat()
    try:
        return datetime.date.fromisoformat(date).isoformat()
    except (TypeError, ValueError):
        raise ValueError(f"date must be a datetime.date or 'YYYY-MM-DD', got {date!r}") from None


def tongyi_system_prompt(
    tools: Iterable | None = None,
    date: str | datetime.date | None = None,
    *,
    specs: Mapping[str, dict] | None = None,
    preamble: str = TONGYI_PREAMBLE,
) -> str:
    """Tongyi DeepResearch's system prompt: ``preamble``, a blank line, the ``# Tools`` block, a
    blank line, ``Current date: YYYY-MM-DD`` (today if ``date`` is None).

    ``tools``: short names (``TONGYI_TOOLS`` keys), agent tool names, or schema dicts; None means
    all five in Tongyi's order. Names resolve through ``specs`` (default: the agent's
    ``TOOL_SPECS``). Use the result as the system message and render with ``tools=None``.
    """
    specs = _default_specs() if specs is None else specs
    chosen = [_resolve_tool(t, specs) for t in (TONGYI_TOOLS if tools is None else tools)]
    if not chosen:
        raise ValueError("tongyi_system_prompt: give at least one tool")
    return f"{preamble}\n\n{tools_block(chosen)}\n\nCurrent date: {_date_text(date)}"
