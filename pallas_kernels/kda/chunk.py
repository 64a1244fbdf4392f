"""KDA in chunkwise-parallel form (pure JAX), with a recompute-based custom VJP.

Per chunk of C = 64 tokens (rows i, j), chunk-initial state S0 [K,V], G = in-chunk cumsum of g:

    Akk_ij = sum_d k_id k_jd exp(G_id - G_jd)   (i > j)      M = (I + Diag(beta) Akk)^-1
    Aqk_ij = sum_d q_id k_jd exp(G_id - G_jd)   (i >= j)
    P = (K*exp(G_C - G))^T M,   Q = Aqk M                                        [K,C], [C,C]
    R = Diag(beta) (V - K*exp(G) S0)                    (the chunk's delta-rule corrected values)
    S_next = exp(G_C) * S0 + P R,   O = q*exp(G) S0 + Q R

This is the WY/UT form (W = M Diag(beta) K*exp(G), U = M Diag(beta) V, U - W S0 = M R) with M
folded into P and Q, so W and U are never formed. Only S_next is sequential over chunks: two
[C,K]x[K,V]-sized matmuls per chunk; everything else is batched matmuls. One `fori_loop` step
handles a group of consecutive chunks for all heads (parts, then the state steps, then the
outputs), so working tensors are group-sized: on CPU that keeps them in cache and keeps XLA's
per-call temp buffer small (a large one is freshly mmapped and page-faulted on every call, which
cost about as much as the arithmetic).

Stability: a decay is only ever formed as exp(G_i - G_j) with i >= j (<= 1). Inside a 16-token
sub-chunk the pairwise exponent is masked *before* exp; between sub-chunks a reference row r (first
row of the later sub-chunk) splits it as exp(G_i - G_r) * exp(G_r - G_j), both factors <= 1, so the
off-diagonal blocks are plain matmuls. exp(+G) is never formed, so log-decays of -20 per step are safe.

Backward: the forward keeps only its inputs and the chunk-initial states (O(T*(K+V)) per head).
A reverse loop over the same chunks recomputes each group's parts under `jax.vjp` and R from the
saved states, runs the state cotangent back through the group (dR = P^T dS_next + Q^T dO,
dS0 = exp(G_C) dS_next + (q*exp(G))^T dO - (Diag(beta) K*exp(G))^T dR), and pulls the parts'
cotangents back to the inputs, so the [C,C]-shaped intermediates only ever exist for one group.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.kda.common import (
    L2NORM_EPS,
    default_scale,
    document_index,
    validate_inputs,
    varlen_layout,
)

CHUNK = 64
SUB = 16


def _dot(spec, *operands):
    # Full float32 matmuls on GPU/TPU (their default f32 precision is TF32/bf16 passes); CPU is exact.
    precision = None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST
    return jnp.einsum(spec, *operands, precision=precision)


def _t(x):
    """x with its last two dims swapped, materialised. XLA would otherwise fold a transpose into the
    dot as a contraction over a non-minor dim of the left operand, which XLA:CPU runs on a path ~3x
    slower than its (YNNPACK) matmul for these batched 64x64 products."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def _mm(a, b):
    """a @ b over the last two dims; the VJP keeps every product in the fast form."""
    return _dot("...ij,...jk->...ik", a, b)


def _mm_fwd(a, b):
    return _mm(a, b), (a, b)


def _mm_bwd(res, dc):
    a, b = res
    return _dot("...ik,...jk->...ij", dc, b), _dot("...ji,...ik->...jk", _t(a), dc)


_mm.defvjp(_mm_fwd, _mm_bwd)


@jax.custom_vjp
def _mm_tn(a, b):
    """a^T @ b over the last two dims (a contraction over rows), via a materialised a^T."""
    return _dot("...ij,...jk->...ik", _t(a), b)


def _mm_tn_fwd(a, b):
    return _mm_tn(a, b), (a, b)


def _mm_tn_bwd(res, dc):
    a, b = res
    return _dot("...ck,...wk->...cw", b, dc), _dot("...ck,...kw->...cw", a, dc)


_mm_tn.defvjp(_mm_tn_fwd, _mm_tn_bwd)


# Reductions. XLA:CPU (JAX 0.10) sends reduce(multiply(..)) and reductions over a non-minor dim to
# a YNNPACK path that ran ~8x slower than the same sum written as a dot, and that path crashes
# (SIGSEGV in YNNPACK's transpose, jaxlib 0.10.x, seen on AMD Zen 2/3) when the reduce sits in a
# `lax.cond` branch -- where every VJP of `_select_by_span` runs. So every reduction here,
# including those in hand-written VJPs, is an einsum, and broadcasts whose autodiff would produce
# a reduction go through `_expand` (or have their own VJP). tests/kernels/test_kda_xla_cpu.py
# checks the compiled backward for reduce fusions in conditional branches.


def _rowdot(a, b):
    """sum over the last dim of a * b."""
    return jnp.einsum("...x,...x->...", a, b)


def _colsum(x):
    """sum over the second-to-last dim."""
    return jnp.einsum("c,...cx->...x", jnp.ones(x.shape[-2], x.dtype), x)


def _sum_axis(x, axis):
    """sum over `axis` as a contraction with ones (a dot, not a reduce)."""
    axis = axis % x.ndim
    letters = "abcdefghijklmnopqrstuvwxyz"[: x.ndim]
    out = letters[:axis] + letters[axis + 1 :]
    return jnp.einsum(f"{letters},{letters[axis]}->{out}", x, jnp.ones(x.shape[axis], x.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _expand(x, axis, size):
    """x with a new dim of `size` inserted at `axis` (a broadcast whose VJP sums with a dot)."""
    y = jnp.expand_dims(x, axis)
    return jnp.broadcast_to(y, y.shape[: axis % y.ndim] + (size,) + y.shape[axis % y.ndim + 1 :])


def _expand_fwd(x, axis, size):
    return _expand(x, axis, size), None


def _expand_bwd(axis, size, _, ct):
    return (_sum_axis(ct, axis),)


_expand.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def _scale_rows(x, s):
    """x * s[..., None]."""
    return x * s[..., None]


def _scale_rows_fwd(x, s):
    return _scale_rows(x, s), (x, s)


def _scale_rows_bwd(res, ct):
    x, s = res
    return ct * s[..., None], _rowdot(ct, x)


_scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)


@jax.custom_vjp
def _l2norm(x):
    """common.l2_normalize (x / sqrt(sum(x^2) + eps) over the last dim), reductions as dots."""
    return x * jax.lax.rsqrt(_rowdot(x, x) + L2NORM_EPS)[..., None]


def _l2norm_fwd(x):
    r = jax.lax.rsqrt(_rowdot(x, x) + L2NORM_EPS)[..., None]
    y = x * r
    return y, (y, r)


def _l2norm_bwd(res, dy):
    y, r = res
    return (r * (dy - y * _rowdot(y, dy)[..., None]),)


_l2norm.defvjp(_l2norm_fwd, _l2norm_bwd)


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


PAIRWISE_BATCH = 16  # 16x16 blocks per step of the exact pairwise evaluation


def _diag_pairwise(xs, ks, gs):
    """Diagonal-block scores with exact pairwise decays, masked before exp (any gate magnitude).

    The [S,S,K] decay tensor is built PAIRWISE_BATCH blocks at a time (`lax.map` of a
    rematerialised body), so neither this nor its VJP holds it for all blocks at once.
    """
    i = jnp.arange(SUB)
    lower = (i[:, None] >= i[None, :])[:, :, None]

    @jax.checkpoint
    def block(args):
        x, k, g = args  # [S, K] each
        decay = _masked_decay(lower, _expand(g, 1, SUB) - _expand(g, 0, SUB))  # [S, S, K]
        return jnp.einsum("ijd,jd->ij", _expand(x, 1, SUB) * decay, k)

    flat = lambda a: a.reshape((-1,) + a.shape[-2:])
    out = jax.lax.map(block, (flat(xs), flat(ks), flat(gs)), batch_size=PAIRWISE_BATCH)
    return out.reshape(xs.shape[:-1] + (SUB,))


def _diag_factorised(xs, ks, gs):
    """Diagonal-block scores as a matmul: exp(G_i - G_m) exp(G_m - G_j), m = mid row (span-limited)."""
    g_mid = _expand(gs[..., SUB // 2, :], -2, SUB)
    left = xs * _bounded_exp(gs - g_mid)
    right = ks * _bounded_exp(g_mid - gs)
    return _dot("...id,...jd->...ij", left, right)


def _span_within(g_cum):
    """True when every block's log-decay span (first row minus last row) is <= SAFE_SPAN.

    A reduce: call it outside `lax.cond` branches (see the note on reductions above)."""
    return jnp.max(g_cum[..., 0, :] - g_cum[..., -1, :]) <= SAFE_SPAN


def _select_by_span(fast_fn, exact_fn, fast_bwd=None):
    """`select(fast, (x, k, g_cum), preds)` = `cond(fast, fast_fn, exact_fn)((x, k, g_cum), preds)`,
    whose VJP re-runs only the chosen branch.

    `fast` (usually `_span_within(g_cum)`) and `preds` (predicates of nested selects) are computed
    by the caller, outside every branch. Autodiff of `cond` would zero-fill the other branch's
    residuals (a [..,16,16,K] tensor for the pairwise branch); here the backward recomputes the
    chosen branch under `jax.vjp`, or calls `fast_bwd(x, k, g_cum, ct)` for the fast branch.
    """

    @jax.custom_vjp
    def select(fast, xs, preds):
        return jax.lax.cond(fast, fast_fn, exact_fn, xs, preds)

    def branch_vjp(fn):
        return lambda xs, preds, ct: jax.vjp(lambda *a: fn(a, preds), *xs)[1](ct)

    fast_vjp = branch_vjp(fast_fn) if fast_bwd is None else (lambda xs, _, ct: fast_bwd(*xs, ct))

    def fwd(fast, xs, preds):
        return select(fast, xs, preds), (fast, xs, preds)

    def bwd(res, ct):
        fast, xs, preds = res
        return None, jax.lax.cond(fast, fast_vjp, branch_vjp(exact_fn), xs, preds, ct), None

    select.defvjp(fwd, bwd)
    return select


_diag_scores = _select_by_span(lambda xs, _: _diag_factorised(*xs), lambda xs, _: _diag_pairwise(*xs))


def _causal_masks(C, dtype):
    i = jnp.arange(C)
    return (i[:, None] > i[None, :]).astype(dtype), (i[:, None] >= i[None, :]).astype(dtype)


def _scores_whole_chunk(q_NCK, k_NCK, g_cum_NCK):
    C = k_NCK.shape[-2]
    g_mid = g_cum_NCK[..., C // 2 : C // 2 + 1, :]
    right = k_NCK * _bounded_exp(g_mid - g_cum_NCK)
    rows = jnp.concatenate([k_NCK, q_NCK], axis=-2) * _bounded_exp(
        jnp.concatenate([g_cum_NCK, g_cum_NCK], axis=-2) - g_mid
    )
    scores = _dot("...id,...jd->...ij", rows, right)
    strict, lower = _causal_masks(C, scores.dtype)
    return scores[..., :C, :] * strict, scores[..., C:, :] * lower


def _scores_whole_chunk_bwd(q_NCK, k_NCK, g_cum_NCK, cts):
    """VJP of `_scores_whole_chunk` by hand: two matmuls, no re-run of the forward product."""
    d_akk, d_aqk = cts
    C = k_NCK.shape[-2]
    g_mid = g_cum_NCK[..., C // 2 : C // 2 + 1, :]
    e_row = _bounded_exp(g_cum_NCK - g_mid)  # |G - G_mid| <= SAFE_SPAN on this path,
    e_col = _bounded_exp(g_mid - g_cum_NCK)  # so the clip is inactive (derivative 1)
    right = k_NCK * e_col
    rows = jnp.concatenate([k_NCK, q_NCK], axis=-2) * jnp.concatenate([e_row, e_row], axis=-2)
    strict, lower = _causal_masks(C, d_akk.dtype)
    d_scores = jnp.concatenate([d_akk * strict, d_aqk * lower], axis=-2)  # [..., 2C, C]
    d_rows = _dot("...ij,...jd->...id", d_scores, right)  # [..., 2C, K]
    d_right = _dot("...ji,...id->...jd", _t(d_scores), rows)  # [..., C, K]
    d_rows_k, d_rows_q = d_rows[..., :C, :], d_rows[..., C:, :]
    dq = d_rows_q * e_row
    dk = d_rows_k * e_row + d_right * e_col
    # G enters as exp(G_i - G_mid) in the rows and exp(G_mid - G_j) in the columns.
    dg = (d_rows_k * rows[..., :C, :] + d_rows_q * rows[..., C:, :]) - d_right * right
    mid = (jnp.arange(C) == C // 2)[:, None].astype(dg.dtype)
    dg = dg - mid * _colsum(dg)[..., None, :]
    return dq, dk, dg


def _sub_blocks(x_NCK):
    """[..., C, D] -> [..., C/16, 16, D]."""
    *lead, C, D = x_NCK.shape
    return x_NCK.reshape(*lead, C // SUB, SUB, D)


def _scores_by_subchunk(q_NCK, k_NCK, g_cum_NCK, sub_fast=None):
    """Akk and Aqk by 16-row sub-chunks; `sub_fast` = `_span_within` of the sub-chunks (computed
    here when not given; `intra_scores` passes it in from outside its branches)."""
    if sub_fast is None:
        sub_fast = _span_within(_sub_blocks(g_cum_NCK))
    C = k_NCK.shape[-2]
    strict, _ = _causal_masks(C, k_NCK.dtype)
    return (
        _subchunk_scores(k_NCK, k_NCK, g_cum_NCK, sub_fast) * strict,
        _subchunk_scores(q_NCK, k_NCK, g_cum_NCK, sub_fast),
    )


def _subchunk_scores(x_NCK, k_NCK, g_cum_NCK, sub_fast):
    """sum_d x_id k_jd exp(G_id - G_jd) for i >= j, by 16-row sub-chunks."""
    *lead, C, K = k_NCK.shape
    n = C // SUB
    xs, ks, gs = _sub_blocks(x_NCK), _sub_blocks(k_NCK), _sub_blocks(g_cum_NCK)

    # Diagonal 16x16 blocks, placed on the block diagonal of a [C,C] matrix.
    i = jnp.arange(SUB)
    diag = _diag_scores(sub_fast, (xs, ks, gs), ()) * (i[:, None] >= i[None, :])
    eye_n = jnp.eye(n, dtype=diag.dtype)
    diag = (_expand(diag, -2, n) * eye_n[:, None, :, None]).reshape(*lead, C, C)

    # Off-diagonal blocks: reference row r_a = first row of sub-chunk a; both factors <= 1.
    g_ref = gs[..., :, 0, :]  # [..., n, K]
    x_ref = xs * _masked_decay(True, gs - _expand(g_ref, -2, SUB))
    before = jnp.arange(C)[None, :] < (jnp.arange(n) * SUB)[:, None]  # [n, C]
    k_ref = _expand(k_NCK, -3, n) * _masked_decay(
        before[:, :, None], _expand(g_ref, -2, C) - _expand(g_cum_NCK, -3, n)
    )  # [..., n, C, K]
    off = _dot("...nid,...njd->...nij", x_ref, k_ref).reshape(*lead, C, C)
    return off + diag


_select_scores = _select_by_span(
    lambda xs, _: _scores_whole_chunk(*xs),
    lambda xs, preds: _scores_by_subchunk(*xs, *preds),
    _scores_whole_chunk_bwd,
)


def intra_scores(q_NCK, k_NCK, g_cum_NCK):
    """Akk (strictly lower) and Aqk (lower incl. diagonal): sum_d x_id k_jd exp(G_id - G_jd).

    Three exact evaluations, picked by the largest log-decay span (scalar predicates, so one
    branch runs): the whole chunk as one matmul around its mid row (span over the chunk <=
    SAFE_SPAN); 16-row sub-chunks with matmul diagonal blocks (span over each sub-chunk <=
    SAFE_SPAN); or exact pairwise diagonal blocks for any gate magnitude. Both predicates are
    computed here, before any branch.
    """
    return _select_scores(
        _span_within(g_cum_NCK), (q_NCK, k_NCK, g_cum_NCK), (_span_within(_sub_blocks(g_cum_NCK)),)
    )


def _invert_unit_lower_blocks(l_NSS):
    """(I + L)^-1 for strictly lower L [..., S, S] by recursive block doubling: with M_s the inverse
    of L's s x s diagonal blocks and L_s the lower-left s-blocks inside each 2s-block,
    M_2s = M_s - M_s L_s M_s exactly (M_s L_s is nilpotent). This is block forward substitution
    (stable; no powers of L are formed, unlike a Neumann/doubling product, which cancels
    catastrophically), in log2(S) steps of two matmuls each instead of S row updates."""
    S = l_NSS.shape[-1]
    i = jnp.arange(S)

    def off_blocks(s):  # (r, c) in the same 2s-block but different s-blocks
        return (
            ((i[:, None] // (2 * s)) == (i[None, :] // (2 * s))) & ((i[:, None] // s) != (i[None, :] // s))
        ).astype(l_NSS.dtype)

    inv = jnp.eye(S, dtype=l_NSS.dtype) - l_NSS * off_blocks(1)  # M_2 (M_1 = I)
    s = 2
    while s < S:
        inv = inv - _dot("...ij,...jk->...ik", inv, _dot("...ij,...jk->...ik", l_NSS * off_blocks(s), inv))
        s *= 2
    return inv


def _merge_block_pairs(blocks, l_CC):
    """Inverses of (I + L)'s diagonal 2s-blocks from those of its s-blocks, `blocks` [..., m, s, s]:
    each pair gives [[A, 0], [-B L21 A, B]] (A, B the pair's inverses, L21 the block of L between
    them): one step of block forward substitution, two small matmuls for all pairs at once."""
    *lead, m, s, _ = blocks.shape
    pairs = blocks.reshape(*lead, m // 2, 2, s, s)
    a, b = pairs[..., 0, :, :], pairs[..., 1, :, :]
    l_blocks = l_CC.reshape(*lead, m, s, m, s)
    l21 = jnp.stack([l_blocks[..., 2 * p + 1, :, 2 * p, :] for p in range(m // 2)], axis=-3)
    x = -_dot("...ij,...jk->...ik", b, _dot("...ij,...jk->...ik", l21, a))
    top = jnp.concatenate([a, jnp.zeros_like(a)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([x, b], axis=-1)], axis=-2)


@jax.custom_vjp
def unit_lower_inverse(l_CC):
    """(I + L)^-1 for strictly lower L [..., C, C]: the 16x16 diagonal blocks by block doubling,
    then merged pairwise (16 -> 32 -> 64), which is block forward substitution in log2(C/16) steps.
    XLA's batched triangular_solve is far slower on CPU for these many small systems, and
    substituting 16-row block by block took more, smaller ops (0.5 ms more per forward here).
    C that is not 16 times a power of two is padded with an identity block."""
    C = l_CC.shape[-1]
    n = C // SUB
    padded = SUB * (1 << (n - 1).bit_length())
    l = l_CC if padded == C else jnp.pad(l_CC, [(0, 0)] * (l_CC.ndim - 2) + [(0, padded - C)] * 2)
    blocks = _invert_unit_lower_blocks(
        jnp.stack(
            [l[..., a * SUB : (a + 1) * SUB, a * SUB : (a + 1) * SUB] for a in range(padded // SUB)], axis=-3
        )
    )
    while blocks.shape[-3] > 1:
        blocks = _merge_block_pairs(blocks, l)
    return blocks[..., 0, :C, :C]


def _unit_lower_inverse_fwd(l_CC):
    inv = unit_lower_inverse(l_CC)
    return inv, inv


def _unit_lower_inverse_bwd(inv, d_inv):
    # d(M) = -M dL M  =>  dL = -M^T dM M^T, kept on L's strictly lower support. Two matmuls,
    # instead of differentiating through the block merges.
    strict, _ = _causal_masks(inv.shape[-1], inv.dtype)
    m_t = _t(inv)
    return (-_dot("...ij,...jk->...ik", _dot("...ij,...jk->...ik", m_t, d_inv), m_t) * strict,)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


# ---------------------------------------------------------------------------------------------
# The chunk loop. One `fori_loop` step handles a group of `n` consecutive chunks for all batch
# rows and heads: the state-independent intra-chunk part batched over the group, then the n
# sequential state steps, then the outputs. Working tensors are group-sized (a few MB, cache- and
# allocator-friendly) instead of sequence-sized; the loop reads the [B,T,H,*] inputs in place.

GROUP_ROWS = 1024  # B*H*n*C rows per backward loop step (n >= 1); 2048+ made it slower on CPU
FORWARD_GROUP_ROWS = 2048  # the forward's leaner loop step is fastest on twice as many rows
# (backward, forward) rows per loop step by backend; None: the CPU constants above. On a GPU a loop
# step is a chain of kernel launches over the group, and with the CPU sizes a 4096-token row of
# Kimi's 32 heads (2048 rows per chunk) ran its 64 chunks one per step; 2 / 4 chunks per step
# halve / quarter the launches (not timed: no GPU run yet). TPU keeps the CPU sizes: the state
# steps of a group are unrolled, and at 8 chunks per forward step the v5e compile of the forward
# took 561 s (12 s at one) with 46 MiB of temporaries (0.8 MiB) -- and `impl="auto"` runs the
# Pallas kernel there anyway.
GROUP_ROWS_BY_BACKEND = {"cpu": None, "gpu": (4096, 8192), "tpu": None}


def group_rows(backend: str) -> tuple[int, int]:
    """(backward, forward) B*H*n*C rows per chunk-loop step on `backend` (unknown: the CPU's)."""
    return GROUP_ROWS_BY_BACKEND.get(backend) or (GROUP_ROWS, FORWARD_GROUP_ROWS)


class Parts(NamedTuple):
    """State-independent per-chunk quantities, leading dims [n,B,H]. With S0 the chunk-initial
    state and R = bv - bk @ S0: S_next = decay * S0 + p @ R and O = qg @ S0 + q @ R."""

    decay: jax.Array  # [..., K]    exp(G_C), per key row of the state
    p: jax.Array  # [..., K, C] kg^T M
    q: jax.Array  # [..., C, C] Aqk M
    bk: jax.Array  # [..., C, K] Diag(beta) K*exp(G)
    bv: jax.Array  # [..., C, V] Diag(beta) V
    qg: jax.Array  # [..., C, K] q*exp(G)


class Config(NamedTuple):
    chunk: int
    group: int  # chunks per backward loop step
    fwd_group: int  # chunks per forward loop step, a multiple of `group`
    scale: float
    l2norm: bool


class Flags(NamedTuple):
    """Per-chunk flags of a packed (B == 1) stream; see common.varlen_layout."""

    seq: jax.Array  # [NC] int32
    start: jax.Array  # [NC] bool
    end: jax.Array  # [NC] bool


def _to_chunks(x, C):
    """[B, n*C, H, D] -> [n, B, H, C, D]. Chunk-major, so the state steps' per-chunk slices are
    contiguous views rather than strided copies."""
    B, L, H, D = x.shape
    return x.reshape(B, L // C, C, H, D).transpose(1, 0, 3, 2, 4)


def _from_chunks(x):
    n, B, H, C, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, n * C, H, D)


def _segment_masks(seg_BnC, prev_B):
    """Segment-reset masks of n chunks from document indices [B,n,C] (`document_index`, not raw
    segment ids: equality must mean "no change point between") and the index of the row before
    the first chunk [B]; chunk-major and broadcast over heads (dim 2)."""
    last_prev = jnp.concatenate([prev_B[:, None], seg_BnC[:, :-1, -1]], axis=1).T  # [n,B]
    seg = seg_BnC.transpose(1, 0, 2)  # [n,B,C]
    f32 = lambda x: x.astype(jnp.float32)[:, :, None]
    return (
        f32(seg[..., :, None] == seg[..., None, :]),  # same segment [n,B,1,C,C]
        f32(seg == last_prev[..., None]),  # row reads S0 [n,B,1,C]
        f32(seg == seg[..., -1:]),  # row writes S_next
        f32(seg[..., -1] == last_prev),
    )  # S0 survives the chunk


def _tril_batch(C, batch, dtype, transpose=False):
    """[batch, C, C] lower-triangular ones (or its transpose), materialised per batch entry so XLA
    keeps a plain batched matmul instead of folding the broadcast away and transposing g element
    by element to make one big matmul."""
    i = jnp.arange(C)
    m = (i[:, None] >= i[None, :]).astype(dtype)
    m = m.T if transpose else m
    return jax.lax.optimization_barrier(jnp.broadcast_to(m, (batch,) + m.shape))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _chunk_sums(g, C):
    """In-chunk cumulative log decay G_i = sum_{t<=i} g_t and the rest of the chunk's decay
    E_i = G_C - G_i, from raw rows g [B,n*C,H,K]; each [n,B,H,C,K]. The cumsum is one matmul in
    g's own layout (cheaper than jnp.cumsum or a transpose first)."""
    B, L, H, K = g.shape
    n = L // C
    G = _dot("bij,bjx->bix", _tril_batch(C, B * n, g.dtype), g.reshape(B * n, C, H * K))
    G = G.reshape(B, n, C, H, K).transpose(1, 0, 3, 2, 4)
    return G, G[..., -1:, :] - G


def _chunk_sums_fwd(g, C):
    return _chunk_sums(g, C), None


def _chunk_sums_bwd(C, _, cts):
    dG, dE = cts
    n, B, H, _, K = dG.shape
    last = (jnp.arange(C) == C - 1)[:, None].astype(dG.dtype)
    dG = dG - dE + last * _colsum(dE)[..., None, :]
    ct = dG.transpose(1, 0, 3, 2, 4).reshape(B * n, C, H * K)
    dg = _dot("bji,bix->bjx", _tril_batch(C, B * n, ct.dtype, transpose=True), ct)
    return (dg.reshape(B, n * C, H, K),)


_chunk_sums.defvjp(_chunk_sums_fwd, _chunk_sums_bwd)


class Terms(NamedTuple):
    """Gated, masked per-chunk inputs of the parts, leading dims [n,B,H] (see `_terms`)."""

    decay: jax.Array  # [..., K]    exp(G_C), zero where the state does not survive the chunk
    qg: jax.Array  # [..., C, K] q*exp(G), rows that read S0
    k_read: jax.Array  # [..., C, K] k*exp(G), rows that read S0
    kg: jax.Array  # [..., C, K] k*exp(G_C - G), rows that write S_next
    v: jax.Array  # [..., C, V]
    beta: jax.Array  # [..., C]
    akk: jax.Array  # [..., C, C] strictly lower
    aqk: jax.Array  # [..., C, C] lower


def _terms(q, k, v, g, beta, seg, seg_prev, cfg: Config) -> Terms:
    """Terms of n chunks from raw input rows q,k,g [B,n*C,H,K], v [B,n*C,H,V], beta [B,n*C,H]."""
    C = cfg.chunk
    f32 = jnp.float32
    q, k, v = (_to_chunks(x.astype(f32), C) for x in (q, k, v))
    G, E = _chunk_sums(g.astype(f32), C)
    beta = _to_chunks(beta.astype(f32)[..., None], C)[..., 0]  # [n,B,H,C]
    if cfg.l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * cfg.scale
    akk, aqk = intra_scores(q, k, G)
    gamma = jnp.exp(G)
    qg = q * gamma
    k_read = k * gamma
    kg = k * jnp.exp(E)
    decay = gamma[..., -1, :]  # [..., K]
    if seg is not None:
        B, n = seg.shape[0], seg.shape[1] // C
        same, reads, in_last, carries = _segment_masks(seg.reshape(B, n, C), seg_prev)
        akk, aqk = akk * same, aqk * same
        qg, k_read = qg * reads[..., None], k_read * reads[..., None]
        kg = kg * in_last[..., None]
        decay = decay * carries[..., None]
    return Terms(decay, qg, k_read, kg, v, beta, akk, aqk)


def _parts(q, k, v, g, beta, seg, seg_prev, cfg: Config) -> Parts:
    """Parts of n chunks from raw input rows (as `_terms`); the backward differentiates this."""
    t = _terms(q, k, v, g, beta, seg, seg_prev, cfg)
    inv = unit_lower_inverse(_scale_rows(t.akk, t.beta))  # M
    # P and Q as two matmuls rather than one on a [kg^T; Aqk] concatenation: building that cost
    # more than the second call (0.6 ms of 13 in the forward at the benchmark shape).
    return Parts(
        decay=t.decay,
        p=_mm_tn(t.kg, inv),
        q=_mm(t.aqk, inv),
        bk=_scale_rows(t.k_read, t.beta),
        bv=_scale_rows(t.v, t.beta),
        qg=t.qg,
    )


def _group_inputs(xs, seg, i, rows):
    """Rows of loop step i (`rows` each): the five inputs, their document indices and the index of
    the row before."""
    t0 = i * rows
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, t0, rows, axis=1)
    if seg is None:
        return tuple(map(sl, xs)), None, None
    prev = jax.lax.dynamic_index_in_dim(seg, jnp.maximum(t0 - 1, 0), axis=1, keepdims=False)
    return tuple(map(sl, xs)), sl(seg), prev


def _group_flags(flags: Flags | None, i, n):
    if flags is None:
        return None
    return Flags(*(jax.lax.dynamic_slice_in_dim(f, i * n, n) for f in flags))


def _loop_dims(xs, chunk, n):
    """(B, padded T, H, K, V, loop steps) of a chunk loop with n chunks per step."""
    q, _, v, _, _ = xs
    B, Tp, H, K = q.shape
    return B, Tp, H, K, v.shape[-1], Tp // (n * chunk)


def _forward(xs, h0, seg, flags: Flags | None, cfg: Config, save_states: bool):
    """The chunk loop, forward only (see the module docstring for the per-chunk step).

    Against the earlier form S_next = exp(G_C) * S0 + A S0 + B, O = Qp S0 + Up with A, B, Qp, Up
    built from [W | U], this has a sixth fewer matmul FLOPs per chunk (5.2 vs 6.3 MFLOP per chunk
    and head at C=K=V=64): P and Q are [K,C]x[C,C] and [C,C]x[C,C] products where kg^T [W | U] and
    Aqk [W | U] were [*,C]x[C,K+V] ones, for one more [C,K]x[K,V]-sized state-step matmul."""
    n = cfg.fwd_group
    B, Tp, H, K, V, NG = _loop_dims(xs, cfg.chunk, n)
    f32 = jnp.float32

    def body(i, carry):
        out, states, state, finals = carry
        group, seg_i, prev = _group_inputs(xs, seg, i, n * cfg.chunk)
        parts = _parts(*group, seg_i, prev, cfg)
        fl = _group_flags(flags, i, n)
        hs, rs = [], []
        for c in range(n):
            if fl is not None:
                state = jnp.where(fl.start[c], h0[fl.seq[c]][None], state)
            hs.append(state)
            r = parts.bv[c] - _dot("bhck,bhkv->bhcv", parts.bk[c], state)
            rs.append(r)
            state = parts.decay[c, ..., None] * state + _dot("bhkc,bhcv->bhkv", parts.p[c], r)
            if fl is not None:
                seq = fl.seq[c]
                finals = finals.at[seq].set(jnp.where(fl.end[c], state[0], finals[seq]))
        hs = jnp.stack(hs)  # [n,B,H,K,V]
        o = _dot("...ck,...kv->...cv", parts.qg, hs) + _dot("...cj,...jv->...cv", parts.q, jnp.stack(rs))
        out = jax.lax.dynamic_update_slice_in_dim(out, _from_chunks(o), i * n * cfg.chunk, axis=1)
        if save_states:
            states = jax.lax.dynamic_update_slice_in_dim(states, hs, i * n, axis=0)
        return out, states, state, finals

    state0 = jnp.zeros((1, H, K, V), f32) if flags is not None else h0
    states0 = jnp.zeros((NG * n, B, H, K, V), f32) if save_states else None
    out, states, last, finals = jax.lax.fori_loop(
        0, NG, body, (jnp.zeros((B, Tp, H, V), f32), states0, state0, h0)
    )
    return out, (finals if flags is not None else last), states


def _backward(xs, h0, seg, flags: Flags | None, states, d_out, d_final, cfg: Config):
    n = cfg.group
    B, Tp, H, K, V, NG = _loop_dims(xs, cfg.chunk, n)
    f32 = jnp.float32

    def body(j, carry):
        grads, d_state, dh0 = carry
        i = NG - 1 - j
        group, seg_i, prev = _group_inputs(xs, seg, i, n * cfg.chunk)
        parts, parts_vjp = jax.vjp(lambda *a: _parts(*a, seg_i, prev, cfg), *group)
        fl = _group_flags(flags, i, n)
        hs = jax.lax.dynamic_slice_in_dim(states, i * n, n, axis=0)  # [n,B,H,K,V]
        rows = n * cfg.chunk
        do = _to_chunks(jax.lax.dynamic_slice_in_dim(d_out, i * rows, rows, axis=1).astype(f32), cfg.chunk)
        r = parts.bv - _dot("...ck,...kv->...cv", parts.bk, hs)  # R of every chunk
        dh_read = _dot("...kc,...cv->...kv", _t(parts.qg), do)  # outputs' read of S0
        dr_out = _dot("...ij,...jv->...iv", _t(parts.q), do)  # Q^T dO
        p_t, bk_t = _t(parts.p), _t(parts.bk)
        d_next, d_r = [None] * n, [None] * n  # cotangents of S_next, R
        for c in reversed(range(n)):
            if fl is not None:
                d_state = jnp.where(fl.end[c], d_final[fl.seq[c]][None], d_state)
            d_next[c] = d_state
            d_r[c] = dr_out[c] + _dot("bhck,bhkv->bhcv", p_t[c], d_state)
            d_state = (
                parts.decay[c, ..., None] * d_state + dh_read[c] - _dot("bhkc,bhcv->bhkv", bk_t[c], d_r[c])
            )
            if fl is not None:
                seq = fl.seq[c]
                dh0 = dh0.at[seq].set(jnp.where(fl.start[c], d_state[0], dh0[seq]))
                d_state = jnp.where(fl.start[c], 0.0, d_state)
        d_next, d_r = jnp.stack(d_next), jnp.stack(d_r)
        d_parts = Parts(
            decay=_rowdot(d_next, hs),
            p=_dot("...kv,...cv->...kc", d_next, r),
            q=_dot("...iv,...jv->...ij", do, r),
            bk=-_dot("...cv,...kv->...ck", d_r, hs),
            bv=d_r,
            qg=_dot("...cv,...kv->...ck", do, hs),
        )
        d_group = parts_vjp(d_parts)
        grads = tuple(
            jax.lax.dynamic_update_slice_in_dim(gr, dx.astype(gr.dtype), i * rows, axis=1)
            for gr, dx in zip(grads, d_group)
        )
        return grads, d_state, dh0

    d_state0 = jnp.zeros((1, H, K, V), f32) if flags is not None else d_final
    # Varlen: a sequence without chunks (empty) passes its initial state through as its final one.
    dh0 = d_final if flags is not None else jnp.zeros_like(h0)
    grads, d_first, dh0 = jax.lax.fori_loop(
        0, NG, body, (tuple(jnp.zeros_like(x) for x in xs), d_state0, dh0)
    )
    return grads, (dh0 if flags is not None else d_first)


def _float0_like(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), tree)


_chunk_core = jax.custom_vjp(
    lambda xs, h0, seg, flags, cfg: _chunk_core_impl(xs, h0, seg, flags, cfg), nondiff_argnums=(4,)
)


def _chunk_core_impl(xs, h0, seg, flags, cfg):
    out, final, _ = _forward(xs, h0, seg, flags, cfg, save_states=False)
    return out, final


def _core_fwd(xs, h0, seg, flags, cfg):
    out, final, states = _forward(xs, h0, seg, flags, cfg, save_states=True)
    return (out, final), (xs, h0, seg, flags, states)


def _core_bwd(cfg, res, cotangents):
    xs, h0, seg, flags, states = res
    d_out, d_final = cotangents
    d_xs, dh0 = _backward(xs, h0, seg, flags, states, d_out, d_final, cfg)
    return d_xs, dh0, _float0_like(seg), _float0_like(flags)


_chunk_core.defvjp(_core_fwd, _core_bwd)


def _largest_factor(n, at_most):
    """The largest divisor of n that is <= max(1, at_most): the forward loop steps over whole
    backward groups, so both loops tile the same padded sequence."""
    k = max(1, min(n, at_most))
    while n % k:
        k -= 1
    return k


def _pad_time(x, total):
    pad = total - x.shape[1]
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def kda_chunk(
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
    chunk_size=CHUNK,
):
    """Chunkwise KDA (same contract as `pallas_kernels.kda.kda`)."""
    n_seq = validate_inputs(q, k, v, g, beta, initial_state, cu_seqlens, segment_ids)
    if chunk_size % SUB:
        raise ValueError(f"kda: chunk_size must be a multiple of {SUB}, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = (
        jnp.zeros((n_seq, H, K, V), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    xs = (q, k, v, g, beta)

    flags = seg = None
    if cu_seqlens is not None:
        layout = varlen_layout(cu_seqlens, T, chunk_size)
        num_chunks = layout.num_chunks
        xs = tuple(
            jnp.zeros((1, num_chunks * chunk_size) + x.shape[2:], x.dtype).at[:, layout.dest].set(x)
            for x in xs
        )
        flags = Flags(layout.chunk_seq, layout.chunk_start, layout.chunk_end)
    else:
        num_chunks = -(-T // chunk_size)
    rows = B * H * chunk_size
    bwd_rows, fwd_rows = group_rows(jax.default_backend())
    group = max(1, min(num_chunks, bwd_rows // rows))
    num_chunks = -(-num_chunks // group) * group
    fwd_group = group * _largest_factor(num_chunks // group, fwd_rows // (rows * group))
    total = num_chunks * chunk_size
    xs = tuple(_pad_time(x, total) for x in xs)
    if flags is not None:
        pad = num_chunks - flags.seq.shape[0]
        flags = Flags(
            jnp.pad(flags.seq, (0, pad)), jnp.pad(flags.start, (0, pad)), jnp.pad(flags.end, (0, pad))
        )
    elif segment_ids is not None:
        # document indices, so a reused id is a new document; padding continues the last one
        seg = jnp.pad(document_index(segment_ids), [(0, 0), (0, total - T)], mode="edge")

    cfg = Config(chunk_size, group, fwd_group, default_scale(q, scale), bool(use_qk_l2norm))
    o, final = _chunk_core(xs, h0, seg, flags, cfg)
    o = o[:, layout.dest] if cu_seqlens is not None else o[:, :T]
    return o.astype(v.dtype), (final if output_final_state else None)
