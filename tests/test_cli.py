"""`jaxllm train|generate|plot` and `python -m jaxllm.train`: exit codes and one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm import cli

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
import tiny_lm  # noqa: E402

tiny_lm.register()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_args(workdir, data_dir, *extra):
    return [
        "train",
        "--workdir",
        str(workdir),
        "--steps",
        "3",
        "model=tiny_test",
        "seq_len=16",
        "batch_size=4",
        f"data_dir={data_dir}",
        "num_samples=0",
        "progress=false",
        *extra,
    ]


def test_train_and_plot(tmp_path, data_dir, capsys):
    assert cli.main(tiny_args(tmp_path / "w", data_dir)) == 0
    recs = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    assert cli.main(["plot", str(tmp_path / "w"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["learning_rate=1"], "unknown config field 'learning_rate'"),
        (["remat=sometimes"], "allowed values: none, full, dots"),
        (["dataset=files:/nonexistent/corpus.txt"], "dataset path '/nonexistent/corpus.txt' does not exist"),
        (["model_args.vocab_size=10"], "smaller than the tokenizer's vocabulary"),
        (["model=gpt5"], "model_type 'gpt5' is not a known architecture"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, data_dir, capsys, extra, message):
    assert cli.main(tiny_args(tmp_path / "w", data_dir, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_nan_loss_exits_3_and_names_the_step(tmp_path, data_dir, capsys):
    rc = cli.main(tiny_args(tmp_path / "w", data_dir, "lr=1e25", "warmup_steps=0", "save_every=1"))
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "at step 2" in err and "last good checkpoint: step 1" in err


def test_module_entry_point_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.train", "--workdir", str(tmp_path), "bogus_field=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config field 'bogus_field'" in proc.stderr and "Traceback" not in proc.stderr


def test_subcommands_can_be_registered():
    cli.register_command(
        "hello",
        "say hello",
        lambda p: p.add_argument("--name", default="x"),
        lambda a: 7 if a.name == "y" else 0,
    )
    try:
        assert cli.main(["hello", "--name", "y"]) == 7
    finally:
        cli.COMMANDS.pop("hello")


def test_kimi_linear_train_samples_and_generate(tmp_path, data_dir, capsys):
    """The default model wiring: a 2-layer Kimi Linear (KDA + MLA, MoE), then `jaxllm generate`."""
    w = tmp_path / "kimi"
    args = [
        "train",
        "--config",
        str(ROOT / "configs" / "train_default.json"),
        "--workdir",
        str(w),
        "--steps",
        "2",
        "model_args.hidden_size=32",
        "model_args.num_hidden_layers=2",
        'model_args.layer_types=["kda","mla"]',
        'model_args.mlp_layer_types=["dense","moe"]',
        "model_args.kda_head_dim=16",
        "model_args.kv_lora_rank=16",
        "model_args.qk_nope_head_dim=16",
        "model_args.v_head_dim=16",
        "model_args.intermediate_size=32",
        "model_args.moe_intermediate_size=16",
        "seq_len=16",
        "batch_size=2",
        f"data_dir={data_dir}",
        "num_samples=1",
        "sample_tokens=4",
        "progress=false",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "--- sample 1 ---" in out
    assert os.path.isdir(w / "checkpoints" / "2")
    assert cli.main(["generate", "--workdir", str(w), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
