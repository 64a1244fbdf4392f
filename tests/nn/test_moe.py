import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.nn.moe import MoE, experts_blocked, experts_onehot, moe_experts, route, rows_per_block


def _route_numpy(x, w, bias, k, n_group, topk_group, renorm, scale):
    s = 1 / (1 + np.exp(-(x.astype(np.float64) @ w.astype(np.float64))))
    choice = s + bias
    N, E = s.shape
    idx, wts = [], []
    for n in range(N):
        c = choice[n].copy()
        if n_group > 1:
            g = c.reshape(n_group, -1)
            gs = np.sort(g, axis=1)[:, -2:].sum(1)
            keep = np.argsort(-gs, kind="stable")[:topk_group]
            mask = np.zeros(n_group, bool)
            mask[keep] = True
            c = np.where(np.repeat(mask, E // n_group), c, -np.inf)
        top = np.argsort(-c, kind="stable")[:k]
        ww = s[n, top]
        if renorm:
            ww = ww / (ww.sum() + 1e-20)
        idx.append(top)
        wts.append(ww * scale)
    return np.array(wts), np.array(idx)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_route_matches_numpy(n_group, topk_group):
    rng = np.random.default_rng(0)
    N, D, E, K = 32, 16, 16, 3
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = rng.normal(size=(D, E)).astype(np.float32) * 0.3
    bias = rng.normal(size=E).astype(np.float32) * 0.5
    wts, idx = route(
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(bias),
        top_k=K,
        n_group=n_group,
        topk_group=topk_group,
        renormalize=True,
        scaling=2.446,
    )
    rw, ri = _route_numpy(x, w, bias, K, n_group, topk_group, True, 2.446)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.sort(ri, 1))
    order = np.argsort(np.asarray(idx), 1)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(wts), order, 1), np.take_along_axis(rw, np.argsort(ri, 1), 1), rtol=1e-5
    )
    assert wts.dtype == jnp.float32


def test_weights_use_uncorrected_scores():
    x = jnp.ones((1, 2))
    w = jnp.zeros((2, 4))  # every score sigmoid(0) = 0.5
    bias = jnp.array([0.0, 5.0, 0.0, 5.0])  # bias picks experts 1 and 3 ...
    wts, idx = route(x, w, bias, top_k=2, renormalize=False, scaling=1.0)
    assert sorted(np.asarray(idx)[0].tolist()) == [1, 3]
    np.testing.assert_allclose(wts, 0.5)  # ... but weights are the unbiased 0.5


@pytest.mark.parametrize("dispatch", ["ragged", "blocked", "gather"])
@pytest.mark.parametrize("N", [3, 40])
def test_dispatch_matches_onehot(dispatch, N):
    rng = np.random.default_rng(1)
    E, D, F, K = 8, 12, 10, 2
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(E, F, D)) * 0.3, jnp.float32)
    wts, idx = route(x, jnp.asarray(rng.normal(size=(D, E)), jnp.float32), None, top_k=K)
    if N == 40:  # make the load uneven (some experts empty)
        idx = jnp.where(idx == 5, 0, idx)
        idx = idx.at[:, 1].set(jnp.where(idx[:, 0] == idx[:, 1], (idx[:, 0] + 1) % 5, idx[:, 1]))
    ref = moe_experts(x, wts, idx, w1, w3, w2, dispatch="onehot")
    out = jax.jit(lambda *a: moe_experts(*a, dispatch=dispatch))(x, wts, idx, w1, w3, w2)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dispatch", ["ragged", "blocked", "gather"])
def test_dispatch_gradients_match_onehot(dispatch):
    rng = np.random.default_rng(3)
    E, D, F, K, N = 8, 12, 10, 2, 40
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(E, F, D)) * 0.3, jnp.float32)
    wts, idx = route(x, jnp.asarray(rng.normal(size=(D, E)), jnp.float32), None, top_k=K)
    idx = jnp.where(idx == 5, 0, idx)  # uneven load, one expert empty
    idx = idx.at[:, 1].set(jnp.where(idx[:, 0] == idx[:, 1], (idx[:, 0] + 1) % 5, idx[:, 1]))
    cot = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)

    def grads(d):
        f = lambda x, wts, w1, w3, w2: jnp.sum(moe_experts(x, wts, idx, w1, w3, w2, dispatch=d) * cot)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(x, wts, w1, w3, w2)

    for name, got, want in zip(("x", "weights", "w1", "w3", "w2"), grads(dispatch), grads("onehot")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_blocked_with_small_blocks_many_groups():
    rng = np.random.default_rng(2)
    E, D, F, K, N = 16, 8, 6, 4, 50
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(E, F, D)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(N)]), jnp.int32)
    wts = jnp.asarray(rng.uniform(size=(N, K)), jnp.float32)
    ref = experts_onehot(x, wts, idx, w1, w3, w2)
    for bm in (1, 3, 8, 64):
        np.testing.assert_allclose(
            experts_blocked(x, wts, idx, w1, w3, w2, block_rows=bm), ref, rtol=1e-4, atol=1e-4
        )


def test_block_rows_per_backend_meet_the_flop_target():
    """The blocked dispatch computes A + E*bm rows for A assignments (static blocks): at the 48B
    widths (4096 tokens x top-8 over 256 experts) the GPU rule stays within the issue's 1.3x of the
    ideal FLOPs, the CPU rule keeps its measured-fastest whole-group blocks (2x)."""
    A, E = 4096 * 8, 256
    flops_ratio = lambda bm: (A + E * bm) / A  # noqa: E731
    assert rows_per_block(A, E, "gpu") == 32 and flops_ratio(32) <= 1.3
    assert rows_per_block(A, E, "cuda") == rows_per_block(A, E, "gpu")
    assert rows_per_block(A, E, "cpu") == 128
    assert rows_per_block(64, 16, "gpu") == 8  # the floor: never below 8 rows
    assert rows_per_block(10**7, 8, "cpu") == 128  # the cap


def test_moe_module_shared_expert_and_axes():
    E, D, F, K, S = 4, 12, 8, 2, 2
    m = MoE(
        hidden_size=D,
        num_experts=E,
        num_experts_per_token=K,
        moe_intermediate_size=F,
        num_shared_experts=S,
        routed_scaling_factor=2.0,
    )
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
    # Shapes and axes from an abstract init (a concrete one compiles every initializer: ~15 s), then
    # random values, with a non-zero correction bias so that routing by biased scores but weighting
    # by raw ones matters.
    boxes = jax.eval_shape(m.init, jax.random.PRNGKey(1), x)["params"]
    axes = {
        "router": ("embed", None),
        "e_score_correction_bias": (None,),
        "w1": ("expert", "embed", "mlp"),
        "w3": ("expert", "embed", "mlp"),
        "w2": ("expert", "mlp", "embed"),
        "shared_gate_proj": ("embed", "mlp"),
        "shared_up_proj": ("embed", "mlp"),
        "shared_down_proj": ("mlp", "embed"),
    }
    assert {k: b.names for k, b in boxes.items()} == axes
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes.values())
    assert boxes["shared_gate_proj"].value.shape == (D, F * S)
    v = {
        "params": {
            k: b.replace_boxed(jnp.asarray(rng.normal(size=b.value.shape) * 0.4, jnp.float32))
            for k, b in boxes.items()
        }
    }
    y = np.asarray(jax.jit(m.apply)(v, x), np.float64)

    # The same layer in float64 numpy, token by token: routing, K experts, then the shared expert.
    p = {k: np.asarray(b.value, np.float64) for k, b in v["params"].items()}
    silu = lambda a: a / (1 + np.exp(-a))
    x_ND = np.asarray(x, np.float64).reshape(-1, D)
    wts, idx = _route_numpy(x_ND, p["router"], p["e_score_correction_bias"], K, 1, 1, True, 2.0)
    ref = np.zeros_like(x_ND)
    for n in range(len(x_ND)):
        for w, e in zip(wts[n], idx[n]):
            ref[n] += w * (silu(x_ND[n] @ p["w1"][e]) * (x_ND[n] @ p["w3"][e])) @ p["w2"][e]
        ref[n] += (silu(x_ND[n] @ p["shared_gate_proj"]) * (x_ND[n] @ p["shared_up_proj"])) @ p[
            "shared_down_proj"
        ]
    np.testing.assert_allclose(y.reshape(-1, D), ref, rtol=1e-4, atol=1e-5)


def test_bad_dispatch_named():
    with pytest.raises(ValueError, match="dispatch"):
        moe_experts(
            jnp.ones((1, 2)),
            jnp.ones((1, 1)),
            jnp.zeros((1, 1), jnp.int32),
            jnp.ones((2, 2, 2)),
            jnp.ones((2, 2, 2)),
            jnp.ones((2, 2, 2)),
            dispatch="sparse",
        )
