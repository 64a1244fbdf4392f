"""Context parallelism end to end: a tiny Kimi Linear train step (loss and every gradient) on 8
virtual CPU devices with the sequence split over `context` (context=8, and fsdp=2 x context=4)
equals one device's, with packed documents crossing the span boundaries (subprocess:
context_parallel_script.py). The KDA layers run `impl="recurrent"` inside the context-parallel
path to keep the compile short; the chunk op under context parallelism is checked in
tests/kernels/test_kda_context.py."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def _run_on_8_cpu_devices(*args):
    """`python *args` from the repository root with 8 virtual CPU devices (XLA_FLAGS must precede JAX)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    return subprocess.run(
        [sys.executable, *args], cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900
    )


def test_train_step_with_context_parallelism_matches_one_device():
    proc = _run_on_8_cpu_devices(str(HERE / "context_parallel_script.py"), "recurrent", "128")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    print(got)
    for name in ("context8", "fsdp2_context4"):
        r = got[name]
        assert r["batch_spec"].endswith("'context')"), r  # the tokens really were split over context
        assert r["all_gather"] and r["ppermute"], r  # MLA's latent all-gather, the conv halo
        assert r["loss_err"] <= 1e-5, r
        assert r["grad_err_global"] <= 1e-5, r  # all gradients together, rms-relative
        # per parameter: float32 sums in another order (sharded) reach ~1e-5 on the smallest ones
        assert r["grad_err"] <= 2e-5, r


def test_cli_trains_a_32k_sequence_split_over_8_context_shards(tmp_path):
    """`jaxllm train seq_len=32768 mesh_context=8` on 8 virtual CPU devices: two steps of a small-width
    Kimi Linear (3 KDA + 1 MLA layer, MoE), 4,096 tokens per device; the loss is finite and falls."""
    widths = dict(
        hidden_size=32,
        kda_num_heads=1,
        kda_head_dim=16,
        num_attention_heads=1,
        qk_nope_head_dim=16,
        v_head_dim=16,
        kv_lora_rank=16,
        intermediate_size=64,
        moe_intermediate_size=32,
    )
    args = [
        "--config",
        str(HERE.parents[1] / "configs" / "train_default.json"),
        "--workdir",
        str(tmp_path),
        "seq_len=32768",
        "mesh_context=8",
        "mesh_data=1",
        "batch_size=1",
        "steps=2",
        "warmup_steps=1",
        "num_samples=0",
        "save_every=1000",
        "progress=false",
        *(f"model_args.{k}={v}" for k, v in widths.items()),
    ]
    proc = _run_on_8_cpu_devices("-m", "jaxllm.cli", "train", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "'context': 8} over 8 devices" in proc.stdout, proc.stdout[-3000:]
    assert "batch 1 x 32768 tokens" in proc.stdout, proc.stdout[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["tokens"] > 32000 for m in steps)  # the whole packed sequence, not one span of it
    assert steps[1]["loss"] < steps[0]["loss"] < 10
