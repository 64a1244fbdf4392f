"""Mixture of experts: a DeepSeek-V3 style router ("noaux_tc", Kimi Linear) or a plain softmax top-k one (Qwen3-MoE).

Router (float32): s = sigmoid(x W_g); experts chosen on s + e_score_correction_bias with grouped
top-k (each of n_group groups scored by the sum of its two best corrected scores, the topk_group best
groups kept, the rest at -inf, then top-k experts); weights = the *uncorrected* s of the chosen
experts, renormalised as w / (sum(w) + 1e-20) when configured, times routed_scaling_factor.
Experts: w2(silu(w1 x) * w3 x), stacked along an `expert` axis. Shared experts: one SwiGLU of width
moe_intermediate_size * num_shared_experts, added unweighted.
Qwen3-MoE: `correction_bias=False` (no e_score_correction_bias), softmax scores, no groups, top-k,
renormalised only with norm_topk_prob, no shared experts; its load-balancing loss reads
`load_balance_stats` (`return_router_stats=True`).

Load balancing (training): the module sows each call's routing counts (assignments per expert, [E]
float32) into the `ROUTER_LOAD` collection when the caller makes it mutable; the train step reads
them to move `e_score_correction_bias` (`update_correction_bias`: DeepSeek-V3's aux-loss-free rule,
outside the gradient) and to report `load_stats`. With `return_aux_losses=True` it also returns
DeepSeek-V3's sequence-wise balance loss (`sequence_balance_loss`, weight `balance_loss_alpha`)
and the router z-loss (`router_z_loss`, weight `router_z_loss_coef`), already scaled.

Dispatch implementations (all give the same result):
- "onehot":  every expert on every token, combined by a dense [N,E] weight matrix (test reference);
- "gather":  gather the chosen experts' weights per token (best for a few tokens, i.e. decode);
- "ragged":  sort assignments by expert, `jax.lax.ragged_dot` grouped matmuls;
- "blocked": sort by expert, pad each group to a block multiple, one batched matmul over the blocks
             (each with its expert's weights): no E-fold densification on any backend;
- "auto":    gather for N*k <= num_experts, else the backend's entry in `AUTO_DISPATCH`.

Expert parallelism (`jaxllm.nn.moe_parallel`): when the MoE runs under a mesh whose `expert` axis
is > 1 (`jax.set_mesh`, as the train step does), tokens travel to their experts' devices and back
by all-to-all inside `shard_map`, and the dispatch above runs on each device's received tokens
(`grouped_ffn`); `capacity_factor` None = dropless; `expert_exchange="ragged"` sends only the
filled rows (`ragged_all_to_all`, dropless; not on XLA:CPU). With a `tensor` axis the experts'
intermediate width is split over it (partial outputs summed), not run whole on every shard.
Under a mesh without an expert axis each device dispatches its own tokens (`token_parallel_moe`):
left to XLA, the argsort over token-sharded assignments gathers the whole batch's assignments onto
every device. `expert_parallel=False` turns both off.

The dispatch table (`AUTO_DISPATCH`: backend -> `DispatchRule`; `tools/bench_moe.py` measures it,
docs/training.md has the numbers). For A = N*k assignments over E experts, "blocked" computes
A + E*bm rows (each expert's group padded to a block of bm rows), i.e. (1 + E*bm/A) x the ideal
FLOPs, with bm = the power of two <= A / (E * block_divisor), clipped to [8, 128]: a divisor d
gives at most 1 + 1/d (plus the power-of-two rounding) once A/E >= 8d. The price of small blocks is
the weights: every block runs with its own copy of its expert's [D,F] matrices, gathered into
(A/bm + E) stacks, so halving bm doubles that weight traffic (and memory of the gather).

| backend | "auto" (N*k > E) | block_divisor | why |
|---|---|---|---|
| cpu | blocked | 1 | XLA:CPU lowers `ragged_dot` to a dense loop over every expert (~500x slower |
|     |         |   | here); bm = A/E (2x the ideal FLOPs) was the fastest measured: 32-row blocks |
|     |         |   | cut the FLOPs to 1.25x but ran 1.7x slower (the gathered weights) |
| gpu | blocked | 4 | XLA:GPU rewrites `ragged_dot` into a dense dot over all E experts (E x the |
|     |         |   | FLOPs) unless the cuDNN ragged-dot fusion is on; bm = A/(4E) keeps the FLOPs |
|     |         |   | <= 1.25x (the issue's <= 1.3 target; 32-row blocks at the 48B widths) at 4x |
|     |         |   | the gathered-weight traffic of bm = A/E; not timed on a GPU |
| tpu | ragged  | - | XLA:TPU compiles `ragged_dot` to a grouped matmul (megablox-style); FLOPs from |
|     |         |   | the libtpu AOT compile in docs/training.md |
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn import moe_parallel
from jaxllm.nn._params import fan_in_init, param
from jaxllm.nn.mlp import swiglu

DISPATCHES = ("auto", "onehot", "gather", "ragged", "blocked")


class DispatchRule(NamedTuple):
    """One backend's row of the dispatch table (module docstring)."""

    dispatch: str  # what "auto" runs when N*k > num_experts
    block_divisor: int = 1  # "blocked": rows per block = the power of two <= N*k / (E * this)


_GPU_RULE = DispatchRule("blocked", block_divisor=4)
AUTO_DISPATCH = {
    "cpu": DispatchRule("blocked", block_divisor=1),
    "gpu": _GPU_RULE,
    "cuda": _GPU_RULE,
    "rocm": _GPU_RULE,
    "tpu": DispatchRule("ragged"),
}
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 8, 128


def dispatch_rule(backend: str | None = None) -> DispatchRule:
    """The table's row for `backend` (default: JAX's default backend; unknown ones get the CPU row)."""
    return AUTO_DISPATCH.get(backend or jax.default_backend(), AUTO_DISPATCH["cpu"])


def auto_dispatch(n_assign: int, num_experts: int, backend: str | None = None) -> str:
    """What dispatch="auto" runs for `n_assign` = N*k assignments (the table in the docstring)."""
    if n_assign <= num_experts:
        return "gather"
    return dispatch_rule(backend).dispatch


def rows_per_block(n_assign: int, num_experts: int, backend: str | None = None) -> int:
    """Rows per block of the "blocked" dispatch on `backend`: the power of two <= n_assign /
    (num_experts * block_divisor), clipped to [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]."""
    per = max(1, n_assign // (num_experts * dispatch_rule(backend).block_divisor))
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (per.bit_length() - 1))))


def route(
    x_ND,
    w_router_DE,
    bias_E,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    activation: str = "sigmoid",
):
    """Returns (weights_NK float32, experts_NK int32). `bias_E` None: choose on the scores alone."""
    return select_experts(
        router_scores(x_ND, w_router_DE, activation),
        bias_E,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        renormalize=renormalize,
        scaling=scaling,
    )


def select_experts(
    scores, bias_E, *, top_k: int, n_group: int = 1, topk_group: int = 1, renormalize=True, scaling=1.0
):
    """`route` from the [N,E] router scores."""
    choice = scores if bias_E is None else scores + bias_E.astype(jnp.float32)
    N, E = choice.shape
    if n_group > 1:
        per = E // n_group
        grouped = choice.reshape(N, n_group, per)
        best2 = jax.lax.top_k(grouped, min(2, per))[0].sum(-1)  # [N, G]
        _, keep_g = jax.lax.top_k(best2, topk_group)
        gmask = jnp.zeros((N, n_group), bool).at[jnp.arange(N)[:, None], keep_g].set(True)
        choice = jnp.where(jnp.repeat(gmask, per, axis=1), choice, -jnp.inf)
    _, idx_NK = jax.lax.top_k(choice, top_k)
    w = jnp.take_along_axis(scores, idx_NK, axis=-1)
    if renormalize:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * scaling, idx_NK.astype(jnp.int32)


def router_logits(x_ND, w_router_DE):
    """[N,E] float32 x W_g."""
    return jnp.dot(
        x_ND.astype(jnp.float32), w_router_DE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def scores_from_logits(logits_NE, activation: str = "sigmoid"):
    if activation == "sigmoid":
        return jax.nn.sigmoid(logits_NE)
    if activation == "softmax":
        return jax.nn.softmax(logits_NE, axis=-1)
    raise ValueError(f"route: activation must be 'sigmoid' or 'softmax', got {activation!r}")


def router_scores(x_ND, w_router_DE, activation: str = "sigmoid"):
    """[N,E] float32 router probabilities (sigmoid or softmax of x W_g, in float32)."""
    return scores_from_logits(router_logits(x_ND, w_router_DE), activation)


# ------------------------------------------------------------------ load balancing (pure functions)
ROUTER_LOAD = "router_load"  # the Flax collection the MoE module sows its routing counts into
LOAD_NAME = "expert_load"  # the sown variable's name, a sibling of the module's params
DROPPED_NAME = "dropped"  # assignments dropped past the expert-parallel capacity (int32, all devices)


def sown_by_layer(sown_tree, name: str) -> dict:
    """{"layers_1/moe": leaf, ...}: the leaves called `name` of a sown `ROUTER_LOAD` tree, keyed by
    their module path (the path the layer's params have)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(sown_tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names and names[-1] == name:
            out["/".join(names[:-1])] = leaf
    return out


def expert_load(idx_NK, num_experts: int):
    """[E] float32: how many of the N*K assignments each expert received."""
    return jnp.bincount(idx_NK.reshape(-1), length=num_experts).astype(jnp.float32)


def update_correction_bias(bias_E, load_E, rate):
    """DeepSeek-V3's aux-loss-free balancing: every expert's bias moves by `rate` towards the mean
    load (up when under-loaded, down when over-loaded, still when exactly at the mean)."""
    load_E = load_E.astype(jnp.float32)
    step_E = rate * jnp.sign(jnp.mean(load_E) - load_E)
    return (bias_E.astype(jnp.float32) + step_E).astype(bias_E.dtype)


def load_stats(load_E):
    """(max/mean load, overflow fraction) of one layer's counts [E]. The overflow is the fraction of
    assignments above the even share, i.e. what a capacity factor of 1 would drop (this dispatch is
    dropless, so nothing is dropped); both are 1 and 0 when the layer routed nothing."""
    load_E = load_E.astype(jnp.float32)
    mean = jnp.mean(load_E)
    total = jnp.sum(load_E)
    ratio = jnp.where(mean > 0, jnp.max(load_E) / jnp.where(mean > 0, mean, 1.0), 1.0)
    over = jnp.sum(jnp.maximum(load_E - mean, 0.0)) / jnp.maximum(total, 1.0)
    return ratio, over


def sequence_balance_loss(scores_BTE, idx_BTK):
    """DeepSeek-V3's sequence-wise balance loss (unweighted): per row, sum_e f_e * P_e with
    f_e = E / (K T) * (times e is chosen) and P_e = mean over the row of the scores normalised to
    sum 1 over experts; the mean over rows. 1 when every row spreads its tokens evenly."""
    B, T, E = scores_BTE.shape
    K = idx_BTK.shape[-1]
    chosen_BE = jnp.sum(jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32), axis=(1, 2))
    f_BE = chosen_BE * (E / (K * T))
    s = scores_BTE.astype(jnp.float32)
    p_BE = jnp.mean(s / (jnp.sum(s, axis=-1, keepdims=True) + 1e-20), axis=1)
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def router_z_loss(logits_NE):
    """ST-MoE's router z-loss (unweighted): the mean over tokens of logsumexp(router logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)))


def load_balance_stats(probs_NE, idx_NK):
    """(routed_E, prob_E): per expert, the mean over tokens of how often it is chosen (summed over
    the k slots) and of its router probability; transformers' `load_balancing_loss_func` is
    E * sum_e routed_e * prob_e with both means taken over every layer's tokens together."""
    E = probs_NE.shape[-1]
    routed_E = jnp.mean(jnp.sum(jax.nn.one_hot(idx_NK, E, dtype=jnp.float32), axis=1), axis=0)
    return routed_E, jnp.mean(probs_NE.astype(jnp.float32), axis=0)


def _expert(x, w1, w3, w2):
    return swiglu(x, w1, w3, w2)


def experts_onehot(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD):
    E = w1_EDF.shape[0]
    combine_NE = jnp.sum(jax.nn.one_hot(idx_NK, E, dtype=jnp.float32) * weights_NK[..., None], axis=1)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_ND, w1_EDF)) * jnp.einsum("nd,edf->nef", x_ND, w3_EDF)
    y_NED = jnp.einsum("nef,efd->ned", h, w2_EFD)
    return jnp.einsum("ned,ne->nd", y_NED.astype(jnp.float32), combine_NE)


def experts_gather(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD):
    w1, w3, w2 = w1_EDF[idx_NK], w3_EDF[idx_NK], w2_EFD[idx_NK]  # [N,K,D,F] ...
    h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", x_ND, w1)) * jnp.einsum("nd,nkdf->nkf", x_ND, w3)
    y_NKD = jnp.einsum("nkf,nkfd->nkd", h, w2)
    return jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), weights_NK)


def _sort_assignments(idx_NK, E):
    flat_e = idx_NK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    group_sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    return order, flat_e[order], group_sizes


def _unsort_combine(y_sorted, order, weights_NK):
    N, K = weights_NK.shape
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(N, K, -1)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK)


def experts_ragged(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD):
    N, K = idx_NK.shape
    order, _, gs = _sort_assignments(idx_NK, w1_EDF.shape[0])
    xs = x_ND[order // K]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1_EDF, gs)) * jax.lax.ragged_dot(xs, w3_EDF, gs)
    ys = jax.lax.ragged_dot(h.astype(x_ND.dtype), w2_EFD, gs)
    return _unsort_combine(ys, order, weights_NK)


def experts_blocked(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD, *, block_rows=None):
    """`block_rows` None: the default backend's rule (`rows_per_block`, the dispatch table)."""
    N, K = idx_NK.shape
    E, D = w1_EDF.shape[:2]
    A = N * K
    bm = block_rows or rows_per_block(A, E)
    order, sorted_e, gs = _sort_assignments(idx_NK, E)
    padded = (gs + bm - 1) // bm * bm
    pad_end = jnp.cumsum(padded)
    pad_start = pad_end - padded
    start = jnp.cumsum(gs) - gs
    dest = pad_start[sorted_e] + jnp.arange(A) - start[sorted_e]  # row of each sorted assignment
    n_blocks = -(-A // bm) + min(E, A)  # static upper bound
    x_pad = jnp.zeros((n_blocks * bm, D), x_ND.dtype).at[dest].set(x_ND[order // K])
    block_e = jnp.clip(jnp.searchsorted(pad_end, jnp.arange(n_blocks) * bm, side="right"), 0, E - 1)

    # One batched matmul over all blocks, each with its expert's weights gathered: the gathered
    # stacks cost ~(1 + A/(bm*E)) x the expert weights in memory, but a loop over blocks (lax.map,
    # skipping unused ones) was 2x slower in fwd+bwd at 32 experts, and indexing the [E,...] stacks
    # inside it made the backward scatter a full [E,D,F] gradient per block (6x slower again).
    # Unused blocks hold zero rows and give zeros.
    xb_NBD = x_pad.reshape(n_blocks, bm, D)
    y_pad = jax.vmap(_expert)(xb_NBD, w1_EDF[block_e], w3_EDF[block_e], w2_EFD[block_e])
    ys = y_pad.reshape(n_blocks * bm, -1)[dest]
    return _unsort_combine(ys, order, weights_NK)


_IMPLS = {
    "onehot": experts_onehot,
    "gather": experts_gather,
    "ragged": experts_ragged,
    "blocked": experts_blocked,
}


def moe_experts(x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD, *, dispatch="auto"):
    """Weighted sum over each token's chosen experts; float32 out."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if dispatch == "auto":
        dispatch = auto_dispatch(idx_NK.size, w1_EDF.shape[0])
    return _IMPLS[dispatch](x_ND, weights_NK, idx_NK, w1_EDF, w3_EDF, w2_EFD)


def grouped_ffn(x_RD, e_R, w1_EDF, w3_EDF, w2_EFD, *, dispatch="auto"):
    """Each row through its own expert: y_R = expert_{e_R}(x_R), 0 where e_R < 0 (an empty slot of
    the expert-parallel receive buffer). Output in x's dtype."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    E = w1_EDF.shape[0]
    valid_R = e_R >= 0
    if dispatch == "auto":
        dispatch = auto_dispatch(e_R.shape[0], E)
    if dispatch == "ragged":
        # empty rows sort last, past the group sizes: ragged_dot leaves them 0 and skips them
        e_or_end = jnp.where(valid_R, e_R, E)
        order = jnp.argsort(e_or_end, stable=True)
        gs = jnp.bincount(e_or_end, length=E).astype(jnp.int32)  # drops E (it counts -1 as 0)
        xs = x_RD[order]
        h = jax.nn.silu(jax.lax.ragged_dot(xs, w1_EDF, gs)) * jax.lax.ragged_dot(xs, w3_EDF, gs)
        ys = jax.lax.ragged_dot(h.astype(x_RD.dtype), w2_EFD, gs)
        return jnp.zeros_like(ys).at[order].set(ys).astype(x_RD.dtype)
    # the other dispatches as one-slot routing with weight 1 (0 for empty rows, sent to expert 0)
    y = _IMPLS[dispatch](
        x_RD, valid_R[:, None].astype(jnp.float32), jnp.maximum(e_R, 0)[:, None], w1_EDF, w3_EDF, w2_EFD
    )
    return y.astype(x_RD.dtype)


class MoE(nn.Module):
    hidden_size: int
    num_experts: int
    num_experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    router_activation: str = "sigmoid"
    dispatch: str = "auto"
    correction_bias: bool = True  # DeepSeek-V3's e_score_correction_bias (Kimi); False for Qwen3-MoE
    return_router_stats: bool = False  # also return `load_balance_stats` (Qwen3-MoE's aux loss)
    return_aux_losses: bool = False  # also return {name: scaled loss} (below; empty when both are 0)
    balance_loss_alpha: float = 0.0  # DeepSeek-V3's sequence-wise balance loss weight
    router_z_loss_coef: float = 0.0  # ST-MoE's router z-loss weight
    # under a mesh: all-to-all to the experts' devices when its `expert` axis > 1, else each device
    # dispatches its own tokens (moe_parallel.token_parallel_moe); False: XLA partitions the dispatch
    expert_parallel: bool = True
    capacity_factor: float | None = None  # expert-parallel slots per device pair; None = dropless
    expert_exchange: str = "dense"  # "ragged": dropless ragged_all_to_all (moe_parallel; not XLA:CPU)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        D, E, F, pd = self.hidden_size, self.num_experts, self.moe_intermediate_size, self.param_dtype
        router = param(self, "router", (D, E), ("embed", None), dtype=pd, init=fan_in_init(D))
        bias = None
        if self.correction_bias:
            bias = param(
                self, "e_score_correction_bias", (E,), (None,), dtype=jnp.float32, init=nn.initializers.zeros
            )
        w1 = param(self, "w1", (E, D, F), ("expert", "embed", "mlp"), dtype=pd, init=fan_in_init(D))
        w3 = param(self, "w3", (E, D, F), ("expert", "embed", "mlp"), dtype=pd, init=fan_in_init(D))
        w2 = param(self, "w2", (E, F, D), ("expert", "mlp", "embed"), dtype=pd, init=fan_in_init(F))
        B, T = x_BTD.shape[:2]
        x_ND = x_BTD.reshape(B * T, D).astype(self.dtype)
        logits = router_logits(x_ND, router)
        scores = scores_from_logits(logits, self.router_activation)
        weights, idx = select_experts(
            scores,
            bias,
            top_k=self.num_experts_per_token,
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=self.renormalize,
            scaling=self.routed_scaling_factor,
        )
        if not self.is_initializing():  # counts are per call, never part of the variables
            self.sow(ROUTER_LOAD, LOAD_NAME, expert_load(idx, E), init_fn=lambda: 0.0, reduce_fn=jnp.add)
        cd = self.dtype
        mesh = jax.sharding.get_abstract_mesh()
        dropped = jnp.zeros((), jnp.int32)  # only a capacity-limited expert-parallel dispatch drops
        if self.expert_parallel and moe_parallel.can_shard(mesh, B * T, E):
            ffn = functools.partial(grouped_ffn, dispatch=self.dispatch)
            y, dropped = moe_parallel.expert_parallel_moe(
                x_ND,
                weights,
                idx,
                w1.astype(cd),
                w3.astype(cd),
                w2.astype(cd),
                mesh=mesh,
                ffn=ffn,
                capacity_factor=self.capacity_factor,
                exchange=self.expert_exchange,
            )
        elif self.expert_parallel and moe_parallel.can_shard_tokens(mesh, B * T):
            y = moe_parallel.token_parallel_moe(
                x_ND,
                weights,
                idx,
                w1.astype(cd),
                w3.astype(cd),
                w2.astype(cd),
                mesh=mesh,
                experts=functools.partial(moe_experts, dispatch=self.dispatch),
            )
        else:
            y = moe_experts(
                x_ND, weights, idx, w1.astype(cd), w3.astype(cd), w2.astype(cd), dispatch=self.dispatch
            )
        if not self.is_initializing():
            self.sow(ROUTER_LOAD, DROPPED_NAME, dropped, init_fn=lambda: 0, reduce_fn=jnp.add)
        y = y.astype(cd).reshape(B, T, D)
        if self.num_shared_experts:
            Fs = F * self.num_shared_experts
            sg = param(self, "shared_gate_proj", (D, Fs), ("embed", "mlp"), dtype=pd, init=fan_in_init(D))
            su = param(self, "shared_up_proj", (D, Fs), ("embed", "mlp"), dtype=pd, init=fan_in_init(D))
            sd = param(self, "shared_down_proj", (Fs, D), ("mlp", "embed"), dtype=pd, init=fan_in_init(Fs))
            y = y + swiglu(x_BTD.astype(cd), sg, su, sd)
        if self.return_router_stats:
            return y, load_balance_stats(scores, idx)
        if self.return_aux_losses:
            aux = {}
            if self.balance_loss_alpha:
                K = self.num_experts_per_token
                balance = sequence_balance_loss(scores.reshape(B, T, E), idx.reshape(B, T, K))
                aux["moe_balance"] = self.balance_loss_alpha * balance
            if self.router_z_loss_coef:
                aux["router_z"] = self.router_z_loss_coef * router_z_loss(logits)
            return y, aux
        return y
