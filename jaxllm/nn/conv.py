"""Short causal depthwise convolution with a decode state and segment resets.

Tap order (as in the checkpoints' `q_conv1d.weight [C,1,W]`): out[t] = sum_j w[j] * x[t-W+1+j]
(the last tap multiplies the current token), zero left padding. Our kernel layout is `w_W...`
(taps first, then the channel dims). The decode state holds the last W-1 inputs `state_BW1...`.
Under context parallelism (`causal_conv_context`) the previous span's last W-1 inputs are the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.nn.context_parallel import previous_span_tail
from pallas_kernels.kda.common import document_index


def causal_conv(x_BTC, w_WC, *, state_BSC=None, segment_ids_BT=None):
    """Depthwise causal conv over T. Channel dims may be several (`...` after T).

    x_BTC: [B,T,*C]; w_WC: [W,*C]; state_BSC: [B,W-1,*C] inputs that precede x (zeros if None);
    segment_ids_BT: [B,T] ints, taps never reach into an earlier segment (the state counts as part of
    the first segment of the row). A segment starts wherever the id differs from the previous
    token's, so a reused id is a new segment. Returns (y_BTC in x's dtype, new_state [B,W-1,*C])
    where the new state holds the last W-1 inputs of the current (last) segment, zeros before it.
    """
    W = w_WC.shape[0]
    B, T = x_BTC.shape[:2]
    chan = x_BTC.shape[2:]
    if w_WC.shape[1:] != chan:
        raise ValueError(f"causal_conv: kernel channels {w_WC.shape[1:]} != input channels {chan}")
    if state_BSC is None:
        state_BSC = jnp.zeros((B, W - 1) + chan, x_BTC.dtype)
    if state_BSC.shape != (B, W - 1) + chan:
        raise ValueError(f"causal_conv: state must be {(B, W - 1) + chan}, got {state_BSC.shape}")
    xp = jnp.concatenate([state_BSC.astype(x_BTC.dtype), x_BTC], axis=1)  # [B, W-1+T, *C]
    if segment_ids_BT is not None:
        if segment_ids_BT.shape != (B, T):
            raise ValueError(f"causal_conv: segment_ids must be {(B, T)}, got {segment_ids_BT.shape}")
        run_BT = document_index(segment_ids_BT)  # change points, not raw ids
        run_BP = jnp.concatenate([jnp.zeros((B, W - 1), jnp.int32), run_BT], axis=1)
    bcast = (slice(None), slice(None)) + (None,) * len(chan)
    y = jnp.zeros(x_BTC.shape, jnp.float32)
    w32 = w_WC.astype(jnp.float32)
    for j in range(W):
        tap = xp[:, j : j + T].astype(jnp.float32)
        if segment_ids_BT is not None and j < W - 1:
            tap = tap * (run_BP[:, j : j + T] == run_BT)[bcast]
        y = y + tap * w32[j]
    new_state = xp[:, T:]
    if segment_ids_BT is not None:
        keep = run_BP[:, T:] == run_BT[:, -1:]
        new_state = new_state * keep[bcast].astype(new_state.dtype)
    return y.astype(x_BTC.dtype), new_state


def causal_conv_context(x_BTC, w_WC, *, segment_ids_BT=None):
    """`causal_conv` of this device's span of a sequence split over the mesh's `context` axis
    (call inside `shard_map`): the W-1 inputs before the span come from the previous span
    (ppermute; zeros before the first), dropped where a document starts between them and the
    span's first token. Returns y_BTC, as `causal_conv` of the whole sequence gives it here."""
    W = w_WC.shape[0]
    halo_BSC = previous_span_tail(x_BTC, W - 1)
    if segment_ids_BT is not None:
        # halo token j is kept iff no change point lies between it and the span's first token
        ids_BS = jnp.concatenate([previous_span_tail(segment_ids_BT, W - 1), segment_ids_BT[:, :1]], axis=1)
        doc_BS = document_index(ids_BS)
        keep_BS = doc_BS[:, :-1] == doc_BS[:, -1:]
        halo_BSC = halo_BSC * keep_BS.reshape(keep_BS.shape + (1,) * (x_BTC.ndim - 2)).astype(halo_BSC.dtype)
    return causal_conv(x_BTC, w_WC, state_BSC=halo_BSC, segment_ids_BT=segment_ids_BT)[0]


def causal_conv_step(x_BC, w_WC, state_BSC):
    """One decode token: returns (y_BC, new_state_BSC)."""
    window = jnp.concatenate([state_BSC.astype(x_BC.dtype), x_BC[:, None]], axis=1)
    y = jnp.sum(window.astype(jnp.float32) * w_WC.astype(jnp.float32)[None], axis=1)
    return y.astype(x_BC.dtype), window[:, 1:]


def conv_state_after(state_BSC, x_BTC, n_B):
    """The conv state after only the first n[b] of row b's T inputs: the W-1 inputs before
    position n[b] (ragged appends; n = 0 leaves the row's state as it was). In the state's dtype."""
    S = state_BSC.shape[1]
    xp = jnp.concatenate([state_BSC, x_BTC.astype(state_BSC.dtype)], axis=1)  # [B, S+T, *C]
    take = lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, S, axis=0)
    return jax.vmap(take)(xp, jnp.asarray(n_B, jnp.int32))
