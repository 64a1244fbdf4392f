"""`jaxllm agent synth|eval`: delegation to the modules' mains, one-line errors, the real entry point."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm import cli
from jaxllm.agent import evaluate, protocol, synth, train
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig

ROOT = pathlib.Path(__file__).parents[2]


def _lines(path):
    return [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]


def test_synth_writes_the_records_synthesize_gives(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    rc = cli.main(
        [
            "agent",
            "synth",
            "--out",
            str(out),
            "--n",
            "5",
            "--seed",
            "3",
            "--hops",
            "1",
            "2",
            "--obfuscate-prob",
            "0.5",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(out), "n": 5, "seed": 3, "wiki_seed": 3}
    want = synth.synthesize(5, seed=3, hops=(1, 2), obfuscate_prob=0.5)
    assert _lines(out) == json.loads(json.dumps(want))
    assert {r["hops"] for r in _lines(out)} <= {1, 2}


def test_synth_held_out_set_with_wiki_seed_and_exclude(tmp_path, capsys):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    assert cli.main(["agent", "synth", "--out", str(train), "--n", "6", "--seed", "0"]) == 0
    assert (
        cli.main(
            [
                "agent",
                "synth",
                "--out",
                str(test),
                "--n",
                "6",
                "--seed",
                "1",
                "--wiki-seed",
                "0",
                "--exclude",
                str(train),
            ]
        )
        == 0
    )
    tr, te = _lines(train), _lines(test)
    assert all(r["wiki_seed"] == 0 for r in te) and all(r["seed"] == 1 for r in te)
    assert not {r["question"] for r in tr} & {r["question"] for r in te}
    want = synth.synthesize(
        6, seed=1, wiki=SimulatedWiki(WikiConfig(seed=0)), exclude={r["question"] for r in tr}
    )
    assert te == json.loads(json.dumps(want))


def test_eval_prints_the_metrics_evaluate_gives(tmp_path, capsys):
    gold = tmp_path / "gold.jsonl"
    preds = tmp_path / "preds.jsonl"
    recs = [
        {"question": "q1", "answer": "Paris"},
        {"question": "q2", "answer": "1871"},
        {"question": "q3", "answer": "the Crown"},
    ]
    gold.write_text("".join(json.dumps(r) + "\n" for r in recs))
    preds.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"question": "q1", "predictions": ["paris", "Lyon", "Paris."]},
                {"question": "q2", "predictions": ["1870", "1872", "x"]},
                {"question": "q3", "predictions": ["crown", "Crown", "a crown"]},
            ]
        )
    )
    assert cli.main(["agent", "eval", str(gold), str(preds), "--k", "1", "3"]) == 0
    got = json.loads(capsys.readouterr().out.strip())
    want = evaluate.evaluate_jsonl(str(gold), str(preds), ks=(1, 3))
    assert got == pytest.approx(want, nan_ok=True)
    assert got["n"] == 3 and got["pass@3"] == pytest.approx(2 / 3)
    assert got["em"] == pytest.approx((2 / 3 + 0 + 1) / 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["agent", "eval", "/nonexistent/gold.jsonl"], "/nonexistent/gold.jsonl"),
        (["agent", "synth", "--out", "OUT", "--n", "-1"], "n must be >= 0"),
        (["agent", "synth", "--out", "OUT", "--n", "2", "--obfuscate-prob", "1.5"], "obfuscate_prob"),
    ],
)
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
    p = subprocess.run(
        [*ENTRY, "agent", "synth", "--out", str(out), "--n", "2", "--seed", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert [r["question"] for r in _lines(out)] == [r["question"] for r in synth.synthesize(2, seed=4)]
    p = subprocess.run(
        [*ENTRY, "agent", "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert p.returncode == 0 and "synth" in p.stdout and "eval" in p.stdout


# ------------------------------------------------------------------------------------ sft / rl / run

TINY_MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "layer_types": ["kda", "mla"],
    "mlp_layer_types": ["dense", "dense"],
    "kda_num_heads": 2,
    "kda_head_dim": 16,
    "num_attention_heads": 2,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 0,
    "v_head_dim": 16,
    "intermediate_size": 64,
}
WIKI = '{"search_top_k": 1, "n_distractors": 1, "visit_top_k": 1, "max_queries": 1, "max_urls": 1}'


@pytest.fixture(scope="module")
def agent_runs(tmp_path_factory):
    """synth -> sft (2 steps) -> rl (1 step) through the CLI, once for the module's tests."""
    d = tmp_path_factory.mktemp("agent")
    cfg = d / "tiny.json"
    cfg.write_text(
        json.dumps(
            {
                "model": "kimi_linear",
                "model_args": TINY_MODEL,
                "tokenizer": "byte",
                "seq_len": 512,
                "batch_size": 2,
                "steps": 2,
                "warmup_steps": 1,
                "progress": False,
                "num_samples": 0,
                "async_checkpoints": False,
            }
        )
    )
    data = d / "train.jsonl"
    assert (
        cli.main(
            [
                "agent",
                "synth",
                "--out",
                str(data),
                "--n",
                "4",
                "--seed",
                "0",
                "--hops",
                "1",
                "--obfuscate-prob",
                "0",
                "--wiki",
                WIKI,
                "--system-prompt",
                "Use the tools.",
            ]
        )
        == 0
    )
    sft, rl = d / "sft", d / "rl"
    assert (
        cli.main(
            [
                "agent",
                "sft",
                "--data",
                str(data),
                "--workdir",
                str(sft),
                "--config",
                str(cfg),
                "--strip-think",
                "--max-turns",
                "2",
                "--turn-tokens",
                "12",
                "--token-budget",
                "512",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "agent",
                "rl",
                "--init",
                str(sft),
                "--data",
                str(data),
                "--workdir",
                str(rl),
                "--steps",
                "1",
                "--group",
                "2",
                "--questions-per-step",
                "1",
                "--rollout",
                "segmented",
            ]
        )
        == 0
    )
    return d, data, sft, rl


def test_synth_with_wiki_and_system_prompt_records_the_world(agent_runs):
    _, data, _, _ = agent_runs
    recs = _lines(data)
    assert all(r["wiki"] == {"seed": 0, **json.loads(WIKI)} for r in recs)
    assert all(r["trajectory"][0] == {"role": "system", "content": "Use the tools."} for r in recs)
    wiki = SimulatedWiki(WikiConfig(seed=0, **json.loads(WIKI)))
    want = synth.synthesize(
        4, seed=0, hops=(1,), obfuscate_prob=0.0, wiki=wiki, system_prompt="Use the tools."
    )
    assert [r["trajectory"] for r in recs] == json.loads(json.dumps([w["trajectory"] for w in want]))
    assert protocol.parse_chat(protocol.render_chat(recs[0]["trajectory"])) == recs[0]["trajectory"]


def test_sft_then_rl_write_workdirs(agent_runs, capsys):
    _, _, sft, rl = agent_runs
    for w in (sft, rl):
        assert (w / "run_config.json").exists() and (w / "agent.json").exists()
        assert any((w / "checkpoints").iterdir())
    s = train.load_settings(str(rl))
    assert s.system_prompt == "Use the tools." and s.wiki["search_top_k"] == 1 and s.turn_tokens == 12
    m = _lines(sft / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2] and all(r["tokens"] > 0 for r in m)
    (rec,) = _lines(rl / "metrics.jsonl")
    assert rec["step"] == 1 and 0 <= rec["reward"] <= 1 and rec["ratio_dev"] < 1e-3
    assert json.loads((rl / "run_config.json").read_text())["lr"] == 1e-4


def test_run_writes_predictions_and_trajectories(agent_runs, capsys):
    d, data, _, rl = agent_runs
    out = d / "preds.jsonl"
    capsys.readouterr()
    assert (
        cli.main(
            [
                "agent",
                "run",
                "--workdir",
                str(rl),
                "--data",
                str(data),
                "--out",
                str(out),
                "--limit",
                "3",
                "--batch-size",
                "2",
                "--rollout",
                "segmented",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    preds = _lines(out)
    assert summary["n"] == 3 and summary["scored"] == 3 and sum(summary["status"].values()) == 3
    assert 0 <= summary["em_ci95"][0] <= summary["em"] <= summary["em_ci95"][1] <= 1
    gold = _lines(data)[:3]
    assert [p["question"] for p in preds] == [g["question"] for g in gold]
    assert [p["answer"] for p in preds] == [g["answer"] for g in gold]
    for p in preds:
        assert p["trajectory"][0]["content"] == "Use the tools." and p["status"] in (
            "answered",
            "max_turns",
            "max_tokens",
            "tool_error",
        )
    # The predictions file is what `agent eval` reads.
    assert cli.main(["agent", "eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    assert (
        cli.main(
            [
                "agent",
                "run",
                "--workdir",
                str(rl),
                "--question",
                "What is the country of X?",
                "--rollout",
                "segmented",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["n"] == 1 and "prediction" in one and "em" not in one


def test_several_worlds_need_the_agents_world_named(agent_runs, tmp_path, capsys):
    _, _, sft, _ = agent_runs
    data = tmp_path / "worlds.jsonl"
    assert (
        cli.main(
            [
                "agent",
                "synth",
                "--out",
                str(data),
                "--n",
                "4",
                "--seed",
                "0",
                "--hops",
                "1",
                "--worlds",
                "2",
                "--obfuscate-prob",
                "0",
                "--wiki",
                WIKI,
                "--system-prompt",
                "Use the tools.",
            ]
        )
        == 0
    )
    recs = _lines(data)
    assert [(r["wiki_seed"], r["wiki"]["seed"]) for r in recs] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    w0 = tmp_path / "world0.jsonl"
    w0.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    capsys.readouterr()
    for argv, message in (
        (
            ["agent", "sft", "--data", str(data), "--workdir", str(tmp_path / "w")],
            "come from 2 worlds (wiki_seed 0, 1); name the one the agent acts in (--wiki-seed)",
        ),
        # the module's agent acts in world 0: world-1 questions are refused, not mis-scored
        (
            ["agent", "rl", "--init", str(sft), "--data", str(data), "--workdir", str(tmp_path / "r")],
            "RL questions come from world(s) 1, but the agent acts in world 0",
        ),
        (
            ["agent", "run", "--workdir", str(sft), "--data", str(data)],
            "questions come from world(s) 1, but the agent acts in world 0",
        ),
        (
            [
                "agent",
                "rl",
                "--init",
                str(sft),
                "--init-step",
                "999",
                "--data",
                str(w0),
                "--workdir",
                str(tmp_path / "r"),
            ],
            "no checkpoint step 999",
        ),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: agent ") and message in err, err
    # `run --wiki-seed` moves the agent to another world (same wiki config otherwise)
    w1 = tmp_path / "world1.jsonl"
    w1.write_text("".join(json.dumps(r) + "\n" for r in recs if r["wiki_seed"] == 1))
    out = tmp_path / "p1.jsonl"
    assert (
        cli.main(
            [
                "agent",
                "run",
                "--workdir",
                str(sft),
                "--data",
                str(w1),
                "--wiki-seed",
                "1",
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--rollout",
                "segmented",
            ]
        )
        == 0
    )
    assert [p["question"] for p in _lines(out)] == [r["question"] for r in recs[2:]]
    # named, the world is the one the single-world run trained for
    assert train.settings_from_records(recs, None, world=0).wiki == train.load_settings(str(sft)).wiki


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["agent", "sft", "--data", "/nonexistent.jsonl", "--workdir", "W"],
            "/nonexistent.jsonl: no such file",
        ),
        (["agent", "sft", "--data", "NOTRAJ", "--workdir", "W"], "missing 'trajectory'"),
        (
            ["agent", "sft", "--data", "NOTRAJ", "--workdir", "W", "--config", "/nonexistent.json"],
            "does not exist",
        ),
        (["agent", "rl", "--init", "W", "--data", "NOTRAJ", "--workdir", "W2"], "not a training workdir"),
        (["agent", "run", "--workdir", "W", "--question", "q"], "not an agent workdir"),
        (["agent", "run", "--workdir", "W", "--data", "/nonexistent.jsonl"], "no such file"),
        (["agent", "run", "--workdir", "W", "--question", "q", "--temperature", "-1"], "--temperature"),
        (["agent", "synth", "--out", "OUT", "--n", "2", "--wiki", "[1]"], "--wiki must be a JSON object"),
        (["agent", "synth", "--out", "OUT", "--n", "2", "--wiki", '{"bogus": 1}'], "bogus"),
    ],
)
def test_train_and_run_user_errors(tmp_path, capsys, argv, message):
    notraj = tmp_path / "q.jsonl"
    notraj.write_text('{"question": "q", "answer": "a"}\n')
    subs = {
        "W": str(tmp_path / "w"),
        "W2": str(tmp_path / "w2"),
        "NOTRAJ": str(notraj),
        "OUT": str(tmp_path / "o.jsonl"),
    }
    argv = [subs.get(a, a) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: agent ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
