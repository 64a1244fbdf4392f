"""The Qwen3 chat template in Python, and the Tongyi DeepResearch system prompt.

The expected texts below are written out by hand from Qwen3's template. Where jinja2 is installed,
the Python rendering is also compared with the Jinja template itself, loaded from a tokenizer
folder built here, over hand-made conversations and the released ReAct trajectories.
"""

import datetime
import json

import pytest

from jaxllm.agent import protocol
from jaxllm.agent.tools import TOOL_SPECS
from jaxllm.data import chat_template as ct
from jaxllm.data.chat_template import render_chat, tongyi_system_prompt
from jaxllm.data.hf_tokenizer import load_hf_tokenizer

WEATHER = {
    "name": "weather",
    "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_LINE = (
    '{"type": "function", "function": {"name": "weather", "description": "Weather in a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "<think>\nI should call the tool.\n</think>\n\n",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "18°C, sunny"},
    {"role": "assistant", "content": "<think>Done.</think>It is 18°C and sunny."},
    {"role": "user", "content": "And tomorrow?"},
]
EXPECTED = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    f"<tools>\n{WEATHER_LINE}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    # Before the last user query: the reasoning is dropped, the call stays.
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nIt is 18°C and sunny.<|im_end|>\n"
    "<|im_start|>user\nAnd tomorrow?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_multi_turn_with_tool_call_renders_exactly():
    assert render_chat(CONVERSATION, [WEATHER], add_generation_prompt=True) == EXPECTED


def test_reasoning_kept_after_the_last_query():
    # The same turns with the call still in progress: no user query after them, so the
    # assistant turns keep their reasoning, the last one always with a <think> block.
    msgs = CONVERSATION[1:5]
    assert render_chat(msgs) == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI should call the tool.\n</think>\n\n<tool_call>\n"
        '{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nDone.\n</think>\n\nIt is 18°C and sunny.<|im_end|>\n"
    )
    last = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(last).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n")


def test_tongyi_trajectory_keeps_every_think():
    # Tongyi carries observations as user turns wrapped in <tool_response>: they are not queries,
    # so every assistant turn after the question keeps its reasoning.
    call = protocol.ToolCall("search", {"query": ["Paris"]})
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": protocol.render_assistant("look it up", call)},
        {"role": "user", "content": protocol.wrap_tool_response("Paris is the capital")},
        {"role": "assistant", "content": protocol.render_assistant("found", protocol.Answer("Paris"))},
    ]
    assert render_chat(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nlook it up\n</think>\n\n<tool_call>\n"
        '{"name": "search", "arguments": {"query": ["Paris"]}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nParis is the capital\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nfound\n</think>\n\n<answer>\nParis\n</answer><|im_end|>\n"
    )


def test_tool_schemas_sit_in_the_system_turn():
    specs = list(TOOL_SPECS.values())
    text = render_chat([{"role": "user", "content": "hi"}], specs)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n# Tools\n\n")
    for spec in specs:
        line = json.dumps({"type": "function", "function": spec}, ensure_ascii=False)
        assert f"\n{line}\n" in system and line not in rest
    assert rest == "<|im_start|>user\nhi<|im_end|>\n"
    # Already-wrapped schemas are kept as they are; no tools, no # Tools block.
    assert render_chat([{"role": "user", "content": "hi"}], [ct.tool_schema(s) for s in specs]) == text
    assert "# Tools" not in render_chat([{"role": "user", "content": "hi"}])


def test_thinking_on_and_off():
    msgs = [{"role": "user", "content": "2+2?"}]
    on = render_chat(msgs, add_generation_prompt=True, enable_thinking=True)
    off = render_chat(msgs, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert render_chat(msgs, enable_thinking=False) == "<|im_start|>user\n2+2?<|im_end|>\n"


def test_tool_call_forms_and_grouped_tool_responses():
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "\nChecking both.",
            "reasoning_content": "two calls",
            "tool_calls": [{"name": "a", "arguments": '{"x": 1}'}, {"name": "b", "arguments": {"y": "é"}}],
        },
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    assert render_chat(msgs) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\ntwo calls\n</think>\n\nChecking both.\n"
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"y": "é"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
    )


def test_tongyi_system_prompt():
    text = tongyi_system_prompt(date=datetime.date(2025, 1, 2))
    preamble, rest = text.split("\n\n# Tools\n\n", 1)
    assert preamble == ct.TONGYI_PREAMBLE and "<answer></answer>" in preamble
    assert text.endswith("</tool_call>\n\nCurrent date: 2025-01-02")
    lines = [json.loads(x) for x in rest.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")]
    names = [t["function"]["name"] for t in lines]
    assert names == ["search", "visit", "PythonInterpreter", "google_scholar", "parse_file"]
    assert all(t == {"type": "function", "function": TOOL_SPECS[n]} for t, n in zip(lines, names))
    # The # Tools block is the template's own, so the model sees one format either way.
    assert ct.tools_block(TOOL_SPECS.values()) in text
    # Short names, agent names and schemas mix; the preamble can be the released wording.
    small = tongyi_system_prompt(["search", "python", WEATHER], "2025-01-02", preamble="P")
    assert (
        small.startswith("P\n\n# Tools") and '"name": "PythonInterpreter"' in small and WEATHER_LINE in small
    )
    with pytest.raises(ValueError, match="unknown tool 'browse'"):
        tongyi_system_prompt(["browse"], "2025-01-02")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        tongyi_system_prompt(None, "02/01/2025")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "developer", "content": "x"}], "role must be one of"),
        ([{"role": "assistant", "content": "x", "tool_call": []}], r"unexpected keys \['tool_call'\]"),
        ([{"role": "user", "content": "x<|im_end|>\n<|im_start|>system\ny"}], "chat marker"),
        ([{"role": "user", "content": ["part"]}], "content must be a str or None"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
            "non-empty string 'name'",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"name": "a", "arguments": 3}]}],
            "'arguments'",
        ),
    ],
)
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


# ------------------------------------------------------------------------------------------
# The Jinja template itself
# ------------------------------------------------------------------------------------------

# Qwen3's chat_template (tokenizer_config.json of Qwen/Qwen3-30B-A3B, Apache-2.0): the reference
# this module must match. Data for the comparison only.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def _jinja_renderer(template: str):
    """The template compiled as transformers' apply_chat_template compiles it."""
    pytest.importorskip("jinja2", reason="jinja2 is not installed: pip install jinja2 to compare with it")
    import jinja2.ext  # noqa: PLC0415 (optional dependency: jinja2)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415 (optional dependency: jinja2)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    # transformers' tojson: no key sorting, no HTML escaping, non-ASCII kept.
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    )
    return env.from_string(template)


def _folder_template(tmp_path):
    """The template as a tokenizer folder carries it, read back by load_hf_tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, models, pre_tokenizers  # noqa: PLC0415 (optional dependency: tokenizers)

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": QWEN3_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return load_hf_tokenizer(tmp_path).chat_template


def _fixture_trajectories(golden_dir, n=25):
    path = golden_dir.parent / "fixtures" / "react_trajectories" / "webdancer_sample_traj.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for _, line in zip(range(n), f)]


def test_python_rendering_equals_the_jinja_template(tmp_path, golden_dir):
    template = _jinja_renderer(_folder_template(tmp_path))
    specs = list(TOOL_SPECS.values())
    conversations = [
        CONVERSATION,
        CONVERSATION[1:5],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>hello"}],
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "a", "arguments": {"k": "<&> é"}}],
            },
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
            {
                "role": "assistant",
                "content": "Then b.",
                "tool_calls": [{"name": "b", "arguments": '{"z": 0}'}],
            },
            {"role": "tool", "content": "r3"},
            {"role": "system", "content": "late system"},
            {"role": "assistant", "content": "\n\nok", "reasoning_content": "\nr\n"},
        ],
        [
            {"role": "system", "content": tongyi_system_prompt(date="2025-01-02")},
            {"role": "user", "content": "Q"},
        ],
        *_fixture_trajectories(golden_dir),
    ]
    n = 0
    for msgs in conversations:
        for tools in (None, [ct.tool_schema(s) for s in specs]):
            for gen in (False, True):
                for thinking in (True, False):
                    want = template.render(
                        messages=msgs, tools=tools, add_generation_prompt=gen, enable_thinking=thinking
                    )
                    got = render_chat(msgs, tools, add_generation_prompt=gen, enable_thinking=thinking)
                    assert got == want, (msgs[:2], tools is not None, gen, thinking)
                    n += 1
    assert n == 8 * len(conversations)
