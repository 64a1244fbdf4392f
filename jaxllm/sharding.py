"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ...) through
``flax.linen.with_logical_partitioning``. One table, ``LOGICAL_AXIS_RULES``, maps
each logical name onto zero or more mesh axes of a 5-axis mesh
(``data``, ``fsdp``, ``tensor``, ``expert``, ``context``). Everything else in the training
stack asks this module for ``NamedSharding``s; nothing else knows the rules.

Activations use the same table: ``batch``, ``length`` (the sequence: split over ``context``,
context parallelism), ``act_embed`` (the model width of activations: replicated, unlike the
``embed`` dim of weights that FSDP splits), ``heads``, ``expert``. ``constrain`` pins an
activation to its rule at layer boundaries when a mesh is set (``jax.set_mesh``).

The same code runs on one CPU device (every mesh axis has size 1), on N virtual
CPU devices, and multi-host after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")

# Logical axis -> mesh axes. A logical name missing from the table is replicated.
# The batch is split over every axis that does not shard model weights along the
# batch-independent dims: data-parallel replicas, FSDP shards, and the expert axis
# (expert parallelism doubles as data parallelism outside the MoE blocks).
# Weights (and so their gradients and optimizer moments) are split FSDP-style over every axis
# whose devices see different tokens except ``data`` (kept for replicas, e.g. across slices):
# ``context`` and ``expert`` too, else each context or expert group stores a whole copy.
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", ("context",)),
    ("act_embed", ()),
    ("embed", ("fsdp", "context", "expert")),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("kv", ()),
    ("expert", ("expert",)),
    ("kv_lora", ()),
    ("q_lora", ()),
    ("conv", ()),
    ("layers", ()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``-1`` in at most one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    context: int = 1

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.tensor, self.expert, self.context]
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh axis {name!r} has size {s}; allowed: a positive integer or -1 (fill)")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"cannot fill mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices is not a multiple of {fixed}"
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """Builds the 5-axis mesh (``data, fsdp, tensor, expert, context``) over all (global) devices."""
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = config.shape(len(devices))
    # Auto axes: jit's in/out shardings pin params and batch; XLA propagates the rest.
    return jax.make_mesh(
        shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    )


def _rules_dict(rules: Iterable[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        out[name] = tuple(axes)
    return out


def logical_to_spec(
    logical_names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules=LOGICAL_AXIS_RULES,
) -> P:
    """PartitionSpec for one array from its logical dim names.

    A mesh axis is used at most once per array (first dim wins), mesh axes of
    size 1 are dropped, and a dim is split over the longest prefix of its mesh axes that
    divides it evenly (none: replicated; ``unsharded_dims`` reports such dims).
    """
    if logical_names is None:
        return P()
    if len(logical_names) != len(shape):
        raise ValueError(f"logical names {tuple(logical_names)} do not match array rank {len(shape)}")
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_names, shape):
        axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1] if name else []
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        if not axes:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_boxed(x) -> bool:
    return isinstance(x, meta.Partitioned)


def logical_names_tree(boxed_tree) -> Any:
    """Tree (same structure as the unboxed tree) of logical-name tuples or None."""
    return jax.tree.map(lambda x: tuple(x.names) if _is_boxed(x) else None, boxed_tree, is_leaf=_is_boxed)


def unbox(boxed_tree):
    return meta.unbox(boxed_tree)


def tree_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a (possibly abstract) boxed param tree; unboxed leaves replicate."""

    def one(x):
        if _is_boxed(x):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=_is_boxed)


def unsharded_dims(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> list[str]:
    """Human-readable list of dims the rules would shard but that fell back to replication."""
    table = _rules_dict(rules)
    notes = []
    flat = jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=_is_boxed)[0]
    for path, x in flat:
        if not _is_boxed(x):
            continue
        spec = logical_to_spec(x.names, x.value.shape, mesh, rules)
        spec = tuple(spec) + (None,) * (len(x.names) - len(spec))
        for name, dim, s in zip(x.names, x.value.shape, spec):
            want = [a for a in table.get(name, ()) if mesh.shape[a] > 1] if name else []
            if want and s is None:
                notes.append(f"{jax.tree_util.keystr(path)} dim {name}={dim} (mesh {want})")
    return notes


def _path_key(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def match_shardings(
    tree, reference: Mapping[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]], mesh: jax.sharding.Mesh
):
    """Shardings for an arbitrary tree (e.g. optimizer state) by path-suffix match.

    ``reference`` maps a param path to (shape, sharding). A leaf whose path ends with
    a param path and has that param's shape gets the param's sharding (Adam moments);
    everything else (counters, scalars) is replicated.
    """

    def one(path, leaf):
        key = _path_key(path)
        shape = tuple(np.shape(leaf))
        for i in range(len(key)):
            hit = reference.get(key[i:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def path_index(tree, shardings) -> dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]]:
    """{param path: (shape, sharding)} for use with ``match_shardings``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {_path_key(p): (tuple(np.shape(x)), s) for (p, x), s in zip(leaves, shards)}


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def batch_spec(extra_leading: int = 0, rules=LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for a ``[*leading, batch, length]`` token array (rows over the batch axes, the
    sequence over the length's: ``context``)."""
    table = _rules_dict(rules)
    return P(*([None] * extra_leading), _spec_entry(table["batch"]), _spec_entry(table["length"]))


def context_size(mesh) -> int:
    """Size of the mesh's ``context`` axis (1 without a mesh or without that axis)."""
    if mesh is None or getattr(mesh, "empty", False) or "context" not in mesh.shape:
        return 1
    return int(mesh.shape["context"])


def constrain(x, logical_names: Sequence[str | None], rules=LOGICAL_AXIS_RULES):
    """``x`` pinned to the sharding its logical dim names give under the current mesh
    (``jax.set_mesh``); unchanged without a mesh, on a mesh without jaxllm's axis names, or where
    no named axis is > 1 (1 device). Dims the mesh does not divide stay unconstrained there."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if mesh.manual_axes:  # inside shard_map: the caller owns the layout
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_names, x.shape, mesh, rules))


def batch_shard_count(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> int:
    return math.prod(mesh.shape[a] for a in _rules_dict(rules)["batch"])


def describe(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> str:
    lines = [f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices"]
    for name, axes in _rules_dict(rules).items():
        lines.append(f"  {name:8s} -> {', '.join(axes) if axes else 'replicated'}")
    return "\n".join(lines)
