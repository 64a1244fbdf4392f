"""Segment ids mean change points in the layers and the model: a document starts wherever the id
differs from the previous token's, so a reused id (`[0]*n + [1]*n + [0]*n`) is a third document.
The short conv, MLA's mask and module, and the whole Kimi Linear stack against each document run
alone.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.kimi_linear import KimiLinear
from jaxllm.nn.attention import causal_mask
from jaxllm.nn.conv import causal_conv
from jaxllm.nn.mla import MLA

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def rel_rms(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    assert ref.shape == x.shape, (ref.shape, x.shape)
    return float(np.sqrt(np.mean((ref - x) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-30))


def spans(seg_T):
    """[(start, stop)] of the documents of one row, split at change points."""
    cuts = [0] + [t for t in range(1, len(seg_T)) if seg_T[t] != seg_T[t - 1]] + [len(seg_T)]
    return list(zip(cuts[:-1], cuts[1:]))


def reused(n):
    return np.array([[0] * n + [1] * n + [0] * n], np.int32)


def test_conv_reused_id_equals_separate_documents():
    # Documents shorter than the 3-token window between two that share an id, so the taps (and
    # the returned state) of a later document could reach an earlier one with the same id.
    seg = np.array([[0] * 4 + [1] + [0] * 3 + [1] * 2 + [0] + [1], [3] * 3 + [4] * 2 + [3] * 7], np.int32)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 3)).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    s0 = rng.normal(size=(2, 3, 3)).astype(np.float32)  # the row's state feeds its first document
    y, state = causal_conv(
        jnp.asarray(x), jnp.asarray(w), state_BSC=jnp.asarray(s0), segment_ids_BT=jnp.asarray(seg)
    )
    for b in range(2):
        for i, (lo, hi) in enumerate(spans(seg[b])):
            y_doc, state_doc = causal_conv(
                jnp.asarray(x[b : b + 1, lo:hi]),
                jnp.asarray(w),
                state_BSC=jnp.asarray(s0[b : b + 1]) if i == 0 else None,
            )
            np.testing.assert_allclose(y[b : b + 1, lo:hi], y_doc, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(state[b : b + 1], state_doc)  # the last document's


def test_attention_mask_reused_id():
    n = 3
    doc = np.repeat(np.arange(3), n)
    want = (doc[:, None] == doc[None, :]) & np.tril(np.ones((3 * n, 3 * n), bool))
    np.testing.assert_array_equal(causal_mask(3 * n, jnp.asarray(reused(n)))[0], want)


@pytest.mark.parametrize("impl", ["expanded", "absorbed"])
def test_mla_reused_id_equals_separate_documents(impl):
    n = 4
    m = MLA(
        hidden_size=24,
        num_heads=3,
        kv_lora_rank=10,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        impl=impl,
    )
    x_BTD = jax.random.normal(jax.random.PRNGKey(0), (1, 3 * n, 24))
    params = m.init(jax.random.PRNGKey(1), x_BTD)
    packed, _ = m.apply(params, x_BTD, segment_ids=jnp.asarray(reused(n)))
    alone, _ = m.apply(params, x_BTD.reshape(3, n, 24))  # the three documents as three rows
    assert rel_rms(alone.reshape(1, 3 * n, 24), packed) <= 1e-5


def test_model_reused_id_equals_three_sequences():
    # one KDA (chunk op) and one MLA layer, dense FFNs: every consumer of the ids, tiny and fast
    config = KimiLinearConfig.from_file(CONFIGS / "tiny.json", kda_impl="chunk")
    config = config.replace(
        num_hidden_layers=2, layer_types=("kda", "mla"), mlp_layer_types=("dense", "dense")
    )
    model = KimiLinear(config)
    n = 6
    doc_BN = jax.random.randint(jax.random.PRNGKey(2), (3, n), 0, config.vocab_size)
    # one program: row 0 the packed row, rows 1-3 each document alone, right-padded (a causal
    # model's padding after a token cannot reach it)
    ids_BT = jnp.concatenate([doc_BN.reshape(1, 3 * n), jnp.pad(doc_BN, ((0, 0), (0, 2 * n)))])
    seg_BT = jnp.concatenate([jnp.asarray(reused(n)), jnp.zeros((3, 3 * n), jnp.int32)])
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids_BT)
    logits = jax.jit(model.apply)(params, ids_BT, segment_ids=seg_BT).logits
    packed, alone = logits[0].reshape(3, n, -1), logits[1:, :n]
    assert rel_rms(alone, packed) <= 1e-5
