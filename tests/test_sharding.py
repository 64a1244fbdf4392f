"""Logical-axis rules -> PartitionSpecs (single process; multi-device checks in tests/train), and a
checkpoint loaded onto 8 virtual devices by those rules (a subprocess: XLA_FLAGS must precede JAX)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as shd


class FakeMesh:
    """Only `.shape` is read by `logical_to_spec`."""

    def __init__(self, **sizes):
        self.shape = {a: sizes.get(a, 1) for a in shd.MESH_AXES}


def test_rules_map_logical_names_to_mesh_axes():
    mesh = FakeMesh(fsdp=4, tensor=2, expert=2)
    # weights' embed: FSDP over fsdp and the expert axis; an expert weight's expert dim takes `expert` first
    assert shd.logical_to_spec(("embed", "heads", "kv"), (32, 4, 8), mesh) == P(("fsdp", "expert"), "tensor")
    assert shd.logical_to_spec(("vocab", "embed"), (320, 32), mesh) == P("tensor", ("fsdp", "expert"))
    assert shd.logical_to_spec(("expert", "embed", "mlp"), (4, 32, 64), mesh) == P("expert", "fsdp", "tensor")
    assert shd.logical_to_spec(("kv_lora",), (64,), mesh) == P()
    assert shd.logical_to_spec(None, (3,), mesh) == P()


def test_indivisible_dim_is_replicated_and_reported():
    mesh = FakeMesh(tensor=2)
    assert shd.logical_to_spec(("vocab", "embed"), (259, 32), mesh) == P()


def test_dim_splits_over_the_longest_dividing_prefix_of_its_axes():
    mesh = FakeMesh(fsdp=2, context=4, expert=2)
    assert shd.logical_to_spec(("embed", "mlp"), (16, 8), mesh) == P(("fsdp", "context", "expert"))
    assert shd.logical_to_spec(("embed", "mlp"), (8, 8), mesh) == P(("fsdp", "context"))
    assert shd.logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P("fsdp")
    assert shd.logical_to_spec(("embed", "mlp"), (3, 8), mesh) == P()


def test_mesh_axis_used_once_per_array():
    mesh = FakeMesh(tensor=2)
    # Both dims want `tensor`; only the first gets it.
    assert shd.logical_to_spec(("heads", "mlp"), (4, 8), mesh) == P("tensor")


def test_activation_rules_split_the_sequence_over_context():
    mesh = FakeMesh(fsdp=2, tensor=2, context=4)
    # activations: rows over the batch axes, the sequence over context, width replicated
    assert shd.logical_to_spec(("batch", "length", "act_embed"), (4, 64, 32), mesh) == P("fsdp", "context")
    assert shd.logical_to_spec(("batch", "length", "heads", None), (4, 64, 2, 8), mesh) == P(
        "fsdp", "context", "tensor"
    )
    # weights are split over context too (each context shard would otherwise store a whole copy)
    assert shd.logical_to_spec(("embed", "heads", "kv"), (32, 4, 8), mesh) == P(("fsdp", "context"), "tensor")


def test_constrain_is_identity_without_a_mesh():
    x = np.ones((2, 4, 3), np.float32)
    assert shd.constrain(x, ("batch", "length", "act_embed")) is x


def test_size_one_axes_dropped():
    assert shd.logical_to_spec(("embed", "mlp"), (32, 64), FakeMesh()) == P()


def test_rank_mismatch_raises():
    with pytest.raises(ValueError, match="rank"):
        shd.logical_to_spec(("embed",), (2, 3), FakeMesh())


def test_mesh_config_shapes_and_errors():
    assert shd.MeshConfig().shape(8) == (8, 1, 1, 1, 1)
    assert shd.MeshConfig(data=-1, fsdp=4, tensor=2).shape(8) == (1, 4, 2, 1, 1)
    assert shd.MeshConfig(data=2, expert=4).shape(8) == (2, 1, 1, 4, 1)
    assert shd.MeshConfig(data=1, fsdp=2, context=4).shape(8) == (1, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="needs 6 devices"):
        shd.MeshConfig(data=3, tensor=2).shape(8)
    with pytest.raises(ValueError, match="not a multiple"):
        shd.MeshConfig(data=-1, tensor=3).shape(8)
    with pytest.raises(ValueError, match="fsdp"):
        shd.MeshConfig(fsdp=0).shape(8)


def test_make_mesh_single_device_and_batch_spec():
    mesh = shd.make_mesh()
    assert mesh.axis_names == shd.MESH_AXES
    assert mesh.devices.size == jax.device_count()
    assert shd.batch_spec(extra_leading=1) == P(None, ("data", "fsdp", "expert"), "context")
    assert shd.batch_shard_count(mesh) == jax.device_count()


def test_match_shardings_by_path_suffix():
    mesh = shd.make_mesh()
    params = {"params": {"w": np.zeros((4, 2), np.float32), "b": np.zeros((2,), np.float32)}}
    sh = {"params": {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}}
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    out = shd.match_shardings(opt, shd.path_index(params, sh), mesh)
    assert out[0].mu["params"]["w"].spec == P("fsdp")
    assert out[0].nu["params"]["w"].spec == P("fsdp")
    assert out[0].count.spec == P()


# Loads the tiny golden checkpoint twice, unsharded and onto fsdp x tensor x expert = 2 x 2 x 2 by the
# rules; prints, per param, its spec, one shard's shape, the device count, whether it got the sharding
# it was given and whether its values are the unsharded ones.
_LOAD_SHARDED = """
import json, sys
import jax
import numpy as np
import jaxllm
from jaxllm import sharding as shd

ckpt = sys.argv[1]
assert jax.device_count() == 8
mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
model, ref = jaxllm.load_hf_checkpoint(ckpt, kda_impl="recurrent")
boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32)))
want = shd.tree_shardings(boxed, mesh)
_, params = jaxllm.load_hf_checkpoint(ckpt, param_shardings=want["params"], kda_impl="recurrent")
flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
out = {}
for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
  out[jax.tree_util.keystr(path)] = [
      str(x.sharding.spec), list(x.addressable_shards[0].data.shape), len(x.sharding.device_set),
      x.sharding == flat_want[path], bool(np.array_equal(np.asarray(x), np.asarray(flat_ref[path])))]
print("RESULT " + json.dumps(out))
"""


def test_param_shardings_place_each_param():
    ckpt = pathlib.Path(__file__).parent / "golden" / "kimi_linear_tiny_hubcfg"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SHARDED, str(ckpt)], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert len(got) > 80
    for k, (_, _, n_dev, as_asked, same) in got.items():
        assert n_dev == 8 and as_asked and same, (k, got[k])
    # What the rules say, worked out by hand: embed -> fsdp x expert (the expert dim of an expert weight
    # takes `expert` first, leaving fsdp), vocab/heads/mlp -> tensor, expert -> expert, kv/kv_lora/conv
    # replicated; a dim the axis does not divide (MLA's 3 heads) is replicated.
    fe = "('fsdp', 'expert')"
    want = {
        "['params']['embed_tokens']": [f"P('tensor', {fe})", [150, 12]],  # vocab, embed
        "['params']['lm_head']": [f"P({fe}, 'tensor')", [12, 150]],  # embed, vocab
        "['params']['norm']['weight']": [f"P({fe},)", [12]],
        "['params']['layers_0']['mlp']['down_proj']": [f"P('tensor', {fe})", [48, 12]],  # mlp, embed
        "['params']['layers_0']['self_attn']['q_proj']": [
            f"P({fe}, 'tensor')",
            [12, 3, 8],
        ],  # embed, heads, kv
        "['params']['layers_0']['self_attn']['o_proj']": [f"P('tensor', None, {fe})", [3, 8, 12]],
        "['params']['layers_0']['self_attn']['q_conv']": ["P(None, 'tensor')", [4, 3, 8]],  # conv, heads, kv
        "['params']['layers_1']['moe']['w1']": ["P('expert', 'fsdp', 'tensor')", [3, 24, 12]],
        "['params']['layers_1']['moe']['w2']": ["P('expert', 'tensor', 'fsdp')", [3, 12, 24]],
        "['params']['layers_1']['moe']['router']": [f"P({fe},)", [12, 6]],
        "['params']['layers_1']['moe']['e_score_correction_bias']": ["P()", [6]],
        "['params']['layers_3']['self_attn']['kv_b_proj']": ["P()", [12, 3, 20]],  # kv_lora, 3 heads, kv
        "['params']['layers_3']['self_attn']['o_proj']": [f"P(None, None, {fe})", [3, 8, 12]],
    }
    assert {k: got[k][:2] for k in want} == want
