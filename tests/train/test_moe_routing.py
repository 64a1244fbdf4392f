"""The Kimi MoE model on fsdp x tensor = 4 x 2 vs 1 device, at the *same* parameters: identical top-k routing
for every token, matching loss and gradients. This is the sharding guard that the loss-trajectory test
(test_multidevice.py, a tie-free test LM) cannot give for hard routing: the trajectories of two MoE runs
drift apart through near-tied routing decisions (docs/training.md, "Mesh and sharding rules"), so the
routing itself is compared here, at one point, where a sharding bug would show and rounding cannot."""

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_moe_same_params_same_routing_loss_and_grads_on_fsdp_tensor_mesh(tmp_path):
    flags = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )  # keeps the suite's -O0
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(HERE / "moe_routing_script.py"), "check", str(tmp_path / "tfds")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(lines[-1][len("RESULT ") :])
    assert "fsdp" in r["w1_spec"] and "tensor" in r["w1_spec"], r["w1_spec"]  # the experts really are sharded
    for layer, v in r["layers"].items():
        assert v["tokens"] == 8 * 32
        assert v["flips"] == 0, (layer, v)  # the same top-2 experts for every token
        assert v["input_rel"] < 1e-4, (layer, v)  # router inputs agree to float32 rounding
    assert r["loss_rel"] < 1e-5, r
    assert r["grad_rel"] < 1e-4, r
