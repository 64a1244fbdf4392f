"""Expert parallelism: tokens travel to the devices holding their experts and back (all-to-all).

The experts' stacked weights are split along the `expert` mesh axis (E/ep experts per device) and
the tokens along the mesh axes that shard the batch (`sharding.LOGICAL_AXIS_RULES`). Inside
`shard_map`, each device:

1. sorts its n*K (token, slot) assignments by expert; the experts of device d are
   [d*E/ep, (d+1)*E/ep), so the sort also groups them by destination;
2. packs them into a send buffer [ep, C, D]: slot c of row d is the c-th assignment bound for
   device d; assignments past the capacity C are dropped (counted, their output is 0);
3. `all_to_all` over `expert`: row s of the received [ep, C, D] holds what device s sent here;
4. runs its local experts on the received rows only (a grouped matmul: `ragged_dot` or the
   blocked sort: `moe.grouped_ffn`, passed in as `ffn`), empty slots excluded;
5. sends the outputs back with the inverse `all_to_all` and combines each token's K outputs with
   its routing weights (float32).

Capacity: `capacity_factor=None` is dropless (C = n*K, the worst case of every local assignment
bound for one device: exact, at ep times the buffer of an even load); a factor c gives
C = ceil(c * n*K / ep) (c = 1: an even share).

Exchange: "dense" (default) is the capacity-based `all_to_all` above, on every backend.
"ragged" (dropless only) sends each device's sorted assignments as one `jax.lax.ragged_all_to_all`
slice per destination, only the filled rows travel: the sizes go first (an `all_to_all` of the
[ep] counts), each receiver's offsets back to the senders, and the outputs return the same way
mirrored. Its receive buffer is still the static worst case (ep * n*K rows). XLA:CPU does not
implement `ragged_all_to_all` (UNIMPLEMENTED, jax 0.10.2 and 0.12), so the CPU tests run the
offset bookkeeping with `emulated_ragged_all_to_all` (all_gather + scatter, the primitive's
documented semantics) and the real primitive is checked by a TPU compile (libtpu AOT).

Routing stays outside (the router and its top-k are cheap and token-local); shared experts stay
dense in the caller. Weights enter replicated over every axis but `expert` and the axes of their
intermediate width (the `fsdp` all-gather happens at the `shard_map` boundary, the gradient's
reduce-scatter on the way out).

Tensor parallelism: the tokens are not split over `tensor` (the logical "mlp" axis's mesh axes),
so each tensor shard holds the same tokens; rather than all of them running the same experts on
them, every shard keeps its 1/tp of the experts' intermediate width (w1, w3 columns, w2 rows:
SwiGLU is elementwise in that width) and the partial outputs are summed over `tensor` (`psum`)
before the return trip. Without an expert axis (`token_parallel_moe`) the same split applies.
A width the tensor axes do not divide stays replicated (every shard runs it whole).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.sharding import LOGICAL_AXIS_RULES, logical_to_spec

EXPERT_AXIS = "expert"
EXCHANGES = ("dense", "ragged")


def token_axes(mesh, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split the flattened [B*T] tokens: the batch axes, then the length's."""
    table = dict(rules)
    axes = [a for a in (*table.get("batch", ()), *table.get("length", ())) if a in mesh.shape]
    return tuple(dict.fromkeys(a for a in axes if mesh.shape[a] > 1))


def inner_axes(mesh, inner_width: int, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split the experts' intermediate width: the logical "mlp" axis's,
    when they do not already split the tokens or the experts and their product divides the width;
    () otherwise (the width stays whole on every device)."""
    if mesh is None or getattr(mesh, "empty", False):
        return ()
    taken = {*token_axes(mesh, rules), EXPERT_AXIS}
    axes = tuple(
        a for a in dict(rules).get("mlp", ()) if a in mesh.shape and mesh.shape[a] > 1 and a not in taken
    )
    return axes if axes and inner_width % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def width_axes(mesh, num_experts: int, width: int, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes the experts' model width (logical "embed", beside the "expert" dim) is stored split
    over: FSDP's. Both shard_map bodies gather it themselves, inside the layer, so that under remat
    the gathered weights are gathered again for the backward instead of kept from the forward."""
    spec = logical_to_spec(("expert", "embed"), (num_experts, width), mesh, rules)
    entry = spec[1] if len(spec) > 1 else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _gathering_width(local, axes):
    """`local` (a per-device body taking x, weights, idx, w1, w3, w2) given expert weights whose
    width is split over `axes` (itself when there are none)."""
    if not axes:
        return local

    def body(x_nD, w_nK, idx_nK, w1_lDF, w3_lDF, w2_lFD):
        whole = lambda w, dim: jax.lax.all_gather(w, axes, axis=dim, tiled=True)  # noqa: E731
        return local(x_nD, w_nK, idx_nK, whole(w1_lDF, 1), whole(w3_lDF, 1), whole(w2_lFD, 2))

    return body


def _sum_over(y, axes):
    """`y` summed over the mesh `axes` (inside shard_map); `y` itself when there are none."""
    return jax.lax.psum(y, axes) if axes else y


def expert_parallel_size(mesh) -> int:
    """Size of the mesh's `expert` axis (1 when there is no mesh or no such axis)."""
    if mesh is None or getattr(mesh, "empty", False) or EXPERT_AXIS not in mesh.shape:
        return 1
    return int(mesh.shape[EXPERT_AXIS])


def capacity(n_assign: int, ep: int, capacity_factor: float | None) -> int:
    """Slots per (source, destination) device pair for `n_assign` local assignments."""
    if capacity_factor is None:
        return n_assign
    if not capacity_factor > 0:
        raise ValueError(f"moe capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
    return int(min(n_assign, max(1, math.ceil(capacity_factor * n_assign / ep))))


def can_shard(mesh, num_tokens: int, num_experts: int, rules=LOGICAL_AXIS_RULES) -> bool:
    """Whether `expert_parallel_moe` applies: an expert axis > 1 that divides the experts, and
    tokens that the token axes divide."""
    ep = expert_parallel_size(mesh)
    shards = math.prod(mesh.shape[a] for a in token_axes(mesh, rules)) if ep > 1 else 1
    return ep > 1 and num_experts % ep == 0 and num_tokens % shards == 0


def can_shard_tokens(mesh, num_tokens: int, rules=LOGICAL_AXIS_RULES) -> bool:
    """Whether `token_parallel_moe` applies: some token axis > 1, and it divides the tokens."""
    if mesh is None or getattr(mesh, "empty", False):
        return False
    axes = token_axes(mesh, rules)
    return bool(axes) and num_tokens % math.prod(mesh.shape[a] for a in axes) == 0


def token_parallel_moe(
    x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD, *, mesh, experts, rules=LOGICAL_AXIS_RULES
):
    """`experts(x, weights, idx, w1, w3, w2)` (e.g. `moe.moe_experts`) on each device's own tokens,
    for meshes without an expert axis: the weights' FSDP-split width is all-gathered inside the
    body (`width_axes`), their `tensor`-split width stays split. Without it, the dispatch's argsort over the token-sharded
    assignments makes XLA gather every device's assignments and run the whole batch's dispatch on
    each device (seen in the TPU compile: [262144, 2304] buffers for 8 x 4096 tokens x top-8)."""
    if not can_shard_tokens(mesh, idx_NK.shape[0], rules):
        raise ValueError(
            f"token_parallel_moe: needs token axes dividing the {idx_NK.shape[0]} tokens; mesh "
            f"{dict(mesh.shape)}, token axes {token_axes(mesh, rules)}"
        )
    tok = P(token_axes(mesh, rules))
    inner = inner_axes(mesh, w1_EDF.shape[-1], rules) or None
    wide = width_axes(mesh, w1_EDF.shape[0], w1_EDF.shape[1], rules)
    w_in, w_out = P(None, wide or None, inner), P(None, inner, wide or None)
    body = jax.shard_map(
        _gathering_width(lambda *a: _sum_over(experts(*a), inner), wide),
        mesh=mesh,
        in_specs=(tok, tok, tok, w_in, w_in, w_out),
        out_specs=tok,
    )
    return body(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD)


def _pack(idx_nK, experts_per_device: int, ep: int, cap: int):
    """Where each local assignment goes: (order, slot, keep). `order` sorts the flattened
    assignments by expert (stable: by token, then slot, within an expert); `slot` is the row of the
    sorted assignment in the flattened [ep*C] send buffer, ep*C (out of range) when dropped."""
    flat_e = idx_nK.reshape(-1)
    A = flat_e.shape[0]
    order = jnp.argsort(flat_e, stable=True)
    dest = flat_e[order] // experts_per_device
    count_d = jnp.bincount(dest, length=ep)
    start_d = jnp.cumsum(count_d) - count_d
    rank = jnp.arange(A) - start_d[dest]  # position among the assignments bound for the same device
    keep = rank < cap
    slot = jnp.where(keep, dest * cap + rank, ep * cap)
    return order, slot, keep


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` (one slice per device of `axis_name`) from `all_gather` and a
    scatter, for backends without the primitive (XLA:CPU): every device gathers every operand and
    writes the rows bound for it at the offsets their senders chose. O(ep) x the traffic: tests only."""
    del recv_sizes  # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    all_x = jax.lax.all_gather(operand, axis_name)  # [ep, M, ...]
    start_s = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # each sender's slice for me
    size_s = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    at_s = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    row = jnp.arange(operand.shape[0])[None, :]
    inside = (row >= start_s[:, None]) & (row < (start_s + size_s)[:, None])
    dest = jnp.where(inside, at_s[:, None] + row - start_s[:, None], output.shape[0])  # out of range: dropped
    return output.at[dest.reshape(-1)].set(all_x.reshape(-1, *operand.shape[1:]), mode="drop")


def _ragged_a2a(a2a, operand, output, in_off, send, out_off, recv):
    return a2a(operand, output, in_off, send, out_off, recv, axis_name=EXPERT_AXIS)


def _local_moe_ragged(x_nD, w_nK, idx_nK, w1_lDF, w3_lDF, w2_lFD, *, ffn, inner, a2a):
    """`_local_moe` with a dropless ragged exchange: only the filled rows travel (module docstring)."""
    n, K = idx_nK.shape
    D = x_nD.shape[-1]
    El = w1_lDF.shape[0]
    ep = jax.lax.axis_size(EXPERT_AXIS)
    tiled_a2a = lambda v: jax.lax.all_to_all(v, EXPERT_AXIS, 0, 0, tiled=True)  # noqa: E731
    flat_e = idx_nK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    e_sorted = flat_e[order]
    send = jnp.bincount(e_sorted // El, length=ep).astype(jnp.int32)  # rows for each device, in order
    in_off = jnp.cumsum(send) - send
    recv = tiled_a2a(send)  # recv[s]: rows device s sends here
    recv_off = jnp.cumsum(recv) - recv  # where they land here, by source
    out_off = tiled_a2a(recv_off)  # where my rows land on each destination
    R = ep * n * K  # worst case: every device sends all its rows here
    recv_x = _ragged_a2a(a2a, x_nD[order // K], jnp.zeros((R, D), x_nD.dtype), in_off, send, out_off, recv)
    recv_e = _ragged_a2a(a2a, e_sorted % El, jnp.full((R,), -1, jnp.int32), in_off, send, out_off, recv)
    y_r = _sum_over(ffn(recv_x, recv_e, w1_lDF, w3_lDF, w2_lFD), inner).astype(x_nD.dtype)
    back_off = tiled_a2a(in_off)  # where each source's rows for me started in its sorted order
    y_sorted = _ragged_a2a(a2a, y_r, jnp.zeros((n * K, D), x_nD.dtype), recv_off, recv, back_off, send)
    y_AD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    y_nD = jnp.einsum("nkd,nk->nd", y_AD.reshape(n, K, D).astype(jnp.float32), w_nK)
    return y_nD, jnp.zeros((), jnp.int32)


def _local_moe(x_nD, w_nK, idx_nK, w1_lDF, w3_lDF, w2_lFD, *, cap, ffn, axes, inner):
    """The per-device body (inside shard_map): returns (y_nD float32, dropped count of this device).
    `inner`: the mesh axes splitting the experts' width F (the partial outputs summed over them)."""
    n, K = idx_nK.shape
    D = x_nD.shape[-1]
    El = w1_lDF.shape[0]
    ep = jax.lax.axis_size(EXPERT_AXIS)
    order, slot, keep = _pack(idx_nK, El, ep, cap)
    x_sorted = x_nD[order // K]
    e_sorted = idx_nK.reshape(-1)[order] % El
    send_x = jnp.zeros((ep * cap, D), x_nD.dtype).at[slot].set(x_sorted, mode="drop")
    send_e = jnp.full((ep * cap,), -1, jnp.int32).at[slot].set(e_sorted, mode="drop")
    recv_x = jax.lax.all_to_all(send_x.reshape(ep, cap, D), EXPERT_AXIS, 0, 0)
    recv_e = jax.lax.all_to_all(send_e.reshape(ep, cap), EXPERT_AXIS, 0, 0).reshape(-1)
    y_r = _sum_over(ffn(recv_x.reshape(ep * cap, D), recv_e, w1_lDF, w3_lDF, w2_lFD), inner)
    back = jax.lax.all_to_all(y_r.astype(x_nD.dtype).reshape(ep, cap, D), EXPERT_AXIS, 0, 0)
    y_sorted = back.reshape(ep * cap, D).at[slot].get(mode="fill", fill_value=0)
    y_AD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    y_nD = jnp.einsum("nkd,nk->nd", y_AD.reshape(n, K, D).astype(jnp.float32), w_nK)
    dropped = jnp.sum(~keep).astype(jnp.int32)
    return y_nD, jax.lax.psum(dropped, axes) if axes else dropped


def expert_parallel_moe(
    x_ND,
    weights_NK,
    idx_NK,
    w1_EDF,
    w3_EDF,
    w2_EFD,
    *,
    mesh,
    ffn,
    capacity_factor: float | None = None,
    exchange: str = "dense",
    rules=LOGICAL_AXIS_RULES,
    ragged_all_to_all=jax.lax.ragged_all_to_all,
):
    """Expert-parallel `moe.moe_experts`: (y_ND float32, dropped assignments over all devices,
    int32). `ffn(x_RD, e_R, w1, w3, w2)` is the local grouped matmul over this device's experts
    (`moe.grouped_ffn`: rows with e_R < 0 are empty and give 0). `exchange`: "dense" (capacity
    all_to_all) or "ragged" (dropless `ragged_all_to_all`, the function passed in: the emulation
    on backends without it)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"moe expert exchange must be one of {EXCHANGES}, got {exchange!r}")
    if exchange == "ragged" and capacity_factor is not None:
        raise ValueError(
            f"moe exchange='ragged' is dropless: capacity_factor must be None, got {capacity_factor!r}"
        )
    E = w1_EDF.shape[0]
    N, K = idx_NK.shape
    if not can_shard(mesh, N, E, rules):
        raise ValueError(
            f"expert_parallel_moe: needs an 'expert' mesh axis > 1 dividing the {E} experts and token "
            f"axes dividing the {N} tokens; mesh {dict(mesh.shape)}, token axes {token_axes(mesh, rules)}"
        )
    axes = token_axes(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in axes)
    cap = capacity((N // shards) * K, expert_parallel_size(mesh), capacity_factor)
    tok = P(axes if axes else None)
    inner = inner_axes(mesh, w1_EDF.shape[-1], rules)
    wide = width_axes(mesh, E, w1_EDF.shape[1], rules)
    w_in, w_out = P(EXPERT_AXIS, wide or None, inner or None), P(EXPERT_AXIS, inner or None, wide or None)
    if exchange == "ragged":
        local = functools.partial(_local_moe_ragged, ffn=ffn, inner=inner, a2a=ragged_all_to_all)
    else:
        local = functools.partial(_local_moe, cap=cap, ffn=ffn, axes=axes, inner=inner)
    body = jax.shard_map(
        _gathering_width(local, wide),
        mesh=mesh,
        in_specs=(tok, tok, tok, w_in, w_in, w_out),
        out_specs=(tok, P()),
    )
    return body(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD)
