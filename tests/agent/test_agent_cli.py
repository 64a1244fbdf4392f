"""`jaxllm agent synth|eval`: delegation to the modules' mains, one-line errors, the real entry point."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm import cli
from jaxllm.agent import evaluate, synth
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig

ROOT = pathlib.Path(__file__).parents[2]


def _lines(path):
    return [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]


def test_synth_writes_the_records_synthesize_gives(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    rc = cli.main(["agent", "synth", "--out", str(out), "--n", "5", "--seed", "3", "--hops", "1", "2",
                   "--obfuscate-prob", "0.5"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(out), "n": 5, "seed": 3, "wiki_seed": 3}
    want = synth.synthesize(5, seed=3, hops=(1, 2), obfuscate_prob=0.5)
    assert _lines(out) == json.loads(json.dumps(want))
    assert {r["hops"] for r in _lines(out)} <= {1, 2}


def test_synth_held_out_set_with_wiki_seed_and_exclude(tmp_path, capsys):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    assert cli.main(["agent", "synth", "--out", str(train), "--n", "6", "--seed", "0"]) == 0
    assert cli.main(["agent", "synth", "--out", str(test), "--n", "6", "--seed", "1", "--wiki-seed", "0",
                     "--exclude", str(train)]) == 0
    tr, te = _lines(train), _lines(test)
    assert all(r["wiki_seed"] == 0 for r in te) and all(r["seed"] == 1 for r in te)
    assert not {r["question"] for r in tr} & {r["question"] for r in te}
    want = synth.synthesize(6, seed=1, wiki=SimulatedWiki(WikiConfig(seed=0)),
                            exclude={r["question"] for r in tr})
    assert te == json.loads(json.dumps(want))


def test_eval_prints_the_metrics_evaluate_gives(tmp_path, capsys):
    gold = tmp_path / "gold.jsonl"
    preds = tmp_path / "preds.jsonl"
    recs = [{"question": "q1", "answer": "Paris"}, {"question": "q2", "answer": "1871"},
            {"question": "q3", "answer": "the Crown"}]
    gold.write_text("".join(json.dumps(r) + "\n" for r in recs))
    preds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "q1", "predictions": ["paris", "Lyon", "Paris."]},
        {"question": "q2", "predictions": ["1870", "1872", "x"]},
        {"question": "q3", "predictions": ["crown", "Crown", "a crown"]}]))
    assert cli.main(["agent", "eval", str(gold), str(preds), "--k", "1", "3"]) == 0
    got = json.loads(capsys.readouterr().out.strip())
    want = evaluate.evaluate_jsonl(str(gold), str(preds), ks=(1, 3))
    assert got == pytest.approx(want, nan_ok=True)
    assert got["n"] == 3 and got["pass@3"] == pytest.approx(2 / 3)
    assert got["em"] == pytest.approx((2 / 3 + 0 + 1) / 3)


@pytest.mark.parametrize("argv, message", [
    (["agent", "eval", "/nonexistent/gold.jsonl"], "/nonexistent/gold.jsonl"),
    (["agent", "synth", "--out", "OUT", "--n", "-1"], "n must be >= 0"),
    (["agent", "synth", "--out", "OUT", "--n", "2", "--obfuscate-prob", "1.5"], "obfuscate_prob"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "o.jsonl") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: agent ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_eval_malformed_jsonl_and_missing_prediction(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    assert cli.main(["agent", "eval", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"question": "q", "answer": "a"}\n')
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"question": "other", "prediction": "a"}\n')
    assert cli.main(["agent", "eval", str(gold), str(preds)]) == 2
    assert "no prediction for question 'q'" in capsys.readouterr().err


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["agent"])
    assert e.value.code == 2
    assert "synth" in capsys.readouterr().err


# What the `jaxllm` console script runs (pyproject: jaxllm = "jaxllm.cli:main"). Not `python -m jaxllm.cli`:
# there the plugin registers into the imported `jaxllm.cli`, not into `__main__`'s table.
ENTRY = [sys.executable, "-c", "import sys; from jaxllm.cli import main; sys.exit(main())"]


def test_installed_entry_point_runs_agent_synth(tmp_path):
    out = tmp_path / "t.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([*ENTRY, "agent", "synth", "--out", str(out), "--n", "2",
                        "--seed", "4"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [r["question"] for r in _lines(out)] == [r["question"] for r in synth.synthesize(2, seed=4)]
    p = subprocess.run([*ENTRY, "agent", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0 and "synth" in p.stdout and "eval" in p.stdout
