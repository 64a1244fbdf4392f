"""AutoDeco heads module: official weights reproduce the official T, P and statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as PS

from jaxllm.nn.autodeco import AutoDecoHeads, heads_from_official, heads_to_official
from jaxllm.ops.autodeco import prob_stats

GOLDEN_CASES = ["autodeco_small", "autodeco_vocab300"]


def _load(golden_dir, name):
    with np.load(golden_dir / "autodeco" / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def _state_dict(d):
    return {k: v for k, v in d.items() if k.startswith(("temp_head.", "top_p_head."))}


def _rel(actual, expected):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_float64(golden_dir, case):
    d = _load(golden_dir, case)
    with jax.enable_x64(True):
        module, variables = heads_from_official(_state_dict(d), param_dtype=jnp.float64)
        hidden = jnp.asarray(d["hidden"], jnp.float64)
        logits = jnp.asarray(d["logits"], jnp.float64)
        T, P = module.apply(variables, hidden, logits)
        assert T.dtype == jnp.float64 and T.shape == d["T"].shape
        assert _rel(T, d["T"]) <= 1e-9
        assert _rel(P, d["P"]) <= 1e-9
        stats = prob_stats(logits, T)
        for i in range(4):
            assert _rel(stats[..., i], d["prob_stats"][..., i]) <= 1e-9


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_float32(golden_dir, case):
    d = _load(golden_dir, case)
    module, variables = heads_from_official(_state_dict(d))
    hidden = jnp.asarray(d["hidden"], jnp.float32)
    logits = jnp.asarray(d["logits"], jnp.float32)
    T, P = jax.jit(module.apply)(variables, hidden, logits)
    assert T.dtype == jnp.float32
    assert _rel(T, d["T"]) <= 1e-5
    assert _rel(P, d["P"]) <= 1e-5
    stats = prob_stats(logits, T)
    for i in range(4):
        assert _rel(stats[..., i], d["prob_stats"][..., i]) <= 1e-5


def test_official_round_trip_is_exact(golden_dir):
    d = _load(golden_dir, "autodeco_small")
    sd = _state_dict(d)
    with jax.enable_x64(True):
        _, variables = heads_from_official(sd, param_dtype=jnp.float64)
        back = heads_to_official(variables)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape
        np.testing.assert_array_equal(back[k], sd[k])
        # safetensors writes a non-contiguous (transposed) view's memory as it lies: wrong heads
        assert back[k].flags.c_contiguous, k
    # Merged checkpoints carry the base model under llm.*: ignored, not an error.
    merged = dict(sd, **{"llm.lm_head.weight": np.zeros((3, 3))})
    module, _ = heads_from_official(merged)
    assert module.use_enhanced_features and module.mlp_dim == 256


def test_init_layout_param_count_and_logical_axes():
    H, V = 24, 40
    module = AutoDecoHeads()
    hidden = jnp.ones((2, 3, H))
    logits = jnp.zeros((2, 3, V))
    variables = module.init(jax.random.key(0), hidden, logits)
    n_params = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(variables)))
    # The research note's formula (reproduces the released heads' sizes).
    assert n_params == (256 * H + 256 + 257) + (256 * (H + 5) + 256 + 257)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["temp_head"]["mlp_0"]["kernel"] == PS("embed", "mlp")
    assert specs["temp_head"]["mlp_0"]["bias"] == PS("mlp")
    assert specs["top_p_head"]["mlp_0"]["kernel"] == PS(None, "mlp")
    assert specs["top_p_head"]["mlp_2"]["kernel"] == PS("mlp", None)
    # Official names and layout via the converter; round trip through it reproduces outputs.
    sd = heads_to_official(variables)
    assert sd["temp_head.mlp.0.weight"].shape == (256, H)
    assert sd["top_p_head.mlp.0.weight"].shape == (256, H + 5)
    assert sd["top_p_head.mlp.2.bias"].shape == (1,)
    module2, variables2 = heads_from_official(sd)
    x = jax.random.normal(jax.random.key(1), (2, 3, H))
    lg = jax.random.normal(jax.random.key(2), (2, 3, V))
    for a, b in zip(module.apply(variables, x, lg), module2.apply(variables2, x, lg)):
        np.testing.assert_array_equal(a, b)
    # Torch-default init: bounded by 1/sqrt(fan_in), so fresh heads start near T = 1.
    k0 = np.asarray(nn.meta.unbox(variables)["params"]["temp_head"]["mlp_0"]["kernel"])
    assert np.abs(k0).max() <= 1 / np.sqrt(H) and np.abs(k0).max() > 0.8 / np.sqrt(H)
    T, P = module.apply(variables, x, lg)
    assert np.all((np.asarray(T) > 0.5) & (np.asarray(T) < 1.5))
    assert np.all((np.asarray(P) > 0) & (np.asarray(P) < 1))


def test_gradient_routing():
    # T reaches the top-p head only through stop_gradient; the statistics are constants.
    H, V = 8, 30
    module = AutoDecoHeads(mlp_dim=16)
    x = jax.random.normal(jax.random.key(0), (1, 4, H))
    lg = jax.random.normal(jax.random.key(1), (1, 4, V)) * 3
    variables = module.init(jax.random.key(2), x, lg)

    def sum_p(params):
        return module.apply(params, x, lg)[1].sum()

    def sum_t(params):
        return module.apply(params, x, lg)[0].sum()

    gp = nn.meta.unbox(jax.grad(sum_p)(variables))["params"]
    gt = nn.meta.unbox(jax.grad(sum_t)(variables))["params"]
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(gp["temp_head"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(gp["top_p_head"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(gt["temp_head"]))
    g_logits = jax.grad(lambda l: module.apply(variables, x, l)[1].sum())(lg)
    assert np.all(np.asarray(g_logits) == 0)


def test_without_enhanced_features():
    H = 6
    rng = np.random.default_rng(0)
    sd = {
        "temp_head.mlp.0.weight": rng.normal(size=(32, H)),
        "temp_head.mlp.0.bias": rng.normal(size=32),
        "temp_head.mlp.2.weight": rng.normal(size=(1, 32)),
        "temp_head.mlp.2.bias": rng.normal(size=1),
        "top_p_head.mlp.0.weight": rng.normal(size=(32, H + 1)),
        "top_p_head.mlp.0.bias": rng.normal(size=32),
        "top_p_head.mlp.2.weight": rng.normal(size=(1, 32)),
        "top_p_head.mlp.2.bias": rng.normal(size=1),
    }
    module, variables = heads_from_official(sd)
    assert not module.use_enhanced_features and module.mlp_dim == 32
    h = rng.normal(size=(2, H))
    T, P = module.apply(variables, jnp.asarray(h, jnp.float32))  # no logits needed
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    t_ref = 2 * sig(
        relu(h @ sd["temp_head.mlp.0.weight"].T + sd["temp_head.mlp.0.bias"]) @ sd["temp_head.mlp.2.weight"].T
        + sd["temp_head.mlp.2.bias"]
    )
    x = np.concatenate([h, t_ref], -1)
    p_ref = sig(
        relu(x @ sd["top_p_head.mlp.0.weight"].T + sd["top_p_head.mlp.0.bias"])
        @ sd["top_p_head.mlp.2.weight"].T
        + sd["top_p_head.mlp.2.bias"]
    )
    np.testing.assert_allclose(T, t_ref, rtol=1e-5)
    np.testing.assert_allclose(P, p_ref, rtol=1e-5)


def _nnx_roundtrip(x, lg):
    module = AutoDecoHeads(mlp_dim=16)
    model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x, lg)
    T, P = model(x, lg)
    assert T.shape == (2, 3, 1) and P.shape == (2, 3, 1)
    assert np.all((np.asarray(T) > 0) & (np.asarray(T) < 2))
    # The NNX module holds the same parameter tree; Linen with those weights gives the same T, P.
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    T2, P2 = module.apply({"params": pure}, x, lg)
    np.testing.assert_allclose(T, T2, rtol=1e-6)
    np.testing.assert_allclose(P, P2, rtol=1e-6)


def test_nnx_bridge_wraps_the_module():
    H, V = 8, 20
    x = jax.random.normal(jax.random.key(0), (2, 3, H))
    lg = jax.random.normal(jax.random.key(1), (2, 3, V))
    # Flax 0.12 shards NNX variables eagerly from their logical names: that needs a mesh and
    # logical-axis rules (the sharded setting) ...
    mesh = jax.make_mesh((1,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("mlp", "tensor"), ("embed", None)]):
        _nnx_roundtrip(x, lg)
    # ... or eager sharding switched off (a plain single-device NNX user).
    with nnx.use_eager_sharding(False):
        _nnx_roundtrip(x, lg)


def test_decode_shapes():
    # One position per row, as the sampler sees it.
    H, V = 8, 20
    module = AutoDecoHeads(mlp_dim=16)
    x = jnp.ones((5, H))
    lg = jnp.zeros((5, V))
    variables = module.init(jax.random.key(0), x, lg)
    T, P = module.apply(variables, x, lg)
    assert T.shape == (5, 1) and P.shape == (5, 1)


def test_bad_inputs(golden_dir):
    sd = _state_dict(_load(golden_dir, "autodeco_small"))
    missing = dict(sd)
    del missing["top_p_head.mlp.2.bias"]
    with pytest.raises(ValueError, match="top_p_head.mlp.2.bias"):
        heads_from_official(missing)
    with pytest.raises(ValueError, match="temp_head.mlp.1.weight"):
        heads_from_official(dict(sd, **{"temp_head.mlp.1.weight": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match="top_p_head.mlp.0.weight"):
        heads_from_official(dict(sd, **{"top_p_head.mlp.0.weight": np.zeros((256, 19))}))
    with pytest.raises(ValueError, match="temp_head.mlp.2.weight"):
        heads_from_official(dict(sd, **{"temp_head.mlp.2.weight": np.zeros((2, 256))}))
    with pytest.raises(ValueError, match="state_dict"):
        heads_from_official([1, 2])
    module, variables = heads_from_official(sd)
    with pytest.raises(ValueError, match="logits"):
        module.apply(variables, jnp.ones((2, 6, 16)))
    with pytest.raises(ValueError, match="logits"):
        module.apply(variables, jnp.ones((2, 6, 16)), jnp.ones((2, 5, 11)))
    with pytest.raises(ValueError, match="params"):
        heads_to_official({"params": {"temp_head": {}}})
