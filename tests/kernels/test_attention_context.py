"""Attention of a span of queries at `q_offset` against the whole sequence's keys, with the
keys' segment ids [B,S] (context parallelism: each device attends its span to the all-gathered
keys) == the span's rows of full self-attention, for every implementation, with gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, attention_lse
from pallas_kernels.kda.common import document_index

B, S, H, K, V = 2, 64, 2, 16, 8


def _inputs():
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(ks[0], (B, S, H, K))
    k = jax.random.normal(ks[1], (B, S, H, K))
    v = jax.random.normal(ks[2], (B, S, H, V))
    seg = np.zeros((B, S), np.int32)
    seg[0, 10:30] = 1  # a document across the span boundary at 16 and 32 ...
    seg[0, 30:] = 0  # ... and a reused id: the third document of row 0
    seg[1, 32:] = 4  # a change point on a span boundary
    return q, k, v, jnp.asarray(seg)


def _rms_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a**2))


@pytest.mark.parametrize(
    "impl, kw",
    [
        ("reference", {}),
        ("blockwise", dict(block_q=8, block_k=16)),
        ("pallas_tpu", dict(block_q=16, block_k=32, interpret=True)),
    ],
)
def test_span_queries_against_all_keys_match_self_attention(impl, kw):
    q, k, v, seg = _inputs()
    span = 16
    full = attention(q, k, v, segment_ids=seg, impl="reference")

    # the Pallas kernel in interpret mode is slow: two spans (one crossing a document), forward only
    starts = (16, 32) if impl == "pallas_tpu" else tuple(range(0, S, span))

    @jax.jit
    def spans(q, k, v):
        outs = [
            attention(q[:, s : s + span], k, v, segment_ids=seg, q_offset=s, impl=impl, **kw) for s in starts
        ]
        return jnp.concatenate(outs, axis=1)

    want = jnp.concatenate([full[:, s : s + span] for s in starts], axis=1)
    assert _rms_rel(want, spans(q, k, v)) <= 1e-5
    if impl != "blockwise":
        return
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    want = jax.grad(loss(lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="reference")), (0, 1, 2))(
        q, k, v
    )
    got = jax.grad(loss(spans), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", want, got):
        assert _rms_rel(a, b) <= 1e-5, name


def test_segment_ids_must_cover_the_keys():
    q, k, v, seg = _inputs()
    with pytest.raises(ValueError, match=r"segment_ids must be \[B,S\]"):
        attention(q[:, :16], k, v, segment_ids=seg[:, :16], q_offset=0, impl="blockwise")
    with pytest.raises(ValueError, match="need q_offset"):
        attention(q[:, :16], k, v, segment_ids=seg, impl="blockwise")


LSE_IMPLS = [
    ("blockwise", dict(block_q=8, block_k=8)),
    ("pallas_tpu", dict(block_q=8, block_k=8, interpret=True)),
]


@pytest.mark.parametrize("impl, kw", LSE_IMPLS, ids=[i for i, _ in LSE_IMPLS])
def test_spans_of_keys_combine_by_their_lse(impl, kw):
    """Queries of one span over the keys in 4 spans, one `attention_lse` call per key span
    (offsets below 0 for the spans after the queries, document indices of the whole sequence), combined
    by softmax over the spans' lse == full self-attention, values and gradients (the gradients reach
    q and k through lse too)."""
    q, k, v, seg = _inputs()
    doc = document_index(seg)
    n, span = 4, S // 4
    q_start = 32  # a document crosses into this span; later key spans are all in its future

    def by_spans(q, k, v):
        qs = q[:, q_start : q_start + span]
        outs, lses = [], []
        for j in range(n):
            sl = slice(j * span, (j + 1) * span)
            o, lse = attention_lse(
                qs,
                k[:, sl],
                v[:, sl],
                q_doc=doc[:, q_start : q_start + span],
                k_doc=doc[:, sl],
                q_offset=q_start - j * span,
                impl=impl,
                **kw,
            )
            outs.append(o)
            lses.append(lse)
        w = jax.nn.softmax(jnp.stack(lses), axis=0)
        return jnp.einsum("jbth,jbthv->bthv", w, jnp.stack(outs))

    def full(q, k, v):
        return attention(q, k, v, segment_ids=seg, impl="reference")[:, q_start : q_start + span]

    assert _rms_rel(full(q, k, v), by_spans(q, k, v)) <= 1e-5
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    want = jax.grad(loss(full), (0, 1, 2))(q, k, v)
    got = jax.grad(loss(by_spans), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", want, got):
        assert _rms_rel(a, b) <= 1e-5, name


@pytest.mark.parametrize("impl, kw", LSE_IMPLS, ids=[i for i, _ in LSE_IMPLS])
def test_lse_is_the_log_sum_exp_of_the_visible_scores(impl, kw):
    q, k, v, seg = _inputs()
    doc = document_index(seg)
    _, lse = attention_lse(q, k, v, q_doc=doc, k_doc=doc, impl=impl, **kw)
    s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
    t = jnp.arange(S)
    mask = (t[None, :] <= t[:, None])[None, None] & (doc[:, None, :, None] == doc[:, None, None, :])
    want = jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)  # [B,H,T]
    assert _rms_rel(jnp.swapaxes(want, 1, 2), lse) <= 1e-6
    with pytest.raises(ValueError, match="q_doc and k_doc go together"):
        attention_lse(q, k, v, q_doc=doc, impl=impl, **kw)
