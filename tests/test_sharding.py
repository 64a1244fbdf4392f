"""Logical-axis rules -> PartitionSpecs (single process; multi-device checks in tests/train)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as shd


class FakeMesh:
  """Only `.shape` is read by `logical_to_spec`."""

  def __init__(self, **sizes):
    self.shape = {a: sizes.get(a, 1) for a in shd.MESH_AXES}


def test_rules_map_logical_names_to_mesh_axes():
  mesh = FakeMesh(fsdp=4, tensor=2, expert=2)
  assert shd.logical_to_spec(("embed", "heads", "kv"), (32, 4, 8), mesh) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("vocab", "embed"), (320, 32), mesh) == P("tensor", "fsdp")
  assert shd.logical_to_spec(("expert", "embed", "mlp"), (4, 32, 64), mesh) == P("expert", "fsdp", "tensor")
  assert shd.logical_to_spec(("kv_lora",), (64,), mesh) == P()
  assert shd.logical_to_spec(None, (3,), mesh) == P()


def test_indivisible_dim_is_replicated_and_reported():
  mesh = FakeMesh(tensor=2)
  assert shd.logical_to_spec(("vocab", "embed"), (259, 32), mesh) == P()


def test_mesh_axis_used_once_per_array():
  mesh = FakeMesh(tensor=2)
  # Both dims want `tensor`; only the first gets it.
  assert shd.logical_to_spec(("heads", "mlp"), (4, 8), mesh) == P("tensor")


def test_size_one_axes_dropped():
  assert shd.logical_to_spec(("embed", "mlp"), (32, 64), FakeMesh()) == P()


def test_rank_mismatch_raises():
  with pytest.raises(ValueError, match="rank"):
    shd.logical_to_spec(("embed",), (2, 3), FakeMesh())


def test_mesh_config_shapes_and_errors():
  assert shd.MeshConfig().shape(8) == (8, 1, 1, 1)
  assert shd.MeshConfig(data=-1, fsdp=4, tensor=2).shape(8) == (1, 4, 2, 1)
  assert shd.MeshConfig(data=2, expert=4).shape(8) == (2, 1, 1, 4)
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
  assert shd.batch_spec(extra_leading=1) == P(None, ("data", "fsdp", "expert"), None)
  assert shd.batch_shard_count(mesh) == jax.device_count()


def test_match_shardings_by_path_suffix():
  import optax
  mesh = shd.make_mesh()
  params = {"params": {"w": np.zeros((4, 2), np.float32), "b": np.zeros((2,), np.float32)}}
  from jax.sharding import NamedSharding
  sh = {"params": {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}}
  opt = jax.eval_shape(optax.adam(1e-3).init, params)
  out = shd.match_shardings(opt, shd.path_index(params, sh), mesh)
  assert out[0].mu["params"]["w"].spec == P("fsdp")
  assert out[0].nu["params"]["w"].spec == P("fsdp")
  assert out[0].count.spec == P()
