"""Backend-neutral pieces of the Pallas KDA kernels (`tpu.py`, `gpu.py`).

Two halves:

* **Per-chunk math on values** (`chunk_fwd`, `chunk_bwd`): what one grid step (TPU) or one loop
  iteration (GPU) computes for one 64-token chunk of one (batch, head). Written in the subset of
  `jax.numpy`/`lax` that both Pallas lowerings accept: 2-D arrays only, no slicing or
  concatenation of values (Triton has neither), rows picked with masked reductions, masks built
  from `broadcasted_iota`, matmuls as `lax.dot_general` with plain or transposed operands, loops
  as `lax.fori_loop`. Everything is float32, but for the data matmuls' operands under
  `precision="default"` (bf16, float32 accumulation; `PRECISIONS` below).
* **The wrapper** (`kda_pallas`): argument checks, the chunk-aligned
  re-layout (`[B,T,H,K]` -> `[B,H,T',K]`, varlen sequences each starting a new chunk), the
  chunk-local cumsum of the gate, and a `jax.custom_vjp` around a backend's forward and backward
  `pallas_call`s. Everything outside the custom_vjp (layout, cumsum) is differentiated by JAX
  itself; the optional q/k L2 norm runs inside the kernels, forward and backward.

Chunk math (one chunk of C rows, chunk-initial state h [K,V], G = chunk-local cumsum of g, Gamma =
exp(G), gl = G[C-1]; see docs/kernels.md and research/kda.md section 2.3):

    P_ij  = sum_d k_id k_jd exp(G_id - G_jd)   (i > j)         L = diag(beta) P
    T     = (I + L)^-1                                          (block forward substitution)
    W     = T (beta Gamma k),  U = T (beta v),  D = U - W h
    A_ij  = s sum_d q_id k_jd exp(G_id - G_jd)  (i >= j)
    o     = s (q Gamma) h + A D
    h'    = exp(gl) h + (k exp(gl - G))^T D

Pairwise decays exp(G_i - G_j) go through the first row r of i's 16-token sub-chunk as
exp(G_i - G_r) exp(G_r - G_j): one matmul per sub-chunk covers its off-diagonal part (j < r, both
factors <= 1) and its diagonal block (factors within exp(+-SAFE_SPAN)). That form is taken per
chunk where `factorisable_flags` (computed by XLA outside the kernels) says every sub-chunk's
decay spans at most SAFE_SPAN; otherwise the diagonal blocks are built exactly, one column at a
time, with no positive exponent, so per-step log decays of -20 or less are safe (they underflow
to 0, as the true products do).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.kda.common import (
    L2NORM_EPS,
    default_scale,
    segment_resets,
    validate_inputs,
    varlen_layout,
)

CHUNK = 64  # C: tokens per chunk
SUB = 16  # BC: tokens per secondary sub-chunk
SUB_SHIFT = 4  # log2(SUB): sub-chunk index = row >> 4, row in sub-chunk = row & 15
NSUB = CHUNK // SUB
assert SUB == 1 << SUB_SHIFT
F32 = jnp.float32
BF16 = jnp.bfloat16
# The in-kernel data matmuls (pair matrices, inverse, W/U, state steps, their gradients), named after
# lax.Precision: "highest" takes float32 operands at about full precision (six bf16 passes on a
# TPU MXU; on GPU TF32x3, or IEEE in the intra kernel); "default" rounds the operands to bfloat16 and accumulates in float32 (one MXU
# pass, bf16 tensor cores), which is what DEFAULT gives float32 operands on a TPU. The rounding is
# an explicit cast, so interpret mode on CPU rounds as the hardware does. Products that only move,
# pick or sum gate values stay at full precision in both (`_pick`, tpu.py's `_exact`).
PRECISIONS = ("highest", "default")
_MATMUL_DTYPE = contextvars.ContextVar("kda_matmul_dtype", default=F32)
# How a kernel runs its float32-operand matmuls under "highest": lax.Precision.HIGHEST (IEEE on
# GPU), or a dot algorithm the kernel binds, such as the GPU kernels' TF32x3 (`gpu.py`).
_F32_DOT = contextvars.ContextVar("kda_f32_dot", default=lax.Precision.HIGHEST)


def precision_name(precision) -> str:
    """'highest' or 'default' from that name or a lax.Precision; ValueError for anything else."""
    name = precision.name.lower() if isinstance(precision, lax.Precision) else precision
    if name not in PRECISIONS:
        raise ValueError(
            f"kda: precision must be one of {PRECISIONS} or lax.Precision.HIGHEST / DEFAULT, got {precision!r}"
        )
    return name


def matmul_dtype(precision):
    """Operand dtype of the data matmuls under `precision` (accumulation is float32 in both)."""
    return F32 if precision_name(precision) == "highest" else BF16


@contextlib.contextmanager
def dot_precision(precision, f32_dot=None):
    """The data matmuls' precision while a kernel body is traced (default "highest"); `f32_dot`
    (a lax.Precision or DotAlgorithmPreset) replaces HIGHEST for the float32-operand ones.

    Kernel bodies enter this themselves, with the precision bound into the kernel function,
    so the traced kernel depends only on its own arguments.
    """
    token = _MATMUL_DTYPE.set(matmul_dtype(precision))
    f32_token = _F32_DOT.set(lax.Precision.HIGHEST if f32_dot is None else f32_dot)
    try:
        yield
    finally:
        _F32_DOT.reset(f32_token)
        _MATMUL_DTYPE.reset(token)


def with_precision(body):
    """A kernel taking `precision=` (and optionally `f32_dot=`) that traces `body` (the same
    kernel without them) under `dot_precision`."""

    def kernel(*refs, precision, f32_dot=None, **kw):
        with dot_precision(precision, f32_dot):
            body(*refs, **kw)

    kernel.__name__ = body.__name__.removesuffix("_body")
    return kernel


# chunk flags (int32 bit set per chunk)
START = 1  # first chunk of a sequence: state := h0[seq] before it
END = 2  # last chunk of a sequence: ht[seq] := state after it
FAST = 4  # the chunk's diagonal blocks may be factorised (`factorisable_flags`)


# ----------------------------------------------------------------------------------------------
# small helpers (values only)


def _matmul(a, b, contract):
    """a . b over dims `contract`, operands in the context's matmul dtype, float32 result."""
    dt = _MATMUL_DTYPE.get()
    precision = _F32_DOT.get() if dt == F32 else lax.Precision.DEFAULT
    return lax.dot_general(
        a.astype(dt), b.astype(dt), (contract, ((), ())), precision=precision, preferred_element_type=F32
    )


def _dot(a, b):
    """a @ b."""
    return _matmul(a, b, ((1,), (0,)))


def _dot_tn(a, b):
    """a^T @ b."""
    return _matmul(a, b, ((0,), (0,)))


def _dot_nt(a, b):
    """a @ b^T."""
    return _matmul(a, b, ((1,), (1,)))


def store(refs, values):
    """Write each kernel result into its output ref, in the ref's dtype."""
    for ref, value in zip(refs, values, strict=True):
        ref[...] = value.astype(ref.dtype)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _sub_of(i):
    """Sub-chunk index of row/column ids (shift, not division: cheap on every backend)."""
    return lax.shift_right_logical(i, SUB_SHIFT)


def _in_sub(i):
    """Position of row/column ids inside their sub-chunk."""
    return lax.bitwise_and(i, SUB - 1)


def _row(x, r):
    """Row r of a 2-D value as [1, n] (a masked reduction: values cannot be sliced in Triton)."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == r, x, 0.0), axis=0, keepdims=True)


def _rows_at(x, j):
    """[C, n]: row i holds x[SUB * (i // SUB) + j] (row j of i's own sub-chunk)."""
    blk = _sub_of(_iota(x.shape, 0))
    out = jnp.zeros_like(x)
    for a in range(NSUB):
        out = jnp.where(blk == a, _row(x, a * SUB + j), out)
    return out


def _pick(onehot, x):
    """onehot @ x at full precision whatever the context's: selecting rows must not round them."""
    return lax.dot_general(
        onehot, x, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=F32
    )


def _row_mm(x, r):
    """Row r of x as [1, n], on the MXU (a one-hot [1, C] matmul) instead of a masked reduction."""
    return _pick(jnp.where(_iota((1, x.shape[0]), 1) == r, 1.0, 0.0).astype(F32), x)


# Largest |G_i - G_r| (r = first row of i's sub-chunk) for which the diagonal 16x16 blocks take the
# matmul form: its factors stay within exp(60) ~ 1e26, far from float32 overflow (as chunk.py).
SAFE_SPAN = 60.0


def factorisable_flags(g, num_chunks, *, time_axis):
    """[NC] int32: FAST for chunks whose diagonal 16x16 blocks may be factorised into matmuls,
    from the raw per-step log decays g (time on `time_axis` (1 or 2), K last, NC * C steps).

    |G_i - G_r| (r = first row of i's sub-chunk) is at most the sum of |g| over the sub-chunk's
    other 15 rows; where that is <= SAFE_SPAN for every row, head and channel of the chunk, the
    factors stay within exp(SAFE_SPAN). True for per-step log decays above -4 on average, not for
    -20 per step (test_extreme_gates_ragged_length), which take the exact per-column form. Computed
    by XLA outside the kernels: one reduction over g, and a scalar per chunk for the kernels."""
    C = CHUNK
    shape = g.shape[:time_axis] + (num_chunks, NSUB, SUB) + g.shape[time_axis + 1 :]
    blocks = jnp.abs(g.astype(F32)).reshape(shape)
    span = jnp.sum(lax.slice_in_dim(blocks, 1, SUB, axis=time_axis + 2), axis=time_axis + 2)
    other = tuple(d for d in range(span.ndim) if d != time_axis)
    assert g.shape[time_axis] == num_chunks * C
    return jnp.where(jnp.max(span, axis=other) <= SAFE_SPAN, FAST, 0).astype(jnp.int32)


def _block_factors(G, blk):
    """Decay factors of sub-chunk `blk` in the factorised form, reference row r = its first row:
    (e_left [C,K] = exp(G_i - G_r) on the sub-chunk's rows, e_right [C,K] = exp(G_r - G_j) on rows
    j < r + SUB, zero elsewhere). (a e_left) (b e_right)^T holds M_ij for i in the sub-chunk and
    every j <= i: the off-diagonal part through r with both factors <= 1, the diagonal block with
    factors within exp(+-SAFE_SPAN); entries above the diagonal are garbage, masked by the caller."""
    rowK = _iota(G.shape, 0)
    Gr = _row_mm(G, blk * SUB)
    e_left = jnp.where(_sub_of(rowK) == blk, jnp.exp(jnp.minimum(G - Gr, SAFE_SPAN)), 0.0)
    e_right = jnp.where(rowK < (blk + 1) * SUB, jnp.exp(jnp.minimum(Gr - G, SAFE_SPAN)), 0.0)
    return e_left, e_right


def _pair_fast(a, b, G, strict):
    C = a.shape[0]
    ri, ci = _iota((C, C), 0), _iota((C, C), 1)
    out = jnp.zeros((C, C), F32)
    for blk in range(NSUB):
        e_left, e_right = _block_factors(G, blk)
        out = out + _dot_nt(a * e_left, b * e_right)
    return jnp.where((ci < ri) if strict else (ci <= ri), out, 0.0)


def _pair_exact(a, b, G, strict):
    C, _ = a.shape
    rowK = _iota(a.shape, 0)
    ri, ci = _iota((C, C), 0), _iota((C, C), 1)
    out = jnp.zeros((C, C), F32)
    # sub-chunk blk against all earlier rows, through reference row n = first row of blk
    for blk in range(1, NSUB):
        n = blk * SUB
        Gn = _row(G, n)
        in_blk = _sub_of(rowK) == blk
        before = rowK < n
        left = jnp.where(in_blk, a * jnp.exp(jnp.where(in_blk, G - Gn, 0.0)), 0.0)
        right = jnp.where(before, b * jnp.exp(jnp.where(before, Gn - G, 0.0)), 0.0)
        out = out + _dot_nt(left, right)
    # diagonal 16x16 blocks, exact pairwise decay, one column (j within sub-chunk) at a time
    sub_r = _in_sub(rowK)
    col_of = _sub_of(ri) * SUB

    def body(j, acc):
        bj, Gj = _rows_at(b, j), _rows_at(G, j)
        ok = (sub_r > j) if strict else (sub_r >= j)
        e = jnp.where(ok, jnp.exp(jnp.where(ok, G - Gj, 0.0)), 0.0)
        vals = jnp.sum(a * bj * e, axis=1, keepdims=True)  # [C, 1]
        return acc + jnp.where(ci == col_of + j, vals, 0.0)

    return lax.fori_loop(0, SUB, body, out)


def _pair(a, b, G, *, strict, fast):
    """M_ij = sum_d a_id b_jd exp(G_id - G_jd) for i > j (strict) or i >= j, else 0. [C, C].

    `fast` (scalar bool, from `factorisable_flags`): four matmuls, one per sub-chunk through its first
    row; else the exact form (diagonal blocks one column at a time, any gate magnitude)."""
    return lax.cond(fast, lambda *x: _pair_fast(*x, strict), lambda *x: _pair_exact(*x, strict), a, b, G)


def _pair_grads_fast(dM, a, b, G):
    da = jnp.zeros(a.shape, F32)
    db = jnp.zeros(b.shape, F32)
    for blk in range(NSUB):
        e_left, e_right = _block_factors(G, blk)
        da = da + e_left * _dot(dM, b * e_right)
        db = db + e_right * _dot_tn(dM, a * e_left)
    return da, db


def _pair_grads_exact(dM, a, b, G, strict):
    C, _ = a.shape
    rowK = _iota(a.shape, 0)
    ri, ci = _iota((C, C), 0), _iota((C, C), 1)
    da = jnp.zeros(a.shape, F32)
    db = jnp.zeros(b.shape, F32)
    for blk in range(1, NSUB):
        n = blk * SUB
        Gn = _row(G, n)
        in_blk = _sub_of(rowK) == blk
        before = rowK < n
        ea = jnp.where(in_blk, jnp.exp(jnp.where(in_blk, G - Gn, 0.0)), 0.0)
        eb = jnp.where(before, jnp.exp(jnp.where(before, Gn - G, 0.0)), 0.0)
        dM_blk = jnp.where((_sub_of(ri) == blk) & (ci < n), dM, 0.0)
        da = da + ea * _dot(dM_blk, b * eb)
        db = db + eb * _dot_tn(dM_blk, a * ea)
    sub_r = _in_sub(rowK)
    blkK = _sub_of(rowK)
    col_of = _sub_of(ri) * SUB

    def body(j, carry):
        da, db = carry
        bj, Gj = _rows_at(b, j), _rows_at(G, j)
        ok = (sub_r > j) if strict else (sub_r >= j)
        e = jnp.where(ok, jnp.exp(jnp.where(ok, G - Gj, 0.0)), 0.0)
        dcol = jnp.sum(jnp.where(ci == col_of + j, dM, 0.0), axis=1, keepdims=True)  # dM[i, c(i)]
        da = da + dcol * bj * e
        t = dcol * a * e  # belongs to db row c(i): sum it per sub-chunk
        for s in range(NSUB):
            r = jnp.sum(jnp.where(blkK == s, t, 0.0), axis=0, keepdims=True)
            db = jnp.where(rowK == s * SUB + j, db + r, db)
        return da, db

    return lax.fori_loop(0, SUB, body, (da, db))


def _pair_grads(dM, a, b, G, *, strict, fast):
    """Cotangents of `_pair` w.r.t. a and b: da_i = sum_j dM_ij b_j e_ij, db_j = sum_i dM_ij a_i e_ij.

    (The G cotangent is a * da - b * db.) `fast` as in `_pair`: the transposed products of the
    factorised form (the factors are exact where dM is not masked to zero), else the exact form.
    """
    C = a.shape[0]
    ri, ci = _iota((C, C), 0), _iota((C, C), 1)
    dM = jnp.where((ci < ri) if strict else (ci <= ri), dM, 0.0)
    return lax.cond(
        fast, lambda *x: _pair_grads_fast(*x), lambda *x: _pair_grads_exact(*x, strict), dM, a, b, G
    )


def _unit_lower_inverse(L):
    """(I + L)^-1 for strictly lower-triangular L [C, C] by block doubling: with X the inverse of
    the diagonal s-blocks and L_s the lower-left s-blocks inside each 2s-block,
    X_2s = X - X L_s X (one step of block forward substitution; exact, no powers of L formed),
    s = 1, 2, ..., C/2: log2(C) steps of two [C, C] matmuls instead of row-by-row substitution."""
    C = L.shape[0]
    ri, ci = _iota((C, C), 0), _iota((C, C), 1)
    X = jnp.where(ri == ci, 1.0, 0.0).astype(F32)
    s = 1
    while s < C:
        shift = s.bit_length() - 1  # log2(s)
        pair = lax.shift_right_logical(ri, shift + 1) == lax.shift_right_logical(ci, shift + 1)
        cross = lax.shift_right_logical(ri, shift) != lax.shift_right_logical(ci, shift)
        Ls = jnp.where(pair & cross, L, 0.0)
        X = X - Ls if s == 1 else X - _dot(X, _dot(Ls, X))  # X = I at s = 1
        s *= 2
    return X


class _Intra(NamedTuple):
    gamma: jax.Array  # exp(G) on rows that read the chunk-initial state, else 0   [C,K]
    P: jax.Array  # k-k pair matrix   [C,C] strictly lower
    T: jax.Array  # (I + diag(beta) P)^-1
    kb: jax.Array  # beta Gamma k      [C,K]
    vb: jax.Array  # beta v            [C,V]
    W: jax.Array  # T kb
    U: jax.Array  # T vb
    A: jax.Array  # s * q-k pair matrix [C,C] lower incl. diagonal
    kd: jax.Array  # k exp(gl - G)     [C,K]
    egl: jax.Array  # exp(gl - G) on rows that write the next state, else 0    [C,K]
    decay: jax.Array  # exp(gl) if the chunk-initial state survives the chunk, else 0  [K,1]
    same: jax.Array | None  # [C,C] rows i, j in the same segment (None: no segments)
    fast: jax.Array  # scalar bool: the diagonal blocks may be factorised (`factorisable_flags`)


def _segment_masks(seg):
    """seg = (rc [C,1], rr [1,C]): per row, the number of segment resets in the chunk up to and
    including it (float32), as a column and as a row. Returns (same [C,C], reads_s0 [C,1],
    in_last [C,1], carries [1,1])."""
    rc, rr = seg
    last = _row(rc, rc.shape[0] - 1)
    return rc == rr, rc == 0.0, rc == last, last == 0.0


def _intra(q, k, v, G, beta, glc, scale, seg, fast):
    C = q.shape[0]
    gamma = jnp.exp(G)
    egl = jnp.exp(_row(G, C - 1) - G)
    decay = jnp.exp(glc)
    P = _pair(k, k, G, strict=True, fast=fast)
    A = scale * _pair(q, k, G, strict=False, fast=fast)
    same = None
    if seg is not None:
        same, reads_s0, in_last, carries = _segment_masks(seg)
        P = jnp.where(same, P, 0.0)
        A = jnp.where(same, A, 0.0)
        gamma = jnp.where(reads_s0, gamma, 0.0)
        egl = jnp.where(in_last, egl, 0.0)
        decay = jnp.where(carries, decay, 0.0)
    T = _unit_lower_inverse(beta * P)
    kb = beta * gamma * k
    vb = beta * v
    W, U = _dot(T, kb), _dot(T, vb)
    return _Intra(gamma, P, T, kb, vb, W, U, A, k * egl, egl, decay, same, fast)


def _l2norm(x):
    """Row-wise x / sqrt(sum x^2 + 1e-6) (fla's eps on the sum) and the factor used."""
    r = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)
    return x * r, r


def _l2norm_bwd(y, r, dy):
    """Cotangent of x from that of y = x r: r (dy - y (y . dy))."""
    return r * (dy - y * jnp.sum(y * dy, axis=1, keepdims=True))


def chunk_intra(q, k, v, G, beta, glc, scale, seg=None, l2norm=False, *, fast):
    """The state-independent part of a chunk (parallel over chunks).

    Returns (W [C,K], U [C,V], A [C,C], qg [C,K] = s q Gamma, kd [C,K] = k exp(gl - G),
    decay [K,1] = exp(gl)), with segment masks applied when `seg` is given. With `l2norm`
    q and k are L2-normalised per row first (in-kernel, float32).
    """
    if l2norm:
        q, k = _l2norm(q)[0], _l2norm(k)[0]
    it = _intra(q, k, v, G, beta, glc, scale, seg, fast)
    return it.W, it.U, it.A, scale * q * it.gamma, it.kd, it.decay


def state_fwd_step(W, U, A, qg, kd, decay, h):
    """One chunk of the sequential state pass: (o [C,V], state after the chunk [K,V]).

    Column-separable in V: any V-slice of U and h gives that slice of o and of the new state.
    """
    D = U - _dot(W, h)
    o = _dot(qg, h) + _dot(A, D)
    return o, decay * h + _dot_tn(kd, D)


def state_bwd_step(W, A, qg, kd, decay, do, dhn):
    """One chunk of the reverse state-cotangent pass: dh (cotangent of the chunk-initial state)
    from dhn (cotangent of the state after the chunk). Column-separable in V like the forward."""
    dD = _dot_tn(A, do) + _dot(kd, dhn)
    return _dot_tn(qg, do) - _dot_tn(W, dD) + decay * dhn


def chunk_fwd(q, k, v, G, beta, glc, h, scale, seg=None, l2norm=False, *, fast):
    """One chunk forward. q,k,G [C,K]; v [C,V]; beta [C,1]; glc [K,1] = G[C-1] as a column;
    h [K,V] chunk-initial state; seg: optional segment ranks (see `_segment_masks`): the state
    resets to zero where the rank steps up. Returns (o [C,V], state after the chunk [K,V]),
    all float32."""
    return state_fwd_step(*chunk_intra(q, k, v, G, beta, glc, scale, seg, l2norm, fast=fast), h)


class StateGrads(NamedTuple):
    """The state side of one chunk's backward (`chunk_bwd_state`): every product over V, which
    is all the intra side (`chunk_bwd_intra`) needs of h, dhn and do."""

    dD: jax.Array  # [C,V] cotangent of D = U - W h
    dA: jax.Array  # [C,C] cotangent of A (segment mask not applied)
    dW: jax.Array  # [C,K] cotangent of W
    dqh: jax.Array  # [C,K] do h^T: cotangent of s (q Gamma)
    dkd: jax.Array  # [C,K] D dhn^T: cotangent of kd
    dglc: jax.Array  # [K,1] cotangent of the glc input


def chunk_bwd_state(W, U, A, kd, decay, h, do, dhn):
    """The V side of one chunk's backward, from the intra part's W, U, A, kd, decay (as
    `chunk_intra` returns them), the chunk-initial state h [K,V], do [C,V] and dhn [K,V] (the
    cotangent of the state after the chunk). Matmuls only: no pair matrices, no inverse."""
    D = U - _dot(W, h)
    dD = _dot_tn(A, do) + _dot(kd, dhn)
    return StateGrads(
        dD=dD,
        dA=_dot_nt(do, D),
        dW=-_dot_nt(dD, h),
        dqh=_dot_nt(do, h),
        dkd=_dot_nt(D, dhn),
        dglc=decay * jnp.sum(h * dhn, axis=1, keepdims=True),
    )


def _recompute(q, k, v, G, beta, glc, scale, seg, l2norm, fast):
    """The backward's recompute of a chunk: (q, k as the kernel uses them (L2-normalised with
    `l2norm`), their norm factors or None, the intra part)."""
    (qn, rq), (kn, rk) = (_l2norm(q), _l2norm(k)) if l2norm else ((q, None), (k, None))
    return qn, kn, (rq, rk), _intra(qn, kn, v, G, beta, glc, scale, seg, fast)


def _bwd_intra(it: _Intra, q, k, norms, v, G, beta, sg: StateGrads, scale):
    """(dq, dk, dv, dG, dbeta) from the recomputed intra part `it` of the kernel's q, k (`_recompute`)
    and the chunk's `StateGrads`; dq/dk w.r.t. the raw q/k where `norms` holds their L2 factors."""
    C = q.shape[0]
    # o = s (q Gamma) h + A D
    dq = scale * it.gamma * sg.dqh
    dG = q * dq
    dA = sg.dA * scale
    if it.same is not None:
        dA = jnp.where(it.same, dA, 0.0)
    dq_a, dk_a = _pair_grads(dA, q, k, G, strict=False, fast=it.fast)
    dq = dq + dq_a
    dk = dk_a
    dG = dG + q * dq_a - k * dk_a

    # D = U - W h;  W = T kb;  U = T vb
    dT = _dot_nt(sg.dW, it.kb) + _dot_nt(sg.dD, it.vb)
    dkb = _dot_tn(it.T, sg.dW)
    dvb = _dot_tn(it.T, sg.dD)
    dk = dk + beta * it.gamma * dkb
    dG = dG + beta * it.gamma * k * dkb
    dbeta = jnp.sum(it.gamma * k * dkb, axis=1, keepdims=True) + jnp.sum(v * dvb, axis=1, keepdims=True)
    dv = beta * dvb

    # T = (I + L)^-1, L = diag(beta) P
    ri, ci = _iota((C, C), 0), _iota((C, C), 1)
    dL = jnp.where(ci < ri, -_dot_nt(_dot_tn(it.T, dT), it.T), 0.0)
    if it.same is not None:
        dL = jnp.where(it.same, dL, 0.0)
    dbeta = dbeta + jnp.sum(dL * it.P, axis=1, keepdims=True)
    dk_r, dk_c = _pair_grads(beta * dL, k, k, G, strict=True, fast=it.fast)
    dk = dk + dk_r + dk_c
    dG = dG + k * (dk_r - dk_c)

    # h' = exp(gl) h + kd^T D,  kd = k exp(gl - G)
    dk = dk + it.egl * sg.dkd
    t = it.kd * sg.dkd
    dG = dG - t
    dG = jnp.where(_iota(dG.shape, 0) == C - 1, dG + jnp.sum(t, axis=0, keepdims=True), dG)
    rq, rk = norms
    if rq is not None:
        dq, dk = _l2norm_bwd(q, rq, dq), _l2norm_bwd(k, rk, dk)
    return dq, dk, dv, dG, dbeta


def chunk_bwd_intra(q, k, v, G, beta, glc, sg: StateGrads, scale, seg=None, l2norm=False, *, fast):
    """The intra side of one chunk's backward, recomputing the intra part: (dq, dk, dv, dG,
    dbeta [C,1]) from the chunk's inputs and its `StateGrads`. dG holds the cotangent of the
    in-chunk cumsum G (incl. its last row's use as gl inside); dq/dk are w.r.t. the raw q/k
    when `l2norm`."""
    qn, kn, norms, it = _recompute(q, k, v, G, beta, glc, scale, seg, l2norm, fast)
    return _bwd_intra(it, qn, kn, norms, v, G, beta, sg, scale)


def chunk_bwd(q, k, v, G, beta, glc, h, do, dhn, scale, seg=None, l2norm=False, *, fast):
    """One chunk backward, recomputing the intra-chunk part once: `chunk_bwd_state`, then the
    intra side (`chunk_bwd_intra`) on the same recompute. The TPU kernel's grid step; the GPU
    runs the two sides as two kernels.

    dhn [K,V] is the cotangent of the state after the chunk. Returns
    (dq, dk, dv, dG, dbeta [C,1], dglc [K,1], dh [K,V] cotangent of the chunk-initial state).
    """
    qn, kn, norms, it = _recompute(q, k, v, G, beta, glc, scale, seg, l2norm, fast)
    sg = chunk_bwd_state(it.W, it.U, it.A, it.kd, it.decay, h, do, dhn)
    dh = _dot_tn(scale * qn * it.gamma, do) - _dot_tn(it.W, sg.dD) + it.decay * dhn
    return (*_bwd_intra(it, qn, kn, norms, v, G, beta, sg, scale), sg.dglc, dh)


# ----------------------------------------------------------------------------------------------
# the wrapper: layout + custom_vjp around a backend's kernels


class Chunked(NamedTuple):
    """Kernel-side arrays: every per-token array as [B, H, NC*C, .], chunk metadata as [NC]."""

    q: jax.Array  # [B,H,Tp,K]   input dtype (or f32 after L2 norm)
    k: jax.Array
    v: jax.Array  # [B,H,Tp,V]
    G: jax.Array  # [B,H,Tp,K]   f32 chunk-local cumsum of g
    beta: jax.Array  # [B,H,Tp,1]   f32
    glc: jax.Array  # [B,H,NC,K,1] f32 G's last row per chunk, as a column
    h0: jax.Array  # [N,H,K,V]    f32
    seq: jax.Array  # [NC] int32   sequence of the chunk, relative to its batch row
    flags: jax.Array  # [NC] int32   START | END bits
    rc: jax.Array | None = None  # [B,Tp,1] f32  segment resets so far in the chunk (segment_ids)
    rr: jax.Array | None = None  # [B,NC,1,C] f32 the same, one row per chunk


# fwd(ch: Chunked, scale, l2norm) -> (o [B,H,Tp,V] in v dtype, hs [B,H,NC,K,V] f32, ht [N,H,K,V] f32)
# bwd(ch: Chunked, hs, do, dht, scale, l2norm) -> (dq, dk, dv, dG, dbeta, dglc, dh0), f32
# (l2norm: q/k L2 norm inside the kernels; dq/dk are then w.r.t. the raw q/k)
FwdFn = Callable[..., tuple]
BwdFn = Callable[..., tuple]


def _make_core(fwd: FwdFn, bwd: BwdFn, scale: float, l2norm: bool):
    @jax.custom_vjp
    def core(q, k, v, G, beta, glc, h0, seq, flags, rc, rr, seq_has_chunks):
        ch = Chunked(q, k, v, G, beta, glc, h0, seq, flags, rc, rr)
        o, _, ht = fwd(ch, scale, l2norm)
        return o, ht

    def core_fwd(q, k, v, G, beta, glc, h0, seq, flags, rc, rr, seq_has_chunks):
        ch = Chunked(q, k, v, G, beta, glc, h0, seq, flags, rc, rr)
        o, hs, ht = fwd(ch, scale, l2norm)
        return (o, ht), (ch, hs, seq_has_chunks)

    def core_bwd(res, cts):
        ch, hs, has = res
        do, dht = cts
        dq, dk, dv, dG, dbeta, dglc, dh0 = bwd(ch, hs, do.astype(F32), dht.astype(F32), scale, l2norm)
        dh0 = jnp.where(has[:, None, None, None], dh0, 0.0)  # sequences with no chunk: never written
        return (
            dq.astype(ch.q.dtype),
            dk.astype(ch.k.dtype),
            dv.astype(ch.v.dtype),
            dG,
            dbeta,
            dglc,
            dh0,
            None,
            None,
            None,
            None,
            None,
        )

    core.defvjp(core_fwd, core_bwd)
    return core


def _pad_last(x, n):
    pad = n - x.shape[-1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def kda_pallas(
    q,
    k,
    v,
    g,
    beta,
    *,
    fwd: FwdFn,
    bwd: BwdFn,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    segment_ids=None,
    use_qk_l2norm=False,
    pad_kv_to=None,
    name="kda_pallas",
):
    """Shared driver of `kda_pallas_tpu` / `kda_pallas_gpu` (same contract as `kda_recurrent`).

    pad_kv_to: optional fn(dim) -> padded dim (GPU: powers of two >= 16); zero padding of K/V
    channels is exact (padded key channels never receive a write, padded value columns are dropped).
    """
    n_seq = validate_inputs(q, k, v, g, beta, initial_state, cu_seqlens, segment_ids)
    scale = default_scale(q, scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = CHUNK
    h0 = jnp.zeros((n_seq, H, K, V), F32) if initial_state is None else initial_state.astype(F32)
    g = g.astype(F32)
    beta = beta.astype(F32)

    Kp, Vp = (pad_kv_to(K), pad_kv_to(V)) if pad_kv_to else (K, V)
    q, k, g = _pad_last(q, Kp), _pad_last(k, Kp), _pad_last(g, Kp)
    v = _pad_last(v, Vp)
    h0p = jnp.pad(h0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))

    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B,T,H,.] -> [B,H,T,.]
    beta4 = beta[..., None]
    if cu_seqlens is None:
        NC = max(1, -(-T // C))
        Tp = NC * C

        def to_chunks(x):
            x = heads_major(x)
            return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))

        def from_chunks(x):
            return heads_major(x[:, :, :T])

        c = jnp.arange(NC, dtype=jnp.int32)
        seq = jnp.zeros((NC,), jnp.int32)
        flags = jnp.where(c == 0, START, 0) | jnp.where(c == NC - 1, END, 0)
        has = jnp.ones((n_seq,), bool)
        rc = rr = None
        if segment_ids is not None:
            # resets (change points: a reused id is a new document) so far in the chunk, per
            # token; padding continues the row's last segment
            reset = segment_resets(jnp.pad(segment_ids, ((0, 0), (0, Tp - T)), mode="edge"))
            r = jnp.cumsum(reset.reshape(B, NC, C).astype(F32), axis=2)
            rc, rr = r.reshape(B, Tp, 1), r.reshape(B, NC, 1, C)
    else:
        lay = varlen_layout(cu_seqlens, T, C)
        NC = lay.num_chunks
        Tp = NC * C

        def to_chunks(x):
            x = heads_major(x)
            return jnp.zeros(x.shape[:2] + (Tp,) + x.shape[3:], x.dtype).at[:, :, lay.dest].set(x)

        def from_chunks(x):
            return heads_major(x[:, :, lay.dest])

        seq = lay.chunk_seq
        flags = jnp.where(lay.chunk_start, START, 0) | jnp.where(lay.chunk_end, END, 0)
        has = jnp.zeros((n_seq,), bool).at[seq].max(lay.chunk_start)
        rc = rr = None

    qL, kL, vL, gL, bL = (to_chunks(x) for x in (q, k, v, g, beta4))
    flags = (flags | factorisable_flags(gL, NC, time_axis=2)).astype(jnp.int32)
    GL = jnp.cumsum(gL.reshape(B, H, NC, C, Kp), axis=3)
    glc = GL[:, :, :, C - 1, :, None]  # [B,H,NC,Kp,1]
    GL = GL.reshape(B, H, Tp, Kp)

    core = _make_core(fwd, bwd, scale, bool(use_qk_l2norm))
    oL, ht = core(qL, kL, vL, GL, bL, glc, h0p, seq, flags, rc, rr, has)
    o = from_chunks(oL)[..., :V].astype(v.dtype)
    if not output_final_state:
        return o, None
    ht = ht[:, :, :K, :V]
    ht = jnp.where(has[:, None, None, None], ht, h0)  # empty sequences keep their initial state
    return o, ht


def next_pow2_min16(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p
