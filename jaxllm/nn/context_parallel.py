"""Context parallelism in the layers: the sequence split over the mesh's `context` axis.

Under a mesh with `context` > 1 (`jax.set_mesh`, as the train step does; the token batch sharded
`[batch axes, context]`), the layers run their sequence-mixing part inside `shard_map`, one
contiguous span of T/n tokens per device along `context`:

- KDA: the short convs take their `kernel_size - 1` tokens of halo from the previous span
  (`jaxllm.nn.conv.causal_conv_context`, a ppermute), then `pallas_kernels.kda.kda_context`
  passes span state transitions between devices;
- MLA: each device all-gathers the compressed latent KV (`kv_lora_rank + rope` per token) and the
  segment ids, expands per-head K/V and attends its span's queries at their offset
  (`attention(..., q_offset=)`), so causality and documents hold across spans.

Rows split over the mesh's batch axes and heads over `tensor` as the rules say
(`jaxllm.sharding`). Everything outside these parts (projections, norms, FFN) is left to XLA
with the activations constrained at layer boundaries.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as shd

CONTEXT_AXIS = "context"


def jaxllm_mesh():
    """The current mesh when it is jaxllm's (all of `sharding.MESH_AXES`), over > 1 device and not
    inside a `shard_map` already; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(shd.MESH_AXES) <= set(mesh.axis_names) or mesh.manual_axes:
        return None
    return mesh


def context_mesh():
    """The current mesh when it splits the sequence (its `context` axis > 1), else None."""
    mesh = jaxllm_mesh()
    return mesh if mesh is not None and mesh.shape[CONTEXT_AXIS] > 1 else None


def row_head_axes(mesh, batch: int, heads: int):
    """(rows entry, heads entry) of a PartitionSpec for `[B,T,H,*]` activations under `mesh`: the
    rules' mesh axes for `batch` and `heads` where they divide, else None (replicated)."""
    spec = tuple(shd.logical_to_spec(("batch", None, "heads"), (batch, 1, heads), mesh)) + (None,) * 3
    return spec[0], spec[2]


def token_specs(mesh, batch: int, heads: int, seq_len: int):
    """PartitionSpecs `(tokens [B,T,H,*], rows [B,T], heads-only weight entry)`; the sequence goes
    over `context` when the mesh has it > 1 (and it divides T)."""
    b, h = row_head_axes(mesh, batch, heads)
    n = mesh.shape[CONTEXT_AXIS]
    if n > 1 and seq_len % n:
        raise ValueError(
            f"context parallelism: the sequence length {seq_len} must be divisible by the mesh's "
            f"context axis ({n})"
        )
    t = CONTEXT_AXIS if n > 1 else None
    return P(b, t, h), P(b, t), h


def previous_span_tail(x_BT, n: int):
    """The last n tokens `[B,n,...]` of the previous span along `context` (zeros on span 0).
    Call inside `shard_map` over the `context` axis."""
    if x_BT.shape[1] < n:
        raise ValueError(
            f"context parallelism: a span of {x_BT.shape[1]} tokens is shorter than the {n} tokens of "
            "halo the short conv needs (use fewer context shards or a longer sequence)"
        )
    size = jax.lax.axis_size(CONTEXT_AXIS)
    tail = x_BT[:, x_BT.shape[1] - n :]
    return jax.lax.ppermute(tail, CONTEXT_AXIS, [(i, i + 1) for i in range(size - 1)])


def gather_sequence(x_BT):
    """The whole sequence `[B, n*T, ...]` from every span's `[B,T,...]` (inside `shard_map`)."""
    return jax.lax.all_gather(x_BT, CONTEXT_AXIS, axis=1, tiled=True)


def span_offset(span_len: int):
    """Position of this device's first token in the sequence (inside `shard_map`)."""
    return jax.lax.axis_index(CONTEXT_AXIS) * span_len
