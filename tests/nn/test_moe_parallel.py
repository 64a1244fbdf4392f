"""Expert parallelism (`jaxllm.nn.moe_parallel`): all-to-all dispatch == the dense reference."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sharding as shd
from jaxllm.errors import ConfigError
from jaxllm.models import KimiLinear
from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.qwen import Qwen, QwenConfig
from jaxllm.nn.moe import MoE, grouped_ffn, moe_experts
from jaxllm.nn.moe_parallel import _pack, can_shard, capacity, expert_parallel_moe, token_axes

SCRIPT = pathlib.Path(__file__).with_name("moe_parallel_script.py")

# (mesh, capacity factor, local dispatch or "module"[, exchange]): dropless and capacity-limited
CASES = [
    [{"data": 1, "expert": 8}, None, "blocked"],
    [{"data": 2, "expert": 4}, None, "ragged"],
    [{"data": 1, "expert": 8}, 1.25, "ragged"],
    [{"data": 2, "expert": 4}, 1.0, "blocked"],
    [{"data": 1, "tensor": 2, "expert": 4}, 1.0, "ragged"],  # the experts' width split over tensor
    [{"data": 1, "tensor": 2, "expert": 4}, None, "blocked", "ragged"],  # ragged exchange (emulated)
    [{"data": 1, "fsdp": 2, "expert": 4}, None, "module"],
    [{"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}, None, "module"],
    [{"data": 1, "fsdp": 2, "expert": 2, "context": 2}, None, "module"],  # width gathered over fsdp x context
    [{"data": 1, "fsdp": 4, "tensor": 2}, None, "module"],  # no expert axis: token_parallel_moe
    [{"data": 2, "expert": 4}, 1.0, "train"],  # the loop's train step and its metrics record
]
DENSE = [i for i, c in enumerate(CASES) if c[2] != "train"]
TRAIN = CASES.index([{"data": 2, "expert": 4}, 1.0, "train"])


@pytest.fixture(scope="module")
def rows():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), json.dumps(CASES)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(got) == len(CASES), proc.stdout
    for row in got:
        print(json.dumps(row))
    return got


@pytest.mark.parametrize("i", DENSE, ids=["-".join(map(str, CASES[i])) for i in DENSE])
def test_expert_parallel_matches_dense(rows, i):
    """Outputs and gradients (x, routing weights, w1/w3/w2; for the module every param) within 1e-5
    of the one-device onehot reference with the dropped assignments' weights zeroed, the dropped
    count exactly the count worked out in numpy from the capacity, and under a `tensor` axis the
    experts' intermediate width split over it inside the shard_map."""
    row = rows[i]
    assert row["err_y"] < 1e-5 and row["err_grad"] < 1e-5, row
    assert row["ref_scale"] > 1.0, row  # the outputs are not trivially small
    assert row["dropped"] == row["expected_dropped"], row
    if CASES[i][1] is not None:
        assert row["dropped"] > 0, row  # the skewed router does overflow the capacity
    # with a tensor axis each shard runs 1/tp of every expert's width, not all of it again
    assert row["inner_width"] == row["full_width"] // CASES[i][0].get("tensor", 1), row
    if CASES[i][2] == "module":
        assert row["shard_map_ran"], row
        assert row["expert_parallel_ran"] == (CASES[i][0].get("expert", 1) > 1), row


def test_train_step_records_the_layers_drop_count(rows):
    """A train step with a capacity factor under `data=2 x expert=4`: the metrics.jsonl record's
    `moe/<layer>/dropped` is the layer's own dropped count (both microbatches) over its assignments,
    and some were dropped (random routing over 4 device pairs overflows an even share)."""
    row = rows[TRAIN]
    assert row["layer_dropped"] and all(n > 0 for n in row["layer_dropped"].values()), row
    for layer, n in row["layer_dropped"].items():
        assert row["record_dropped"][layer] == pytest.approx(n, abs=1e-3), row
    assert row["record_mean"] == pytest.approx(
        sum(row["layer_dropped"].values()) / len(row["layer_dropped"]) / row["assignments"]
    )


def test_capacity():
    assert capacity(64, 4, None) == 64  # dropless: every local assignment may go to one device
    assert capacity(64, 4, 1.0) == 16
    assert capacity(64, 4, 1.3) == 21  # ceil
    assert capacity(64, 4, 100.0) == 64
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        capacity(64, 4, 0.0)


def test_pack_slots_and_drops():
    # 2 devices x 2 experts each; capacity 2 per device pair
    idx = jnp.array([[0, 3], [1, 2], [0, 1], [3, 2]], jnp.int32)
    order, slot, keep = _pack(idx, 2, 2, 2)
    flat = np.asarray(idx).reshape(-1)
    np.testing.assert_array_equal(flat[np.asarray(order)], [0, 0, 1, 1, 2, 2, 3, 3])
    # device 0 gets experts 0,0,1,1 (ranks 0..3): the last two dropped; same for device 1
    np.testing.assert_array_equal(np.asarray(keep), [True, True, False, False] * 2)
    np.testing.assert_array_equal(np.asarray(slot), [0, 1, 4, 4, 2, 3, 4, 4])


@pytest.mark.parametrize("dispatch", ["ragged", "blocked", "gather", "onehot"])
def test_grouped_ffn_empty_rows(dispatch):
    """Rows with expert -1 (empty receive slots) give 0 and leave the others as each row's expert."""
    rng = np.random.default_rng(0)
    R, D, F, E = 24, 8, 6, 4
    x = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(E, F, D)), jnp.float32)
    e = jnp.asarray(rng.integers(-1, E, size=R), jnp.int32)
    y = grouped_ffn(x, e, w1, w3, w2, dispatch=dispatch)
    valid = np.asarray(e) >= 0
    ref = moe_experts(x, jnp.ones((R, 1)), jnp.maximum(e, 0)[:, None], w1, w3, w2, dispatch="onehot")
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(ref)[valid], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(y)[~valid] == 0)


def test_not_shardable_is_refused_clearly():
    mesh = shd.make_mesh(shd.MeshConfig(data=1), devices=jax.devices()[:1])
    assert token_axes(mesh) == ()
    assert not can_shard(mesh, 8, 4)
    x = jnp.zeros((8, 4))
    w = jnp.zeros((4, 4, 2))
    with pytest.raises(ValueError, match="needs an 'expert' mesh axis > 1"):
        expert_parallel_moe(
            x, jnp.ones((8, 1)), jnp.zeros((8, 1), jnp.int32), w, w, w.transpose(0, 2, 1), mesh=mesh, ffn=None
        )


def test_exchange_is_validated():
    mesh = shd.make_mesh(shd.MeshConfig(data=1), devices=jax.devices()[:1])
    x, w = jnp.zeros((8, 4)), jnp.zeros((4, 4, 2))
    args = (x, jnp.ones((8, 1)), jnp.zeros((8, 1), jnp.int32), w, w, w.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="exchange must be one of"):
        expert_parallel_moe(*args, mesh=mesh, ffn=None, exchange="sparse")
    with pytest.raises(ValueError, match="'ragged' is dropless: capacity_factor must be None"):
        expert_parallel_moe(*args, mesh=mesh, ffn=None, exchange="ragged", capacity_factor=1.0)


def test_capacity_factor_config_is_validated():
    tiny = pathlib.Path(__file__).parents[2] / "configs" / "tiny.json"
    assert KimiLinearConfig.from_file(tiny, moe_capacity_factor=1.25).moe_capacity_factor == 1.25
    assert KimiLinearConfig.from_file(tiny).moe_capacity_factor is None  # dropless by default
    with pytest.raises(ConfigError, match="moe_capacity_factor: must be > 0"):
        KimiLinearConfig.from_file(tiny, moe_capacity_factor=0.0)


def test_expert_exchange_config_reaches_every_moe_layer():
    """`moe_expert_exchange` is validated and handed to each MoE block (Kimi and Qwen configs)."""
    tiny = KimiLinearConfig.from_file(pathlib.Path(__file__).parents[2] / "configs" / "tiny.json")
    qwen_json = (
        pathlib.Path(__file__).parents[1] / "golden" / "qwen_family" / "qwen3_moe_tiny" / "config.json"
    )
    qwen = QwenConfig.from_hf_config(json.loads(qwen_json.read_text()))
    for cfg, model_cls in ((tiny, KimiLinear), (qwen, Qwen)):
        with pytest.raises(ConfigError, match="moe_expert_exchange"):
            cfg.replace(moe_expert_exchange="sparse")
        with pytest.raises(ConfigError, match="'ragged' is dropless"):
            cfg.replace(moe_expert_exchange="ragged", moe_capacity_factor=1.0)
        seen = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, MoE):
                seen.append(context.module.expert_exchange)
            return next_fun(*args, **kwargs)

        model = model_cls(cfg.replace(moe_expert_exchange="ragged"))
        with nn.intercept_methods(record):
            jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
        assert seen and set(seen) == {"ragged"}, (model_cls, seen)
