"""RoPE against float64 transcriptions of transformers' formulas; GQA attention against a naive
numpy layer; the per-row cached path against the uncached run."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.nn.attention import Attention, attend, init_kv_cache
from jaxllm.nn.rope import apply_rope, inverse_frequencies

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


# ------------------------------------------------------------------------------------ references
def _inv_freq_np(head_dim, theta, rope_type="default", **s):
    """transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`, float64."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_type == "default":
        return inv
    old = s["original_max_position_embeddings"]
    low_wl, high_wl = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wl = 2 * math.pi / inv
    out = np.where(wl > low_wl, inv / s["factor"], inv)
    smooth = (old / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * out / s["factor"] + smooth * out
    medium = (wl >= high_wl) & (wl <= low_wl)
    return np.where(medium, smoothed, out)


def _rope_np(x_BTHD, pos_BT, inv):
    """`x * cos + rotate_half(x) * sin` with `emb = cat(freqs, freqs)` (modeling_llama), float64."""
    freqs = pos_BT[..., None].astype(np.float64) * inv
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    h = x_BTHD.shape[-1] // 2
    rot = np.concatenate([-x_BTHD[..., h:], x_BTHD[..., :h]], -1)
    return x_BTHD * np.cos(emb) + rot * np.sin(emb)


def _doc_np(seg):
    return np.cumsum(np.concatenate([np.zeros_like(seg[:, :1]), seg[:, 1:] != seg[:, :-1]], 1), 1)


def _attention_np(p, x, pos, *, heads, kv_heads, opts, seg=None, eps=1e-6):
    """A naive layer: per-head loops of transformers' eager attention with `repeat_kv`, float64.
    The switches come from `opts` (the case), not from which params exist."""
    rope_type, theta = opts.get("rope_type", "default"), opts.get("rope_theta", 10000.0)
    p = {k: np.asarray(v, np.float64) for k, v in _flat(p).items()}
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
    k = np.einsum("btd,dhk->bthk", x, p["k_proj"])
    v = np.einsum("btd,dhk->bthk", x, p["v_proj"])
    if opts.get("qkv_bias"):
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if opts.get("qk_norm"):
        rms = lambda a, w: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * w
        q, k = rms(q, p["q_norm/weight"]), rms(k, p["k_norm/weight"])
    Dh = q.shape[-1]
    inv = _inv_freq_np(Dh, theta, rope_type, **(LLAMA3 if rope_type == "llama3" else {}))
    q, k = _rope_np(q, pos, inv), _rope_np(k, pos, inv)
    mask = np.tril(np.ones((T, T), bool))[None]
    if seg is not None:
        d = _doc_np(np.asarray(seg))
        mask = mask & (d[:, :, None] == d[:, None, :])
    o = np.zeros_like(q)
    G = heads // kv_heads
    for b in range(B):
        for h in range(heads):
            s = q[b, :, h] @ k[b, :, h // G].T / math.sqrt(Dh)
            s = np.where(mask[min(b, mask.shape[0] - 1)], s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            o[b, :, h] = (a / a.sum(-1, keepdims=True)) @ v[b, :, h // G]
    y = np.einsum("bthk,hkd->btd", o, p["o_proj"])
    return y + p["o_bias"] if opts.get("o_bias") else y


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _rel(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return np.sqrt(np.mean((ref - x) ** 2)) / np.sqrt(np.mean(ref**2))


# ------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("rope_type,theta,head_dim", [("default", 1e6, 16), ("llama3", 5e5, 64)])
def test_inverse_frequencies_match_transformers(rope_type, theta, head_dim):
    scaling = LLAMA3 if rope_type == "llama3" else {}
    ours = inverse_frequencies(head_dim, theta, rope_type, **scaling)
    ref = _inv_freq_np(head_dim, theta, rope_type, **scaling)
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    if rope_type == "llama3":  # the case covers all three bands: kept, divided by factor, smoothed
        plain = _inv_freq_np(head_dim, theta)
        ratio = ref / plain
        assert (
            np.any(ratio == 1.0)
            and np.any(np.isclose(ratio, 1 / 8))
            and np.any((ratio > 1 / 8) & (ratio < 1))
        )


def test_apply_rope_is_rotate_half_at_per_row_positions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [37, 38, 39, 0, 1]], np.int32)  # rows at different offsets
    inv = inverse_frequencies(16, 1e4)
    ours = apply_rope(jnp.asarray(x), jnp.asarray(pos), inv)
    ref = _rope_np(x.astype(np.float64), pos, _inv_freq_np(16, 1e4))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.dtype == jnp.float32
    bf = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos), inv)
    assert bf.dtype == jnp.bfloat16 and _rel(ref, bf) < 1e-2


def test_rope_rejects_unknown_type():
    with pytest.raises(ValueError, match="yarn"):
        inverse_frequencies(16, 1e4, "yarn")
    with pytest.raises(ValueError, match="factor"):
        inverse_frequencies(16, 1e4, "llama3")


# ------------------------------------------------------------------------------------ attention
CASES = {  # name: module options
    "qwen3": dict(qk_norm=True, rope_theta=1e6),
    "qwen2": dict(qkv_bias=True),
    "llama": dict(
        qkv_bias=True, o_bias=True, rope_type="llama3", rope_theta=5e5, rope_scaling=tuple(LLAMA3.items())
    ),
}


def _module(name, **kw):
    return Attention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, **{**CASES[name], **kw})


def _params(m, x, pos):
    """Init, then randomise every leaf (biases and norm weights init to 0/1, which would hide them)."""
    v = nn.meta.unbox(m.init(jax.random.PRNGKey(0), x, pos))
    leaves, tree = jax.tree_util.tree_flatten(v)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_numpy(name):
    m = _module(name)
    B, T = 2, 10
    x = jax.random.normal(jax.random.PRNGKey(2), (B, T, 32))
    pos = jnp.asarray(np.array([np.arange(T), np.arange(T) + 23]), jnp.int32)  # positions up to 32
    seg = jnp.asarray([[0] * 3 + [1] * 4 + [0] * 3, [5] * T])  # a reused id is a new document
    v = _params(m, x, pos)
    for segment_ids in (None, seg):
        y, cache = jax.jit(m.apply)(v, x, pos, segment_ids=segment_ids)
        ref = _attention_np(
            v["params"], x, np.asarray(pos), seg=segment_ids, heads=4, kv_heads=2, opts=CASES[name]
        )
        assert cache is None
        assert _rel(ref, y) < 1e-5, (name, segment_ids is not None, _rel(ref, y))


def test_attention_param_axes():
    m = _module("llama")
    x, pos = jnp.zeros((1, 2, 32)), jnp.zeros((1, 2), jnp.int32)
    boxed = m.init(jax.random.PRNGKey(0), x, pos)["params"]
    names = {k: v.names for k, v in boxed.items()}
    assert names["q_proj"] == ("embed", "heads", "kv") and boxed["q_proj"].value.shape == (32, 4, 16)
    assert names["k_proj"] == names["v_proj"] == ("embed", "kv_heads", "kv")
    assert names["o_proj"] == ("heads", "kv", "embed")
    assert names["k_bias"] == ("kv_heads", "kv") and names["o_bias"] == ("embed",)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_steps_with_ragged_rows_match_uncached(name):
    """Rows prefilled to different lengths (5 and 2 tokens), then one token at a time: each row's
    outputs equal the uncached run of its own sequence."""
    m = _module(name)
    T, S = 9, 12
    x = jax.random.normal(jax.random.PRNGKey(3), (2, T, 32))
    pos_full = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    v = _params(m, x, pos_full)
    apply = jax.jit(m.apply)
    full, _ = apply(v, x, pos_full)

    lengths = [5, 2]
    caches, outs = [], [[], []]
    for b, n in enumerate(lengths):  # prefill each row on its own, then stack the rows
        cache = m.init_cache(1, S)
        y, cache = apply(
            v, x[b : b + 1, :n], pos_full[b : b + 1, :n], cache=cache, pos=jnp.zeros(1, jnp.int32)
        )
        outs[b].append(y[0])
        caches.append(cache)
    cache = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *caches)
    pos = jnp.asarray(lengths, jnp.int32)
    step = lambda c, xt, p: apply(v, xt, p[:, None], cache=c, pos=p)
    for _ in range(T - min(lengths)):
        idx = jnp.minimum(pos, T - 1)  # a row that is done repeats its last token (ignored)
        y, cache = step(cache, x[jnp.arange(2), idx][:, None], pos)
        for b in range(2):
            if pos[b] < T:
                outs[b].append(y[b])
        pos = pos + 1
    for b in range(2):
        got = jnp.concatenate(outs[b])
        np.testing.assert_allclose(got, full[b], rtol=2e-5, atol=2e-5)


def test_cache_is_written_at_each_rows_offset():
    k = jnp.arange(2 * 3 * 1 * 2, dtype=jnp.float32).reshape(2, 3, 1, 2) + 1
    q = jnp.ones((2, 3, 2, 2))
    cache = init_kv_cache(2, 8, 1, 2)
    _, new = attend(q, k, k, scale=1.0, cache=cache, pos=jnp.array([4, 1]))
    np.testing.assert_array_equal(new.k[0, 4:7], k[0])
    np.testing.assert_array_equal(new.k[1, 1:4], k[1])
    assert float(jnp.abs(new.k[0, :4]).sum()) == 0 and float(jnp.abs(new.k[1, 4:]).sum()) == 0


def test_cache_rejects_segment_ids_and_missing_pos():
    q = jnp.ones((1, 2, 2, 4))
    k = jnp.ones((1, 2, 1, 4))
    cache = init_kv_cache(1, 4, 1, 4)
    with pytest.raises(ValueError, match="segment_ids"):
        attend(q, k, k, scale=1.0, cache=cache, pos=jnp.zeros(1, jnp.int32), segment_ids=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="pos"):
        attend(q, k, k, scale=1.0, cache=cache)
