"""SIGKILL a training process mid-run, start it again: it resumes from the last checkpoint and the
remaining losses equal an uninterrupted run's (params, optimizer, step, RNG and data position restored)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).parent
SCRIPT = str(HERE / "resume_script.py")


def records(workdir):
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def losses(workdir):
    return {step: rec["loss"] for step, rec in records(workdir).items()}


@pytest.mark.parametrize("model", ["tiny", "moe"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, model):
    """moe: a Kimi MoE whose correction biases move every step (aux-loss-free balancing): the
    resumed run's biases, losses and expert loads equal the uninterrupted run's exactly."""
    data_dir = str(tmp_path / "tfds")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    flags = ["--moe"] if model == "moe" else []
    subprocess.run(
        [sys.executable, SCRIPT, ref_dir, data_dir, *flags],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ref = losses(ref_dir)
    assert sorted(ref) == list(range(1, 17))

    proc = subprocess.Popen(
        [sys.executable, SCRIPT, run_dir, data_dir, "--slow", *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = pathlib.Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        if proc.poll() is not None:
            raise AssertionError("training finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run_dir))
    assert 8 <= killed_at < 16

    done = subprocess.run(
        [sys.executable, SCRIPT, run_dir, data_dir, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_from = int(done.stdout.split("resumed from checkpoint step ")[1].split()[0])
    assert resumed_from % 3 == 0 and 6 <= resumed_from <= killed_at
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 17))
    for step in range(resumed_from + 1, 17):
        assert after[step] == ref[step], (step, after[step], ref[step])
    if model == "moe":
        final = lambda d: json.loads(pathlib.Path(d, "final_bias.json").read_text())  # noqa: E731
        assert final(run_dir) == final(ref_dir) and any(final(ref_dir))  # moved, and restored exactly
        loads = lambda d: {s: r["moe_max_mean_load"] for s, r in records(d).items()}  # noqa: E731
        assert loads(run_dir) == loads(ref_dir)
