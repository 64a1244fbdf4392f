import pytest

from jaxllm.agent import protocol as P
from jaxllm.agent import tools as T


def _call(name, args, code=None):
    return P.ToolCall(name, args, code=code)


def test_released_tool_names_and_argument_shapes():
    assert T.TOOL_NAMES == ("search", "visit", "PythonInterpreter", "google_scholar", "parse_file")
    assert T.SEARCH["parameters"]["properties"]["query"]["type"] == "array"
    assert T.VISIT["parameters"]["required"] == ["url", "goal"]
    assert T.PYTHON["parameters"]["properties"] == {}
    assert T.PARSE_FILE["parameters"]["required"] == ["files"]
    assert T.validate_call(_call("search", {"query": ["a", "b"]})) == []
    assert T.validate_call(_call("visit", {"url": "u", "goal": "g"})) == []
    assert T.validate_call(_call("visit", {"url": ["u"], "goal": "g"})) == []
    assert T.validate_call(_call("google_scholar", {"query": ["a"]})) == []
    assert T.validate_call(_call("parse_file", {"files": ["a.txt"]})) == []
    assert T.validate_call(_call("PythonInterpreter", {}, code="print(1)")) == []


@pytest.mark.parametrize(
    "call,msg",
    [
        (_call("search", {"query": "a"}), "search.query must be array, got string"),
        (_call("search", {"query": [True]}), "search.query[0] must be string, got boolean"),
        (_call("visit", {"url": ["u"], "goal": 3}), "visit.goal must be string, got integer"),
        (_call("visit", {"url": [], "goal": "g"}), "visit.url needs at least 1 item"),
        (_call("parse_file", {"files": None}), "parse_file.files must be array, got null"),
        (_call("PythonInterpreter", {"code": "x"}, code="print(1)"), "unknown argument(s) 'code'"),
        (_call("search", {"query": ["a"]}, code="print(1)"), "search takes no <code> block"),
        (_call("browse", {}), "unknown tool 'browse'"),
    ],
)
def test_validation_errors_name_the_problem(call, msg):
    errs = T.validate_call(call)
    assert errs and msg in "; ".join(errs)


def test_executor_turns_every_failure_into_an_error_observation():
    def broken(args, code):
        raise RuntimeError("backend down")

    ex = T.ToolExecutor({"search": broken, "visit": lambda a, c: 42})
    obs = ex.execute(_call("search", {"query": ["a"]}))
    assert obs.error and "search failed: RuntimeError: backend down" in obs.text
    obs = ex.execute(_call("visit", {"url": "u", "goal": "g"}))
    assert obs.error and "returned int" in obs.text
    obs = ex.execute(P.ParseError("bad"))
    assert obs.error and obs.text == "Error: bad"
    obs = ex.execute(P.Answer("x"))
    assert obs.final and obs.text == "x" and not obs.error
    assert [s["name"] for s in ex.tool_specs()] == ["search", "visit"]


def test_executor_truncates_long_observations():
    ex = T.ToolExecutor({"search": lambda a, c: "x" * 100}, max_observation_chars=10)
    obs = ex.execute(_call("search", {"query": ["a"]}))
    assert obs.text.startswith("x" * 10) and "90 more characters" in obs.text


def test_executor_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown tools"):
        T.ToolExecutor({"browse": lambda a, c: ""})


def test_python_backend_runs_the_code_in_the_sandbox():
    ex = T.ToolExecutor({"PythonInterpreter": T.python_backend(timeout_s=5)})
    obs = ex.step(
        '<think>x</think><tool_call>{"name": "PythonInterpreter", "arguments": {}}'
        "<code>print(6 * 7)</code></tool_call>"
    )
    assert not obs.error and obs.text == "stdout:\n42\n"
    obs = ex.step(
        '<think>x</think><tool_call>{"name": "PythonInterpreter", "arguments": {}}'
        "<code>open('/etc/passwd').read()</code></tool_call>"
    )
    assert "error: " in obs.text and "root:" not in obs.text


def test_file_backend_reads_names_only(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    outside = tmp_path.parent / "outside_secret.txt"
    outside.write_text("TOPSECRET-CONTENT")
    try:
        (tmp_path / "link.txt").symlink_to(outside)
        ex = T.ToolExecutor({"parse_file": T.file_backend(str(tmp_path))})
        obs = ex.execute(
            _call("parse_file", {"files": ["a.txt", "../outside_secret.txt", "link.txt", "nope.txt"]})
        )
        assert "[a.txt]\nhello" in obs.text and "TOPSECRET" not in obs.text
        assert obs.text.count("error:") == 3
    finally:
        outside.unlink()
