"""The Qwen3 / Qwen3-MoE / Qwen2 / Llama family against transformers' goldens, the contract, configs."""

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxllm
from jaxllm.errors import ConfigError
from jaxllm.models import base, registry
from jaxllm.models.qwen import Qwen, QwenConfig, hf_key_specs
from jaxllm.nn.moe import MoE
from jaxllm.sharding import LOGICAL_AXIS_RULES

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "qwen_family"
CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
CASES = ["qwen3_tiny", "qwen3_moe_tiny", "qwen2_tiny", "llama_tiny"]


def _rel(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(np.sqrt(np.mean((ref - x) ** 2)) / np.sqrt(np.mean(ref**2)))


def _abstract(model):
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)))["params"]


@functools.cache
def _load(case):
    return jaxllm.load_hf_checkpoint(GOLDEN / case, dtype=jnp.float32)


def _golden(case):
    g = np.load(GOLDEN / case / "golden.npz")
    return {k: g[k] for k in g.files}


# ------------------------------------------------------------------------------------ goldens
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    model, params = _load(case)
    g = _golden(case)
    out = jax.jit(model.apply)(params, jnp.asarray(g["input_ids"], jnp.int32))
    assert isinstance(out, base.ModelOutput) and out.logits.dtype == jnp.float32
    err = _rel(g["logits"], out.logits)
    print(f"{case}: logits rms-rel {err:.2e}")
    assert err <= 1e-4, err


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_transformers_greedy(case):
    model, params = _load(case)
    g = _golden(case)
    prompt = jnp.asarray(g["input_ids"], jnp.int32)
    n_new = g["greedy_ids"].shape[1] - prompt.shape[1]
    np.testing.assert_array_equal(
        jaxllm.generate(model, params, prompt, max_new_tokens=n_new), g["greedy_ids"]
    )


def test_own_cached_greedy_loop_matches_transformers():
    """init_cache + apply alone (no decode engine): prefill, then one token per step."""
    model, params = _load("qwen3_moe_tiny")
    g = _golden("qwen3_moe_tiny")
    prompt = jnp.asarray(g["input_ids"], jnp.int32)
    B, T = prompt.shape
    n_new = g["greedy_ids"].shape[1] - T
    apply = jax.jit(lambda p, ids, cache: model.apply(p, ids, cache=cache))
    out = apply(params, prompt, model.init_cache(B, T + n_new))
    ids = [prompt]
    for _ in range(n_new):
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        ids.append(nxt)
        out = apply(params, nxt, out.cache)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(ids, 1)), g["greedy_ids"])
    np.testing.assert_array_equal(out.cache.pos, [T + n_new] * B)


@pytest.mark.parametrize("case", CASES)
def test_hub_keys_and_save_load_round_trip(case, tmp_path):
    """The table names exactly the checkpoint's keys; save -> load is bit for bit, and the saved
    tensors equal transformers' file."""
    model, params = _load(case)
    original = load_file(GOLDEN / case / "model.safetensors")
    assert sorted(s.hf_key for s in hf_key_specs(model.config)) == sorted(original)
    jaxllm.save_hf_checkpoint(tmp_path, model, params)
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(saved[k], original[k], err_msg=k)
    model2, params2 = jaxllm.load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert model2.config == model.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("case", ["llama_tiny"])  # qk-norm and biases: tests/nn/test_rope_attention.py
def test_ragged_rows_decode_like_uncached(case):
    """Row 0 prefilled with 40 tokens, row 1 with 31, then both a token at a time (different
    cache.pos per row, default positions): every step's logits equal the uncached run's."""
    model, params = _load(case)
    seq = jnp.asarray(_golden(case)["greedy_ids"], jnp.int32)  # [2, 48]
    T = seq.shape[1]
    apply = jax.jit(model.apply)  # eager op-by-op dispatch is ~5x slower here
    full = apply(params, seq).logits
    lengths = [40, 31]
    caches = []
    for b, n in enumerate(lengths):
        out = apply(params, seq[b : b + 1, :n], cache=model.init_cache(1, 64))
        assert _rel(full[b, :n], out.logits[0]) < 1e-5
        caches.append(out.cache)
    cache = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *caches)
    step = lambda c, tok: apply(params, tok, cache=c)
    got, want = [], []
    for _ in range(T - min(lengths)):
        pos = np.asarray(cache.pos)
        tok = seq[jnp.arange(2), jnp.minimum(cache.pos, T - 1)][:, None]  # finished rows: ignored
        out = step(cache, tok)
        for b in range(2):
            if pos[b] < T:
                got.append(out.logits[b, 0])
                want.append(full[b, pos[b]])
        cache = out.cache
    assert _rel(jnp.stack(want), jnp.stack(got)) < 1e-5


# ------------------------------------------------------------------------------------ contract
def test_packed_documents_equal_separate_runs():
    """Segment ids (change points) with default positions: each packed document restarts at
    position 0 and sees only itself."""
    model, params = _load("qwen3_tiny")
    ids = jnp.asarray(_golden("qwen3_tiny")["input_ids"], jnp.int32)
    a, b = ids[0, :15], ids[1, :25]
    packed = jnp.concatenate([a, b])[None]
    seg = jnp.asarray([[3] * 15 + [4] * 25])
    apply = jax.jit(model.apply)
    out = apply(params, packed, segment_ids=seg)
    alone = jnp.concatenate([apply(params, a[None]).logits[0], apply(params, b[None]).logits[0]])
    assert _rel(alone, out.logits[0]) < 1e-5


def test_explicit_positions_are_used():
    """RoPE sees only position differences: a shifted row gives the same logits, stretched ones do
    not. (So packed documents' in-document default positions cannot show in logits; the mask can.)"""
    model, params = _load("llama_tiny")
    ids = jnp.asarray(_golden("llama_tiny")["input_ids"][:1, :16], jnp.int32)
    ar = jnp.arange(16, dtype=jnp.int32)[None]
    apply = jax.jit(model.apply)
    ref = apply(params, ids).logits
    assert _rel(ref, apply(params, ids, positions=ar + 7).logits) < 1e-5
    assert _rel(ref, apply(params, ids, positions=2 * ar).logits) > 1e-2


def test_hidden_is_the_final_norm_output_and_remat_agrees():
    model, params = _load("qwen2_tiny")
    ids = jnp.asarray(_golden("qwen2_tiny")["input_ids"][:, :12], jnp.int32)
    out = jax.jit(model.apply)(params, ids)
    np.testing.assert_allclose(out.hidden @ params["params"]["lm_head"], out.logits, rtol=1e-5, atol=1e-5)
    loss = lambda m, p: jnp.mean(m.apply(p, ids).logits ** 2)
    g0 = jax.jit(jax.grad(functools.partial(loss, model)))(params)
    for remat in ("full", "dots"):
        g = jax.jit(jax.grad(functools.partial(loss, Qwen(model.config, remat=remat))))(params)
        assert max(jax.tree.leaves(jax.tree.map(lambda x, y: _rel(x, y), g0, g))) < 1e-5


def test_nnx_bridge_and_logical_axes():

    model = Qwen(QwenConfig.from_file(GOLDEN / "qwen3_moe_tiny", moe_dispatch="onehot"))
    ids = jnp.arange(6, dtype=jnp.int32).reshape(1, 6)
    boxed = model.init(jax.random.PRNGKey(0), ids)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    used = {n for x in leaves for n in x.names} - {None}
    assert used <= {name for name, _ in LOGICAL_AXIS_RULES}, used
    assert {"kv_heads", "expert"} <= used
    with nnx.use_eager_sharding(False):  # no mesh here
        m = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(m, ids)
    variables = {"params": nnx.to_pure_dict(nnx.state(m, nnx.Param))}
    nnx_logits = nnx.jit(lambda m, ids: m(ids).logits)(m, ids)
    np.testing.assert_allclose(jax.jit(model.apply)(variables, ids).logits, nnx_logits, rtol=1e-6, atol=1e-6)


def test_tied_embeddings():
    config = QwenConfig.from_file(GOLDEN / "qwen3_tiny", tie_word_embeddings=True)
    model = Qwen(config)
    ids = jnp.asarray(_golden("qwen3_tiny")["input_ids"][:, :8], jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids)
    assert "lm_head" not in params["params"]
    assert "lm_head.weight" not in {s.hf_key for s in hf_key_specs(config)}
    out = jax.jit(model.apply)(params, ids)
    embed = nn.meta.unbox(params)["params"]["embed_tokens"]
    np.testing.assert_allclose(out.hidden @ embed.T, out.logits, rtol=1e-5, atol=1e-6)
    assert (
        base.count_params(model)["active_without_embeddings"]
        == base.count_params(model)["total"] - embed.size
    )


def test_cache_overflow_and_bad_inputs_are_refused():
    model, params = _load("llama_tiny")
    with pytest.raises(ValueError, match="capacity"):
        model.apply(params, jnp.zeros((1, 5), jnp.int32), cache=model.init_cache(1, 4))
    with pytest.raises(ValueError, match="token ids"):
        model.apply(params, jnp.full((1, 2), 300, jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply(
            params, jnp.zeros((1, 2), jnp.int32), segment_ids=jnp.zeros((1, 2)), cache=model.init_cache(1, 4)
        )


# ------------------------------------------------------------------------------------ MoE
def _qwen3_moe_block_np(x, router_DE, w1, w3, w2, k, norm_topk_prob):
    """transformers' Qwen3MoeSparseMoeBlock in float64: softmax, top-k, optional renorm, SwiGLU experts."""
    logits = x @ router_DE
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, top, -1)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    silu = lambda a: a / (1 + np.exp(-a))
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(top[n]):
            y[n] += w[n, j] * ((silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e])
    return y


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_softmax_router_without_correction_bias(norm_topk_prob):
    m = MoE(
        16,
        8,
        3,
        12,
        num_shared_experts=0,
        renormalize=norm_topk_prob,
        router_activation="softmax",
        correction_bias=False,
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    v = nn.meta.unbox(m.init(jax.random.PRNGKey(1), x))
    p = v["params"]
    assert sorted(p) == ["router", "w1", "w2", "w3"]  # no e_score_correction_bias, no shared expert
    f64 = lambda a: np.asarray(a, np.float64)
    ref = _qwen3_moe_block_np(
        f64(x).reshape(10, 16), *(f64(p[n]) for n in ("router", "w1", "w3", "w2")), 3, norm_topk_prob
    )
    assert _rel(ref, m.apply(v, x).reshape(10, 16)) < 1e-5


def test_load_balance_loss_matches_transformers():
    """transformers' load_balancing_loss_func over the concatenated router logits of every MoE
    layer, times router_aux_loss_coef; only with output_router_logits, never with a cache."""
    model, params = _load("qwen3_moe_tiny")
    c = model.config.replace(output_router_logits=True, moe_dispatch="onehot")  # onehot: fast here
    ids = jnp.asarray(_golden("qwen3_moe_tiny")["input_ids"], jnp.int32)
    capture = lambda mdl, _: mdl.name == "post_attention_layernorm"
    out, state = jax.jit(
        lambda p, ids: Qwen(c).apply(p, ids, capture_intermediates=capture, mutable=["intermediates"])
    )(params, ids)
    logits = []
    for i, t in enumerate(c.mlp_layer_types):
        if t == "moe":
            h = np.asarray(state["intermediates"][f"layers_{i}"]["post_attention_layernorm"]["__call__"][0])
            logits.append(
                h.reshape(-1, c.hidden_size) @ np.asarray(params["params"][f"layers_{i}"]["moe"]["router"])
            )
    g = np.concatenate(logits).astype(np.float64)
    p = np.exp(g - g.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, : c.num_experts_per_token]
    mask = np.eye(c.num_experts)[top]  # [N, K, E]
    ref = c.num_experts * np.sum(mask.mean(0) * p.mean(0)[None]) * c.router_aux_loss_coef
    np.testing.assert_allclose(out.aux_losses["load_balance"], ref, rtol=1e-5)
    off = model.config.replace(moe_dispatch="onehot")  # the checkpoint's output_router_logits is false
    assert jax.jit(Qwen(off).apply)(params, ids).aux_losses == {}
    assert jax.jit(Qwen(c).apply)(params, ids[:, :3], cache=model.init_cache(2, 4)).aux_losses == {}


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("case", CASES)
def test_config_round_trip_and_registry(case):
    config = QwenConfig.from_file(GOLDEN / case)  # transformers-5 layout (rope_parameters)
    assert QwenConfig.from_hf_config(config.to_hf_config()) == config  # released layout
    assert json.loads(json.dumps(config.to_hf_config())) == config.to_hf_config()
    assert registry.config_from_file(GOLDEN / case) == config
    assert isinstance(registry.build(config), Qwen) and registry.of(config).hf_key_specs is hf_key_specs


def test_config_reads_released_and_transformers_layouts_alike():
    released = json.loads((CONFIGS / "llama3_1_8b.json").read_text())
    t5 = {k: v for k, v in released.items() if k not in ("rope_theta", "rope_scaling")}
    t5["rope_parameters"] = {"rope_theta": released["rope_theta"], **released["rope_scaling"]}
    a, b = QwenConfig.from_hf_config(released), QwenConfig.from_hf_config(t5)
    assert (
        a == b
        and a.rope_type == "llama3"
        and dict(a.rope_scaling)["original_max_position_embeddings"] == 8192
    )
    moe = json.loads((GOLDEN / "qwen3_moe_tiny" / "config.json").read_text())
    assert "num_local_experts" in moe and QwenConfig.from_hf_config(moe).num_experts == 8
    assert QwenConfig.from_hf_config(moe).mlp_layer_types == ("dense", "moe", "moe")


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "rope_scaling"),
        ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_experts_per_tok": 9}, "num_experts_per_token"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"mlp_only_layers": [3]}, "mlp_only_layers"),
        ({"model_type": "mistral"}, "model_type"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_bad_config_fields_are_named(change, field):
    cfg = {**json.loads((GOLDEN / "qwen3_moe_tiny" / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=rf"QwenConfig\.{field}\b"):
        QwenConfig.from_hf_config(cfg)


def test_bad_runtime_overrides_are_named():
    for kw, field in (({"dtype": "float8"}, "dtype"), ({"moe_dispatch": "dense"}, "moe_dispatch")):
        with pytest.raises(ConfigError, match=rf"QwenConfig\.{field}\b"):
            QwenConfig.from_file(GOLDEN / "qwen3_tiny", **kw)
    with pytest.raises(ConfigError, match=r"QwenConfig\.o_bias\b"):
        QwenConfig.from_file(GOLDEN / "llama_tiny", qkv_bias=True)


RELEASED = {  # research/released_models.md: transformers 5.24 on the meta device, = published counts
    "qwen3_30b_a3b": (30_532_122_624, 3_353_032_704),
    "qwen2_5_7b": (7_615_616_512, 7_615_616_512),
    "llama3_1_8b": (8_030_261_248, 8_030_261_248),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_parameter_counts(name):
    config = QwenConfig.from_file(CONFIGS / f"{name}.json")
    counts = base.count_params(Qwen(config))
    assert (counts["total"], counts["active"]) == RELEASED[name]
    if config.model_type == "qwen3_moe":  # the notes' formula for active
        c = config
        inactive = c.num_hidden_layers * (c.num_experts - c.num_experts_per_token) * 3 * c.hidden_size
        assert counts["total"] - counts["active"] == inactive * c.moe_intermediate_size
    assert QwenConfig.from_hf_config(config.to_hf_config()) == config
