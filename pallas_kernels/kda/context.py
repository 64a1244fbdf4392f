"""KDA with context parallelism: the sequence split into contiguous spans over a mesh axis.

Call `kda_context` inside `jax.shard_map` (or anywhere `axis_name` is bound) on each device's span
`[B, T/n, H, *]`; span i of the axis holds tokens i*T/n .. (i+1)*T/n - 1 of every row.

Why it works: the KDA step is affine in the state, so a span maps its incoming state S_in [K,V]
(per row and head) to

    S_out = A S_in + B              A [K,K], B [K,V]
    o_t   = o0_t + c_t S_in         o0_t the output from S_in = 0, c_t [K] (q_t read through A_t)

One chunk-op pass over the span with values `[v | 0]` (V + K wide) and initial state `[0 | I]`
yields all four: its final state is `[B | A]` and its output is `[o0 | c]` (the identity carries
"how the state depends on S_in" through the same arithmetic as the state itself). The spans'
(A, B) are all-gathered (K*(K+V) floats per row and head: independent of T) and every device runs
the n-step scan S_in(i+1) = A_i S_in(i) + B_i, then finishes its outputs with its own S_in. No
recompute pass, one collective; gradients come from JAX through the chunk op's custom VJP and the
all-gather (its transpose is a reduce-scatter).

Segment ids are change points: a span whose first token's id differs from the previous span's
last token's starts a new document, so its S_in is zero; inside a span the chunk op resets as
usual (and A is zero after a reset, since the identity is reset with the state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# the package, not its `kda` name: the package's __init__ imports this module before defining kda
import pallas_kernels.kda as kda_api
from pallas_kernels.kda.common import validate_inputs


def span_transition(
    q, k, v, g, beta, *, scale=None, segment_ids=None, use_qk_l2norm=False, impl="chunk", interpret=False
):
    """A span's affine map of its incoming state: `(o0 [B,T,H,V], c [B,T,H,K], A [B,H,K,K], B [B,H,K,V])`.

    `o = o0 + einsum("bthk,bhkv->bthv", c, S_in)` and `S_out = A @ S_in + B` per row and head."""
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    v_aug = jnp.concatenate([v, jnp.zeros((Bsz, T, H, K), v.dtype)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (Bsz, H, K, K))
    h0_aug = jnp.concatenate([jnp.zeros((Bsz, H, K, V), jnp.float32), eye], axis=-1)
    o_aug, fin = kda_api.kda(
        q,
        k,
        v_aug,
        g,
        beta,
        scale=scale,
        initial_state=h0_aug,
        output_final_state=True,
        use_qk_l2norm=use_qk_l2norm,
        impl=impl,
        segment_ids=segment_ids,
        interpret=interpret,
    )
    return o_aug[..., :V], o_aug[..., V:], fin[..., V:], fin[..., :V]


def incoming_states(a_nBHKK, b_nBHKV, reset_nB, h0_BHKV):
    """The state entering each of n spans, `[n,B,H,K,V]`, and the state after the last one.

    reset_nB: span j starts a new document (its incoming state is zero; never for span 0, whose
    incoming state is h0)."""

    def step(s, xs):
        a, b, reset = xs
        s = jnp.where(reset[:, None, None, None], 0.0, s)
        return jnp.einsum("bhkj,bhjv->bhkv", a, s) + b, s

    final, s_in = jax.lax.scan(step, h0_BHKV, (a_nBHKK, b_nBHKV, reset_nB))
    return s_in, final


def kda_context(
    q,
    k,
    v,
    g,
    beta,
    *,
    axis_name,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    use_qk_l2norm=False,
    impl="chunk",
    interpret=False,
):
    """KDA over a sequence split along mesh axis `axis_name` (call inside `shard_map`).

    Arguments are each device's span, as `pallas_kernels.kda.kda` takes them (`[B,T/n,H,*]`,
    segment ids `[B,T/n]`); `initial_state` `[B,H,K,V]` is the rows' state before the whole
    sequence (the same on every device). Returns `(o of the span, final state after the whole
    sequence or None)`; the final state is the same on every device. Packed varlen (`cu_seqlens`)
    is not taken: give segment ids."""
    validate_inputs(q, k, v, g, beta, initial_state, None, segment_ids)
    Bsz, _, H, K = q.shape
    V = v.shape[-1]
    o0, c, a, b = span_transition(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        segment_ids=segment_ids,
        use_qk_l2norm=use_qk_l2norm,
        impl=impl,
        interpret=interpret,
    )
    a_all = jax.lax.all_gather(a, axis_name)  # [n,B,H,K,K]
    b_all = jax.lax.all_gather(b, axis_name)
    n = a_all.shape[0]
    if segment_ids is None:
        reset = jnp.zeros((n, Bsz), bool)
    else:
        ends = jax.lax.all_gather(jnp.stack([segment_ids[:, 0], segment_ids[:, -1]]), axis_name)  # [n,2,B]
        first, last = ends[:, 0], ends[:, 1]
        prev_last = jnp.concatenate([first[:1], last[:-1]], axis=0)  # span 0 compares with itself
        reset = first != prev_last
    h0 = (
        jnp.zeros((Bsz, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    )
    s_in, final = incoming_states(a_all, b_all, reset, h0)
    mine = jax.lax.dynamic_index_in_dim(s_in, jax.lax.axis_index(axis_name), axis=0, keepdims=False)
    o = o0.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", c.astype(jnp.float32), mine)
    return o.astype(v.dtype), (final if output_final_state else None)
