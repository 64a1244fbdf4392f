"""1 device vs 8 virtual devices (fsdp x tensor = 4 x 2, data x expert = 2 x 4): same losses, params
sharded as the rules say, and a checkpoint restored onto a different mesh. Runs in a subprocess because
XLA_FLAGS must be set before JAX starts."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    flags = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )  # keeps the suite's -O0
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(HERE / "multidevice_script.py"), str(tmp / "w"), str(tmp / "tfds")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("mesh", ["fsdp4_tensor2", "data2_expert4"])
def test_same_loss_trajectory_as_one_device(result, mesh):
    one, many = np.array(result["one"]), np.array(result[mesh])
    assert len(one) == len(many) == 20
    rel = np.abs(many - one) / np.abs(one)
    assert rel.max() <= 1e-4, rel
    assert one[-1] < one[0]  # it trained


def test_params_sharded_as_rules_say(result):
    for mesh in ("fsdp4_tensor2", "data2_expert4"):
        specs = result[mesh + "_specs"]
        bad = {k: v for k, v in specs.items() if not v[0]}
        assert not bad, (mesh, bad)
    f = result["fsdp4_tensor2_specs"]
    assert f["['params']['embed']"][1:] == ["P('tensor', 'fsdp')", [[160, 8]]]
    assert f["['params']['block_0']['w1']"][1:] == ["P(None, 'fsdp', 'tensor')", [[4, 8, 16]]]
    assert f["['params']['block_0']['wq']"][1:] == ["P('fsdp', 'tensor')", [[8, 1, 8]]]
    e = result["data2_expert4_specs"]
    assert e["['params']['block_0']['w1']"][1:] == ["P('expert',)", [[1, 32, 32]]]
    # no fsdp/tensor on this mesh: the width is split FSDP-style over the expert axis alone
    assert e["['params']['embed']"][1:] == ["P(None, 'expert')", [[320, 8]]]


def test_checkpoint_restores_onto_a_different_mesh(result):
    assert result["restored_step"] == 20
    assert result["restored_equal"]
    assert all(v[0] for v in result["restored_specs"].values())
    assert result["restored_specs"]["['params']['block_0']['w2']"][1] == "P('expert',)"
    data_state = result["restored_data_state"]
    assert data_state["format"] == "jaxllm.packed_rows.v1" and data_state["batch_size"] == 8
    assert sorted(map(int, data_state["rows"])) == list(range(8))
    # every row's epoch, cursor and offset are where 20 batches take a fresh pipeline, and resuming
    # there gives its next batch
    rows = {r: [v["epoch"], v["cursor"], v["offset"]] for r, v in data_state["rows"].items()}
    assert rows == result["expected_rows"]
    assert result["resumed_batch_equal"]
    assert any(o for _, _, o in rows.values()) and any(c >= 8 or e for e, c, _ in rows.values())  # they moved


def test_batch_not_divisible_by_mesh_is_rejected(result):
    assert "must be divisible by the 4 batch shards" in result["indivisible_error"]
