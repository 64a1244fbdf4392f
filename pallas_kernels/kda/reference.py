"""KDA as its token-by-token recurrence (`lax.scan`): the ground truth and the decode step.

Per head, with state S [K,V] in float32:
    S <- exp(g_t)[:, None] * S;  d = beta_t (v_t - S^T k_t);  S <- S + k_t d^T;  o_t = S^T (scale q_t)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kda.common import default_scale, l2_normalize, segment_resets, validate_inputs


def kda_step(q_BHK, k_BHK, v_BHV, g_BHK, beta_BH, state_BHKV, *, scale, use_qk_l2norm=False):
    """One token of KDA for a batch: returns (o_BHV float32, new state_BHKV float32).

    This is the decode step: q/k/v/g/beta of the new token and the running state.
    """
    f32 = jnp.float32
    q, k = q_BHK.astype(f32), k_BHK.astype(f32)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    s = jnp.exp(g_BHK.astype(f32))[..., None] * state_BHKV.astype(f32)
    pred_BHV = jnp.einsum("bhk,bhkv->bhv", k, s)
    delta_BHV = beta_BH.astype(f32)[..., None] * (v_BHV.astype(f32) - pred_BHV)
    s = s + k[..., :, None] * delta_BHV[..., None, :]
    o_BHV = jnp.einsum("bhk,bhkv->bhv", q * scale, s)
    return o_BHV, s


def kda_recurrent(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    segment_ids=None,
    use_qk_l2norm=False,
):
    """Reference KDA over a sequence (same contract as `pallas_kernels.kda.kda`)."""
    n_seq = validate_inputs(q, k, v, g, beta, initial_state, cu_seqlens, segment_ids)
    scale = default_scale(q, scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = (
        jnp.zeros((n_seq, H, K, V), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )

    t_idx = jnp.arange(T)
    if cu_seqlens is not None:
        cu = cu_seqlens.astype(jnp.int32)
        seq_of_t = jnp.clip(jnp.searchsorted(cu[1:], t_idx, side="right"), 0, n_seq - 1)
        reset_BT = (t_idx == cu[seq_of_t])[None]
        ends_T = t_idx == cu[seq_of_t + 1] - 1
        state0 = jnp.zeros((1, H, K, V), jnp.float32)
    else:
        seq_of_t = jnp.zeros((T,), jnp.int32)
        reset_BT = jnp.zeros((B, T), bool) if segment_ids is None else segment_resets(segment_ids)
        ends_T = jnp.zeros((T,), bool)
        state0 = h0

    def step(carry, xs):
        state, finals = carry
        q_t, k_t, v_t, g_t, b_t, reset_B, seq, is_end = xs
        fresh = h0[seq][None] if cu_seqlens is not None else jnp.zeros_like(state)
        state = jnp.where(reset_B[:, None, None, None], fresh, state)
        o_t, state = kda_step(q_t, k_t, v_t, g_t, b_t, state, scale=scale, use_qk_l2norm=use_qk_l2norm)
        if cu_seqlens is not None:
            finals = finals.at[seq].set(jnp.where(is_end, state[0], finals[seq]))
        return (state, finals), o_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = (
        time_major(q),
        time_major(k),
        time_major(v),
        time_major(g),
        time_major(beta),
        time_major(reset_BT),
        seq_of_t,
        ends_T,
    )
    (state, finals), o_TBHV = jax.lax.scan(step, (state0, h0), xs)
    o = jnp.moveaxis(o_TBHV, 0, 1).astype(v.dtype)
    final = finals if cu_seqlens is not None else state
    return o, (final if output_final_state else None)
