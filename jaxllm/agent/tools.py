"""Tool schemas of Tongyi DeepResearch, argument validation, and a dispatcher to observations.

The five tools keep the released names and argument shapes (a model trained on them expects
exactly these): ``search(query: string[])``, ``visit(url: string | string[], goal: string)``,
``PythonInterpreter`` (arguments ``{}``, code in ``<code>`` inside the call),
``google_scholar(query: string[])`` and ``parse_file(files: string[])``. Descriptions are ours.

``ToolExecutor`` maps a parsed action to the observation string the model sees next. It never
raises on model output: unknown tools, wrong argument types, a failing backend all become an
``Error: ...`` observation naming what was wrong. Backends are plain callables
``(arguments: dict, code: str | None) -> str``, so the simulated wiki, the sandbox, or real web
tools plug in the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

from jaxllm.agent import protocol, sandbox

__all__ = [
    "SEARCH",
    "VISIT",
    "PYTHON",
    "SCHOLAR",
    "PARSE_FILE",
    "TOOL_SPECS",
    "TOOL_NAMES",
    "validate_arguments",
    "validate_call",
    "ToolExecutor",
    "Observation",
    "python_backend",
    "file_backend",
]

_STR_ARRAY = {"type": "array", "items": {"type": "string"}, "minItems": 1}

SEARCH = {
    "name": "search",
    "description": "Search the web. Give one or more queries; each returns its top results "
    "(title, URL, snippet).",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {**_STR_ARRAY, "description": "Queries to run; several complementary ones are fine."}
        },
        "required": ["query"],
    },
}
VISIT = {
    "name": "visit",
    "description": "Open one or more web pages and return the parts relevant to a goal.",
    "parameters": {
        "type": "object",
        "properties": {
            "url": {
                "type": ["string", "array"],
                "items": {"type": "string"},
                "minItems": 1,
                "description": "A URL or a list of URLs to open.",
            },
            "goal": {"type": "string", "description": "What information to look for on the pages."},
        },
        "required": ["url", "goal"],
    },
}
PYTHON = {
    "name": "PythonInterpreter",
    "description": "Run Python code in a sandbox and return what it prints. Arguments are {}; "
    "put the code after the JSON, inside the tool call, between <code> and "
    "</code>.",
    "parameters": {"type": "object", "properties": {}, "required": []},
}
SCHOLAR = {
    "name": "google_scholar",
    "description": "Search academic publications; one or more queries.",
    "parameters": {
        "type": "object",
        "properties": {"query": {**_STR_ARRAY, "description": "Academic search queries."}},
        "required": ["query"],
    },
}
PARSE_FILE = {
    "name": "parse_file",
    "description": "Read files the user provided, by file name.",
    "parameters": {
        "type": "object",
        "properties": {"files": {**_STR_ARRAY, "description": "Names of the files to read."}},
        "required": ["files"],
    },
}
TOOL_SPECS = {s["name"]: s for s in (SEARCH, VISIT, PYTHON, SCHOLAR, PARSE_FILE)}
TOOL_NAMES = tuple(TOOL_SPECS)
#: Tools whose code travels in ``<code>`` rather than in ``arguments``.
CODE_TOOLS = frozenset({"PythonInterpreter"})

_JSON_TYPES = {"string": str, "array": list, "object": dict, "boolean": bool, "null": type(None)}


def _type_ok(value, typ: str) -> bool:
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[typ])


def _json_type(value) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if _type_ok(value, name):
            return name
    return type(value).__name__


def _validate_value(value, schema: dict, where: str) -> list[str]:
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in types):
            return [f"{where} must be {' or '.join(types)}, got {_json_type(value)}"]
    errs: list[str] = []
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{where} needs at least {schema['minItems']} item(s), got {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                errs += _validate_value(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, str) and schema.get("minLength", 0) > len(value):
        errs.append(f"{where} must not be empty")
    return errs


def validate_arguments(spec: dict, arguments: dict) -> list[str]:
    """Errors of ``arguments`` against ``spec['parameters']`` (empty list when valid).

    Covers what the tool schemas use: required keys, no unknown keys, JSON types (a list of
    types allowed), ``items`` and ``minItems``.
    """
    params = spec["parameters"]
    props = params.get("properties", {})
    name = spec["name"]
    if not isinstance(arguments, dict):
        return [f"arguments of {name} must be an object, got {_json_type(arguments)}"]
    errs = [
        f"{name} is missing the required argument {k!r}"
        for k in params.get("required", [])
        if k not in arguments
    ]
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        allowed = ", ".join(repr(p) for p in props) or "none ({})"
        errs.append(f"{name} got unknown argument(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
    for key, sub in props.items():
        if key in arguments:
            errs += _validate_value(arguments[key], sub, f"{name}.{key}")
    return errs


def validate_call(call: protocol.ToolCall, specs: Mapping[str, dict] = TOOL_SPECS) -> list[str]:
    """Errors of a parsed call: unknown tool, bad arguments, code present/absent as required."""
    if call.name not in specs:
        return [f"unknown tool {call.name!r}; available tools: {', '.join(specs)}"]
    errs = validate_arguments(specs[call.name], call.arguments)
    if call.name in CODE_TOOLS:
        if call.code is None or not call.code.strip():
            errs.append(
                f"{call.name} needs its code between {protocol.CODE_OPEN} and "
                f"{protocol.CODE_CLOSE} inside the tool call, after the JSON"
            )
    elif call.code is not None:
        errs.append(f"{call.name} takes no {protocol.CODE_OPEN} block")
    return errs


@dataclasses.dataclass(frozen=True)
class Observation:
    """What goes back to the model. ``text`` is unwrapped (``protocol.wrap_tool_response`` adds
    the tags). ``error`` is True for parse/validation/backend errors. ``final`` is True for an
    Answer (no observation; ``text`` is the answer)."""

    text: str
    error: bool = False
    final: bool = False
    tool: str | None = None


Backend = Callable[[dict, "str | None"], str]


class ToolExecutor:
    """Dispatch parsed actions to backends; every failure becomes an error observation.

    Args:
      backends: tool name -> callable(arguments, code) -> observation text. Only tools with a
        backend are callable; the others answer "not available".
      specs: schemas to validate against (default: the released ones).
      max_observation_chars: longer observations are cut, with a note saying so.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        specs: Mapping[str, dict] = TOOL_SPECS,
        max_observation_chars: int = 20_000,
    ):
        unknown = sorted(set(backends) - set(specs))
        if unknown:
            raise ValueError(f"ToolExecutor: backends for unknown tools {unknown}; known: {sorted(specs)}")
        if max_observation_chars <= 0:
            raise ValueError("ToolExecutor: max_observation_chars must be positive")
        self.backends = dict(backends)
        self.specs = {k: specs[k] for k in specs if k in self.backends}
        self.max_observation_chars = max_observation_chars

    def tool_specs(self) -> list[dict]:
        """The specs of the tools this executor serves (for ``protocol.build_system_prompt``)."""
        return list(self.specs.values())

    def _cap(self, text: str) -> str:
        n = self.max_observation_chars
        if len(text) <= n:
            return text
        return text[:n] + f"\n[observation truncated: {len(text) - n} more characters]"

    def execute(self, action: protocol.Action) -> Observation:
        if isinstance(action, protocol.Answer):
            return Observation(text=action.text, final=True)
        if isinstance(action, protocol.ParseError):
            return Observation(protocol.error_observation(action.message), error=True)
        if not isinstance(action, protocol.ToolCall):
            return Observation(
                protocol.error_observation(f"internal: cannot execute {type(action).__name__}"), error=True
            )
        if action.name not in self.specs:
            if action.name in TOOL_SPECS:
                msg = f"tool {action.name!r} is not available here; available tools: {', '.join(self.specs)}"
            else:
                msg = f"unknown tool {action.name!r}; available tools: {', '.join(self.specs)}"
            return Observation(protocol.error_observation(msg), error=True, tool=action.name)
        errs = validate_call(action, self.specs)
        if errs:
            return Observation(protocol.error_observation("; ".join(errs)), error=True, tool=action.name)
        try:
            text = self.backends[action.name](action.arguments, action.code)
        except Exception as e:  # noqa: BLE001 - a backend failure is an observation, not a crash
            return Observation(
                protocol.error_observation(f"{action.name} failed: {type(e).__name__}: {e}"),
                error=True,
                tool=action.name,
            )
        if not isinstance(text, str):
            return Observation(
                protocol.error_observation(f"{action.name} returned {type(text).__name__}, not text"),
                error=True,
                tool=action.name,
            )
        return Observation(self._cap(text), tool=action.name)

    def step(self, assistant_text: str) -> Observation:
        """Parse one assistant turn and execute it."""
        return self.execute(protocol.parse_assistant(assistant_text))


def python_backend(**sandbox_kwargs) -> Backend:
    """A PythonInterpreter backend running the code with ``sandbox.run_python``."""

    def run(arguments: dict, code: str | None) -> str:
        return sandbox.format_observation(sandbox.run_python(code or "", **sandbox_kwargs))

    return run


def file_backend(root: str, max_chars: int = 20_000) -> Backend:
    """A parse_file backend for plain-text files directly under ``root`` (names only: no
    directories, no ``..``, no links out of ``root``)."""
    root_real = os.path.realpath(root)

    def read(arguments: dict, code: str | None) -> str:
        parts = []
        for name in arguments["files"]:
            if os.path.basename(name) != name or name in ("", ".", ".."):
                parts.append(f"[{name}] error: give a bare file name, not a path")
                continue
            path = os.path.realpath(os.path.join(root_real, name))
            if os.path.dirname(path) != root_real or not os.path.isfile(path):
                parts.append(f"[{name}] error: no such file")
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(max_chars + 1)
            if len(text) > max_chars:
                text = text[:max_chars] + "\n[file truncated]"
            parts.append(f"[{name}]\n{text}")
        return "\n=======\n".join(parts)

    return read
