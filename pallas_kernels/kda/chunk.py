"""KDA in chunkwise-parallel form (pure JAX), with a recompute-based custom VJP.

Per chunk of C = 64 tokens (rows i, j), chunk-initial state S0 [K,V], G = in-chunk cumsum of g:

    Akk_ij = sum_d k_id k_jd exp(G_id - G_jd)   (i > j)      L = Diag(beta) Akk
    Aqk_ij = sum_d q_id k_jd exp(G_id - G_jd)   (i >= j)
    [U | W] = (I + L)^-1 Diag(beta) [V | K*exp(G)]           (the WY/UT transform: one triangular solve)
    D = U - W S0                                              (per-row delta-rule errors)
    O = (q*exp(G)) S0 + Aqk D
    S_next = exp(G_C) * S0 + (K*exp(G_C - G))^T D

Only the middle two lines are sequential over chunks (`lax.scan`); everything else is batched matmuls.

Stability: a decay is only ever formed as exp(G_i - G_j) with i >= j (<= 1). Inside a 16-token
sub-chunk the pairwise exponent is masked *before* exp; between sub-chunks a reference row r (first
row of the later sub-chunk) splits it as exp(G_i - G_r) * exp(G_r - G_j), both factors <= 1, so the
off-diagonal blocks are plain matmuls. exp(+G) is never formed, so log-decays of -20 per step are safe.

Backward: the forward keeps only its inputs, the chunk-initial states h and the errors D (all
O(T*(K+V)) per head). The backward runs the state cotangent as a reverse scan over chunks
(closed form), then differentiates the parallel intra-chunk part by recomputing it under `jax.vjp`,
so the [C,C]/[C,16,K]-shaped intermediates live only inside one backward call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.kda.common import (default_scale, l2_normalize, validate_inputs,
                                       varlen_layout)

CHUNK = 64
SUB = 16


def _dot(spec, *operands):
    # Full float32 matmuls on GPU/TPU (their default f32 precision is TF32/bf16 passes); CPU is exact.
    precision = None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST
    return jnp.einsum(spec, *operands, precision=precision)


class IntraParts(NamedTuple):
    """Per-chunk quantities that do not depend on the running state. Leading dims [B,H,NC]."""

    w: jax.Array      # [..., C, K] how each row reads S0 (after the UT transform)
    u: jax.Array      # [..., C, V] effective values
    qg: jax.Array     # [..., C, K] scale*q*exp(G): the inter-chunk read of S0
    kg: jax.Array     # [..., C, K] k*exp(G_C - G): write of each row into S_next
    aqk: jax.Array    # [..., C, C] intra-chunk query-key scores (lower incl. diagonal)
    decay: jax.Array  # [..., K] exp(G_C): decay of S0 over the whole chunk


class SegmentMasks(NamedTuple):
    """Segment-reset masks per chunk (None when there are no resets). Leading dims [B,1,NC]."""

    same: jax.Array       # [..., C, C] rows i and j are in the same segment
    reads_s0: jax.Array   # [..., C] row i is in the segment that the chunk-initial state belongs to
    in_last: jax.Array    # [..., C] row j is in the chunk's last segment (writes into S_next)
    carries: jax.Array    # [...] the whole chunk is one continuing segment (S0 survives)


# Largest in-sub-chunk log-decay span for which the diagonal blocks may be factorised around a
# mid-row reference: each factor stays below exp(60) ~ 1e26, far from float32 overflow.
SAFE_SPAN = 60.0


def _masked_decay(mask, log_decay):
    """exp(log_decay) where mask, else 0, for log_decay <= 0 where mask holds.

    The exponent is clamped, not masked with -inf: XLA may evaluate exp on both sides of a select
    (and a vmapped cond runs every branch), so no exp argument may ever overflow.
    """
    return jnp.where(mask, jnp.exp(jnp.minimum(log_decay, 0.0)), 0.0)


def _bounded_exp(x):
    """exp for the factorised paths; |x| <= SAFE_SPAN when the path is chosen, clipped otherwise."""
    return jnp.exp(jnp.clip(x, -SAFE_SPAN, SAFE_SPAN))


def _diag_pairwise(xs, ks, gs):
    """Diagonal-block scores with exact pairwise decays, masked before exp (any gate magnitude)."""
    i = jnp.arange(SUB)
    lower = i[:, None] >= i[None, :]
    diff = gs[..., :, None, :] - gs[..., None, :, :]                 # [..., n, S, S, K]
    decay = _masked_decay(lower[:, :, None], diff)
    return jnp.sum(xs[..., :, None, :] * ks[..., None, :, :] * decay, axis=-1)


def _diag_factorised(xs, ks, gs):
    """Diagonal-block scores as a matmul: exp(G_i - G_m) exp(G_m - G_j), m = mid row (span-limited)."""
    g_mid = gs[..., SUB // 2: SUB // 2 + 1, :]
    left = xs * _bounded_exp(gs - g_mid)
    right = ks * _bounded_exp(g_mid - gs)
    return _dot("...id,...jd->...ij", left, right)


def _span_within(g_cum):
    """True when every block's log-decay span (first row minus last row) is <= SAFE_SPAN."""
    return jnp.max(g_cum[..., 0, :] - g_cum[..., -1, :]) <= SAFE_SPAN


def _select_by_span(fast_fn, exact_fn):
    """`cond(span ok, fast_fn, exact_fn)(x, k, g_cum)` whose VJP re-runs only the chosen branch.

    Autodiff of `cond` would zero-fill the other branch's residuals (a [..,16,16,K] tensor for
    the pairwise branch); here the backward recomputes the chosen branch under `jax.vjp`.
    """

    @jax.custom_vjp
    def select(x, k, g_cum):
        return jax.lax.cond(_span_within(g_cum), fast_fn, exact_fn, x, k, g_cum)

    def branch_vjp(fn):
        return lambda args, ct: jax.vjp(fn, *args)[1](ct)

    def bwd(res, ct):
        return jax.lax.cond(_span_within(res[2]), branch_vjp(fast_fn), branch_vjp(exact_fn), res, ct)

    select.defvjp(lambda *args: (select(*args), args), bwd)
    return select


_diag_scores = _select_by_span(_diag_factorised, _diag_pairwise)


def _causal_masks(C, dtype):
    i = jnp.arange(C)
    return (i[:, None] > i[None, :]).astype(dtype), (i[:, None] >= i[None, :]).astype(dtype)


def _scores_whole_chunk(q_NCK, k_NCK, g_cum_NCK):
    C = k_NCK.shape[-2]
    g_mid = g_cum_NCK[..., C // 2: C // 2 + 1, :]
    right = k_NCK * _bounded_exp(g_mid - g_cum_NCK)
    rows = jnp.concatenate([k_NCK, q_NCK], axis=-2) * _bounded_exp(
        jnp.concatenate([g_cum_NCK, g_cum_NCK], axis=-2) - g_mid)
    scores = _dot("...id,...jd->...ij", rows, right)
    strict, lower = _causal_masks(C, scores.dtype)
    return scores[..., :C, :] * strict, scores[..., C:, :] * lower


def _scores_by_subchunk(q_NCK, k_NCK, g_cum_NCK):
    C = k_NCK.shape[-2]
    strict, _ = _causal_masks(C, k_NCK.dtype)
    return (_subchunk_scores(k_NCK, k_NCK, g_cum_NCK) * strict,
            _subchunk_scores(q_NCK, k_NCK, g_cum_NCK))


def _subchunk_scores(x_NCK, k_NCK, g_cum_NCK):
    """sum_d x_id k_jd exp(G_id - G_jd) for i >= j, by 16-row sub-chunks."""
    *lead, C, K = k_NCK.shape
    n = C // SUB
    sub = lambda a: a.reshape(*lead, n, SUB, K)
    xs, ks, gs = sub(x_NCK), sub(k_NCK), sub(g_cum_NCK)

    # Diagonal 16x16 blocks, placed on the block diagonal of a [C,C] matrix.
    i = jnp.arange(SUB)
    diag = _diag_scores(xs, ks, gs) * (i[:, None] >= i[None, :])
    eye_n = jnp.eye(n, dtype=diag.dtype)
    diag = (diag[..., :, :, None, :] * eye_n[:, None, :, None]).reshape(*lead, C, C)

    # Off-diagonal blocks: reference row r_a = first row of sub-chunk a; both factors <= 1.
    g_ref = gs[..., :, 0, :]                                          # [..., n, K]
    x_ref = xs * _masked_decay(True, gs - g_ref[..., :, None, :])
    before = jnp.arange(C)[None, :] < (jnp.arange(n) * SUB)[:, None]  # [n, C]
    k_ref = k_NCK[..., None, :, :] * _masked_decay(
        before[:, :, None], g_ref[..., :, None, :] - g_cum_NCK[..., None, :, :])  # [..., n, C, K]
    off = _dot("...nid,...njd->...nij", x_ref, k_ref).reshape(*lead, C, C)
    return off + diag


intra_scores = _select_by_span(_scores_whole_chunk, _scores_by_subchunk)
intra_scores.__doc__ = """Akk (strictly lower) and Aqk (lower incl. diagonal): sum_d x_id k_jd exp(G_id - G_jd).

Three exact evaluations, picked by the largest log-decay span (a scalar predicate, so one branch
runs): the whole chunk as one matmul around its mid row (span over the chunk <= SAFE_SPAN);
16-row sub-chunks with matmul diagonal blocks (span over each sub-chunk <= SAFE_SPAN); or exact
pairwise diagonal blocks for any gate magnitude.
"""


def intra_chunk(q, k, v, g, beta, masks: SegmentMasks | None) -> IntraParts:
    """The state-independent part of every chunk. Inputs [B,H,NC,C,*] float32 (q already scaled)."""
    C = g.shape[-2]
    # In-chunk cumulative log decay, as a matmul (2x faster than jnp.cumsum on CPU).
    G = _dot("ij,...jk->...ik", jnp.tril(jnp.ones((C, C), g.dtype)), g)
    G_last = G[..., -1:, :]
    gamma = jnp.exp(G)
    akk, aqk = intra_scores(q, k, G)
    qg = q * gamma
    kg = k * jnp.exp(G_last - G)
    k_read = k * gamma
    decay = jnp.exp(G_last[..., 0, :])
    if masks is not None:
        akk = akk * masks.same
        aqk = aqk * masks.same
        qg = qg * masks.reads_s0[..., None]
        k_read = k_read * masks.reads_s0[..., None]
        kg = kg * masks.in_last[..., None]
        decay = decay * masks.carries[..., None]
    rhs = beta[..., :, None] * jnp.concatenate([v, k_read], axis=-1)
    uw = _dot("...ij,...jw->...iw", unit_lower_inverse(beta[..., :, None] * akk), rhs)
    V = v.shape[-1]
    return IntraParts(w=uw[..., V:], u=uw[..., :V], qg=qg, kg=kg, aqk=aqk, decay=decay)


def _invert_unit_lower_blocks(l_NSS):
    """(I + L)^-1 for strictly lower L [..., S, S] by row-wise forward substitution (stable: no
    powers of L are formed, unlike a Neumann/doubling product, which cancels catastrophically)."""
    S = l_NSS.shape[-1]
    inv = jnp.broadcast_to(jnp.eye(S, dtype=l_NSS.dtype), l_NSS.shape)

    def substitute_row(r, inv):  # rows >= r of inv are still identity rows; L's row r is zero from r on
        l_row = jax.lax.dynamic_index_in_dim(l_NSS, r, axis=-2, keepdims=False)
        row = jax.lax.dynamic_index_in_dim(inv, r, axis=-2, keepdims=False)
        row = row - jnp.einsum("...j,...jc->...c", l_row, inv)
        return jax.lax.dynamic_update_index_in_dim(inv, row, r, axis=-2)

    return jax.lax.fori_loop(1, S, substitute_row, inv)


def solve_unit_lower(l_CC, rhs_CW):
    """Solve (I + L) X = R for strictly lower L [..., C, C]: 16-row block forward substitution.

    XLA's batched triangular_solve is slow on CPU for many small systems; this is matmul-shaped.
    """
    C = l_CC.shape[-1]
    n = C // SUB
    blocks = [slice(a * SUB, (a + 1) * SUB) for a in range(n)]
    diag_inv = _invert_unit_lower_blocks(
        jnp.stack([l_CC[..., b, b] for b in blocks], axis=-3))      # [..., n, S, S]
    xs = []
    for a, rows in enumerate(blocks):
        r = rhs_CW[..., rows, :]
        if a:
            r = r - _dot("...ij,...jw->...iw", l_CC[..., rows, : a * SUB], jnp.concatenate(xs, axis=-2))
        xs.append(_dot("...ij,...jw->...iw", diag_inv[..., a, :, :], r))
    return jnp.concatenate(xs, axis=-2)


@jax.custom_vjp
def unit_lower_inverse(l_CC):
    """(I + L)^-1 for strictly lower L [..., C, C] (block forward substitution on I)."""
    eye = jnp.broadcast_to(jnp.eye(l_CC.shape[-1], dtype=l_CC.dtype), l_CC.shape)
    return solve_unit_lower(l_CC, eye)


def _unit_lower_inverse_fwd(l_CC):
    inv = unit_lower_inverse(l_CC)
    return inv, inv


def _unit_lower_inverse_bwd(inv, d_inv):
    # d(M) = -M dL M  =>  dL = -M^T dM M^T, kept on L's strictly lower support. Two matmuls,
    # instead of differentiating through the substitution loop.
    strict, _ = _causal_masks(inv.shape[-1], inv.dtype)
    m_t = jnp.swapaxes(inv, -1, -2)
    return (-_dot("...ij,...jk,...kl->...il", m_t, d_inv, m_t) * strict,)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


class Varlen(NamedTuple):
    """Per-chunk flags of a packed (B == 1) stream; see common.varlen_layout."""

    seq: jax.Array    # [NC] int32
    start: jax.Array  # [NC] bool
    end: jax.Array    # [NC] bool


def _to_scan(x):
    """[B,H,NC,...] -> [NC,B,H,...] for lax.scan over chunks."""
    return jnp.moveaxis(x, 2, 0)


def _from_scan(x):
    return jnp.moveaxis(x, 0, 2)


def _state_pass(parts: IntraParts, h0, varlen: Varlen | None):
    """Sequential pass over chunks: returns (errors D [B,H,NC,C,V], chunk-initial states h, final)."""

    def step(carry, xs):
        state, finals = carry
        w, u, kg, decay, flags = xs
        if varlen is not None:
            seq, start, end = flags
            state = jnp.where(start, h0[seq][None], state)
        err = u - _dot("bhck,bhkv->bhcv", w, state)
        new_state = decay[..., None] * state + _dot("bhck,bhcv->bhkv", kg, err)
        if varlen is not None:
            finals = finals.at[seq].set(jnp.where(end, new_state[0], finals[seq]))
        return (new_state, finals), (err, state)

    NC = parts.w.shape[2]
    flags = (tuple(varlen) if varlen is not None else (jnp.zeros((NC,), jnp.int32),) * 3)
    B = parts.w.shape[0]
    state0 = jnp.zeros((B,) + h0.shape[1:], h0.dtype) if varlen is not None else h0
    xs = (_to_scan(parts.w), _to_scan(parts.u), _to_scan(parts.kg), _to_scan(parts.decay), flags)
    (last, finals), (err, h) = jax.lax.scan(step, (state0, h0), xs)
    final = finals if varlen is not None else last
    return _from_scan(err), _from_scan(h), final


def _output(parts: IntraParts, err, h):
    return _dot("...ck,...kv->...cv", parts.qg, h) + _dot("...ij,...jv->...iv", parts.aqk, err)


@jax.custom_vjp
def _chunk_core(q, k, v, g, beta, h0, masks, varlen):
    parts = intra_chunk(q, k, v, g, beta, masks)
    err, h, final = _state_pass(parts, h0, varlen)
    return _output(parts, err, h), final


def _chunk_core_fwd(q, k, v, g, beta, h0, masks, varlen):
    parts = intra_chunk(q, k, v, g, beta, masks)
    err, h, final = _state_pass(parts, h0, varlen)
    return (_output(parts, err, h), final), (q, k, v, g, beta, h0, masks, varlen, err, h)


def _state_cotangent_pass(parts: IntraParts, d_out, d_final, varlen: Varlen | None):
    """Reverse scan for the cotangent of each chunk's output state. Returns (d_err, d_state_out, dh0)."""
    d_err_local = _dot("...ij,...iv->...jv", parts.aqk, d_out)    # Aqk^T dO
    qg_t_dout = _dot("...ck,...cv->...kv", parts.qg, d_out)       # read of S0 by the outputs

    def step(carry, xs):
        d_state, dh0 = carry
        w, kg, decay, d_err_loc, qdo, flags = xs
        if varlen is not None:
            seq, start, end = flags
            d_state = jnp.where(end, d_final[seq][None], d_state)
        d_err = d_err_loc + _dot("bhck,bhkv->bhcv", kg, d_state)
        d_state_in = decay[..., None] * d_state + qdo - _dot("bhck,bhcv->bhkv", w, d_err)
        if varlen is not None:
            dh0 = dh0.at[seq].set(jnp.where(start, d_state_in[0], dh0[seq]))
            d_state_in = jnp.where(start, 0.0, d_state_in)
        return (d_state_in, dh0), (d_err, d_state)

    NC = parts.w.shape[2]
    flags = (tuple(varlen) if varlen is not None else (jnp.zeros((NC,), jnp.int32),) * 3)
    B = parts.w.shape[0]
    init = jnp.zeros((B,) + d_final.shape[1:], d_final.dtype) if varlen is not None else d_final
    xs = (_to_scan(parts.w), _to_scan(parts.kg), _to_scan(parts.decay), _to_scan(d_err_local),
          _to_scan(qg_t_dout), flags)
    (d_first, dh0), (d_err, d_state_out) = jax.lax.scan(step, (init, d_final), xs, reverse=True)
    return _from_scan(d_err), _from_scan(d_state_out), (dh0 if varlen is not None else d_first)


def _chunk_core_bwd(res, cotangents):
    q, k, v, g, beta, h0, masks, varlen, err, h = res
    d_out, d_final = cotangents
    parts, intra_vjp = jax.vjp(lambda *a: intra_chunk(*a, masks), q, k, v, g, beta)
    d_err, d_state_out, dh0 = _state_cotangent_pass(parts, d_out, d_final, varlen)
    d_parts = IntraParts(
        w=-_dot("...cv,...kv->...ck", d_err, h),
        u=d_err,
        qg=_dot("...cv,...kv->...ck", d_out, h),
        kg=_dot("...cv,...kv->...ck", err, d_state_out),
        aqk=_dot("...iv,...jv->...ij", d_out, err),
        decay=jnp.sum(h * d_state_out, axis=-1),
    )
    dq, dk, dv, dg, dbeta = intra_vjp(d_parts)
    zeros_like_tree = lambda t: None if t is None else jax.tree.map(
        lambda x: jnp.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.floating)
        else jnp.zeros_like(x), t)
    return dq, dk, dv, dg, dbeta, dh0, zeros_like_tree(masks), zeros_like_tree(varlen)


_chunk_core.defvjp(_chunk_core_fwd, _chunk_core_bwd)


def _segment_masks(seg_BNC) -> SegmentMasks:
    """Masks from padded segment ids [B,NC,C]; broadcast over heads."""
    last_prev = jnp.concatenate([seg_BNC[:, :1, 0], seg_BNC[:, :-1, -1]], axis=1)  # [B,NC]
    same = seg_BNC[..., :, None] == seg_BNC[..., None, :]
    reads = seg_BNC == last_prev[..., None]
    in_last = seg_BNC == seg_BNC[..., -1:]
    carries = seg_BNC[..., -1] == last_prev
    f32 = lambda x: x.astype(jnp.float32)[:, None]
    return SegmentMasks(f32(same), f32(reads), f32(in_last), f32(carries))


def _pad_time(x, total):
    pad = total - x.shape[1]
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def kda_chunk(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, segment_ids=None, use_qk_l2norm=False, chunk_size=CHUNK):
    """Chunkwise KDA (same contract as `pallas_kernels.kda.kda`)."""
    n_seq = validate_inputs(q, k, v, g, beta, initial_state, cu_seqlens, segment_ids)
    if chunk_size % SUB:
        raise ValueError(f"kda: chunk_size must be a multiple of {SUB}, got {chunk_size}")
    scale = default_scale(q, scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    qf, kf = q.astype(f32), k.astype(f32)
    if use_qk_l2norm:
        qf, kf = l2_normalize(qf), l2_normalize(kf)
    xs = [qf * scale, kf, v.astype(f32), g.astype(f32), beta.astype(f32)[..., None]]
    h0 = (jnp.zeros((n_seq, H, K, V), f32) if initial_state is None else initial_state.astype(f32))

    varlen = masks = None
    if cu_seqlens is not None:
        layout = varlen_layout(cu_seqlens, T, chunk_size)
        total = layout.num_chunks * chunk_size
        xs = [jnp.zeros((1, total) + x.shape[2:], f32).at[:, layout.dest].set(x) for x in xs]
        varlen = Varlen(layout.chunk_seq, layout.chunk_start, layout.chunk_end)
    else:
        total = -(-T // chunk_size) * chunk_size
        xs = [_pad_time(x, total) for x in xs]
        if segment_ids is not None:
            seg = jnp.pad(segment_ids, [(0, 0), (0, total - T)], mode="edge")
            masks = _segment_masks(seg.reshape(B, -1, chunk_size))

    def to_chunks(x):  # [B,Tp,H,D] -> [B,H,NC,C,D]
        b, tp, h, d = x.shape
        return x.reshape(b, tp // chunk_size, chunk_size, h, d).transpose(0, 3, 1, 2, 4)

    qc, kc, vc, gc, bc = map(to_chunks, xs)
    o_c, final = _chunk_core(qc, kc, vc, gc, bc[..., 0], h0, masks, varlen)
    o = o_c.transpose(0, 2, 3, 1, 4).reshape(o_c.shape[0], total, H, V)
    o = o[:, layout.dest] if cu_seqlens is not None else o[:, :T]
    return o.astype(v.dtype), (final if output_final_state else None)
