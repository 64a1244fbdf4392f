"""Two processes, the way a TPU pod runs: ``jax.distributed`` (coordinator on 127.0.0.1), 4 virtual CPU devices
each, one 8-device mesh (data x fsdp x tensor = 2 x 2 x 2, grad_accum 2).

20 steps uninterrupted; again in a fresh workdir, SIGKILL both processes mid-run (after a checkpoint),
start both again: the loss curve equals the uninterrupted 2-process run exactly and a 1-process 8-device
run within 1e-5; a copy of the killed run resumed by one process (8 devices) also matches within 1e-5.
Every process packs and checkpoints only its own rows; only process 0 logs and writes metrics.jsonl /
run_config.json. Every wait is bounded; leftover processes are killed."""

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from jaxllm.cli import _maybe_distributed
from jaxllm.data.sources import load_source

HERE = pathlib.Path(__file__).parent
SCRIPT = str(HERE / "multihost_script.py")
STEPS = 20
TIMEOUT_S = 240  # per run of the processes; a hang fails the test instead of stalling CI
STARTED: list = []  # every process this module started; the fixture kills any left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(nproc, workdir, data_dir, *extra):
    # The three 2-process runs compile the same programs: a persistent compilation cache shared by the runs
    # of this test saves two of the three compiles (the same executables either way).
    # Only process 0 writes cache entries (jax's rule), so process 1 compiles every time; LLVM -O0 halves that
    # compile (same flags in every run compared here).
    cache = pathlib.Path(data_dir).parent / "jax_cache"
    flags = f"--xla_force_host_platform_device_count={8 // nproc} --xla_backend_optimization_level=0"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=flags,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.pop("JAX_NUM_CPU_DEVICES", None)
    port = str(free_port())
    os.makedirs(workdir, exist_ok=True)
    procs = []
    for pid in range(nproc):
        out = open(os.path.join(workdir, f"stdout_{pid}.txt"), "a")
        err = open(os.path.join(workdir, f"stderr_{pid}.txt"), "a")
        procs.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, str(pid), str(nproc), port, workdir, data_dir, *extra],
                env=env,
                stdout=out,
                stderr=err,
            )
        )
        out.close()
        err.close()
    STARTED.extend(procs)
    return procs


def kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def read(path):
    return path.read_text() if path.exists() else ""


def tail(workdir, pid, name="stderr"):
    path = pathlib.Path(workdir) / f"{name}_{pid}.txt"
    return path.read_text()[-3000:] if path.exists() else ""


def finish(procs, workdir):
    """Waits for every process (bounded; when one fails, the others, stuck in a collective, are killed at
    once); returns each one's RESULT dict."""
    deadline = time.time() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            assert not failed, (
                f"process {failed[0]} exited {procs[failed[0]].returncode}:\n{tail(workdir, failed[0])}"
            )
            assert time.time() < deadline, f"run in {workdir} did not finish in {TIMEOUT_S}s:\n" + "\n".join(
                tail(workdir, i) for i in range(len(procs))
            )
            time.sleep(0.2)
    finally:
        kill(procs)
    results = []
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{tail(workdir, i)}"
        lines = [
            l
            for l in (pathlib.Path(workdir) / f"stdout_{i}.txt").read_text().splitlines()
            if l.startswith("RESULT ")
        ]
        assert lines, tail(workdir, i, "stdout")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def metrics(workdir):
    recs = [
        json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()
    ]
    return {r["step"]: r["loss"] for r in recs}, len(recs)


def finished_steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    data_dir = str(tmp / "tfds")
    load_source("stdlib", "train", data_dir=data_dir)  # prepared once, before processes read it concurrently
    out = {"tmp": tmp}
    try:
        _run_all(out, tmp, data_dir)
    finally:
        kill(STARTED)
    return out


def _run_all(out, tmp, data_dir):
    w = {name: str(tmp / name) for name in ("one", "two", "killed", "regrouped")}
    # Side by side: one process with 8 devices; two processes with 4 each, uninterrupted; and, once the
    # latter have compiled (so the new ones find process 0's programs in the cache), in a fresh workdir,
    # two processes that stop before step 13 (after the step-10 checkpoint) and are SIGKILLed there.
    one, two = start(1, w["one"], data_dir), start(2, w["two"], data_dir)
    deadline = time.time() + TIMEOUT_S
    while (
        "compiled train step" not in read(pathlib.Path(w["two"]) / "stdout_0.txt") and two[0].poll() is None
    ):
        assert time.time() < deadline, f"no compile within {TIMEOUT_S}s:\n{tail(w['two'], 0)}"
        time.sleep(0.1)
    procs = start(2, w["killed"], data_dir, "--hang-at", "13")
    try:
        deadline = time.time() + TIMEOUT_S
        while not (
            all(os.path.exists(os.path.join(w["killed"], f"hanging_{i}")) for i in range(2))
            and 10 in finished_steps(w["killed"])
        ):
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            assert not dead, (
                f"process {dead[0]} ended before it could be killed:\n{tail(w['killed'], dead[0])}"
            )
            assert time.time() < deadline, (
                f"no checkpoint and hang point within {TIMEOUT_S}s:\n{tail(w['killed'], 0)}"
            )
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        kill(procs)
    out["killed_at"] = (max(metrics(w["killed"])[0]), finished_steps(w["killed"]))
    # Resume with both processes; and a copy of the killed run with one process (8 devices) from the same files.
    shutil.copytree(w["killed"], w["regrouped"], ignore=shutil.ignore_patterns("stdout_*", "stderr_*"))
    resumed, regrouped = start(2, w["killed"], data_dir), start(1, w["regrouped"], data_dir)
    for name, procs in (("one", one), ("two", two), ("resumed", resumed), ("regrouped", regrouped)):
        out[name] = finish(procs, w["killed" if name == "resumed" else name])


def test_kill_and_resume_equals_uninterrupted_two_process_run_exactly(runs):
    ref, nref = metrics(runs["tmp"] / "two")
    assert (
        sorted(ref) == list(range(1, STEPS + 1)) and nref == STEPS
    )  # process 0 alone wrote it, once per step
    last_logged, ckpts = runs["killed_at"]
    assert last_logged == 12 and ckpts == [10], runs[
        "killed_at"
    ]  # killed mid-run, 2 steps after a checkpoint
    assert [r["start"] for r in runs["resumed"]] == [10, 10]
    got, n = metrics(runs["tmp"] / "killed")
    assert sorted(got) == list(range(1, STEPS + 1)) and n == STEPS
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]
    # Each process reports the same losses (replicated metrics).
    for res in (runs["two"], runs["resumed"]):
        assert res[0]["losses"] == res[1]["losses"]


def test_two_processes_match_one_process_on_eight_devices(runs):
    two, _ = metrics(runs["tmp"] / "two")
    one, _ = metrics(runs["tmp"] / "one")
    assert sorted(one) == list(range(1, STEPS + 1))
    diffs = [abs(two[s] - one[s]) for s in range(1, STEPS + 1)]
    assert max(diffs) <= 1e-5, diffs
    assert one[STEPS] < one[1]  # it trained


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    """The single process finds its rows in both processes' data files (process_<i>-of-2.json)."""
    one, _ = metrics(runs["tmp"] / "one")
    got, n = metrics(runs["tmp"] / "regrouped")
    assert runs["regrouped"][0]["start"] == runs["resumed"][0]["start"]
    assert sorted(got) == list(range(1, STEPS + 1)) and n == STEPS
    diffs = [abs(got[s] - one[s]) for s in range(1, STEPS + 1)]
    assert max(diffs) <= 1e-5, diffs


def test_each_process_packs_and_saves_only_its_own_rows(runs):
    rows = [set(r["rows"]) for r in runs["two"]]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(8))
    assert rows[0] != set(range(4))  # grad_accum 2: each process holds rows of both microbatches
    assert runs["one"][0]["rows"] == list(range(8))
    step_dir = runs["tmp"] / "two" / "checkpoints" / str(STEPS) / "data_state"
    saved = {p.name: json.loads(p.read_text()) for p in step_dir.glob("process_*.json")}
    assert sorted(saved) == ["process_0-of-2.json", "process_1-of-2.json"]
    for i in range(2):
        assert {int(r) for r in saved[f"process_{i}-of-2.json"]["rows"]} == rows[i]
    one_dir = runs["tmp"] / "one" / "checkpoints" / str(STEPS) / "data_state"
    assert [p.name for p in one_dir.glob("process_*.json")] == ["process_0-of-1.json"]


def test_only_process_zero_logs_and_writes_run_files(runs):
    for name in ("two", "killed"):
        w = runs["tmp"] / name
        assert (w / "run_config.json").exists()
        # (stdout also holds gloo's "[Gloo] Rank 1 is connected to N peer ranks" lines, interleaved at random)
        for phrase in ("mesh {", "model tiny_test", "compiled train step", "trained steps"):
            assert (
                phrase in (w / "stdout_0.txt").read_text() and phrase not in (w / "stdout_1.txt").read_text()
            )
        assert "resumed from" not in (w / "stdout_1.txt").read_text()
    assert "resumed from checkpoint step" in (runs["tmp"] / "killed" / "stdout_0.txt").read_text()


def test_distributed_flag_passes_process_count_and_id_from_the_environment(monkeypatch):
    """`--distributed` off a cluster JAX detects: JAX reads JAX_COORDINATOR_ADDRESS, jaxllm the other two."""

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAXLLM_DISTRIBUTED", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    _maybe_distributed(argparse.Namespace(distributed=False))
    assert calls == []
    _maybe_distributed(argparse.Namespace(distributed=True))
    assert calls == [{"num_processes": 2, "process_id": 1}]
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    monkeypatch.setenv("JAXLLM_DISTRIBUTED", "1")
    _maybe_distributed(argparse.Namespace())
    assert calls[-1] == {}  # TPU pods, SLURM, ...: jax finds everything itself
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(SystemExit, match="JAX_PROCESS_ID='one' is not allowed"):
        _maybe_distributed(argparse.Namespace())
