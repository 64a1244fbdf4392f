"""KDA segment ids mean change points: a document starts wherever the id differs from the previous
token's, so a reused id (`[0]*16 + [1]*16 + [0]*16`) is a third document, never the first one
continued. Every implementation, called through its own entry point, against the documents run
one by one through the recurrence (or the recurrence with explicit resets, shown equal to them):
outputs, final state and all six gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda import kda
from pallas_kernels.kda.chunk import kda_chunk
from pallas_kernels.kda.common import document_index
from pallas_kernels.kda.gpu import kda_pallas_gpu
from pallas_kernels.kda.reference import kda_recurrent
from pallas_kernels.kda.tpu import kda_pallas_tpu

TOL = 1e-5  # float32, rms(ref - impl) / rms(ref)

# Row 0 is the case (all three documents inside one 64-token chunk); row 1 alternates two
# ids with boundaries off the 16-token grid, so 16-token chunks also see an id come back inside
# one chunk (2, 1, 2 in tokens 0-15).
SEG_BT = np.array(
    [[0] * 16 + [1] * 16 + [0] * 16, [2] * 5 + [1] * 6 + [2] * 9 + [1] * 12 + [2] * 16], np.int32
)
# The same documents under ids that are never reused: what raw-id comparisons did get right.
DOC_BT = np.array(
    [[0] * 16 + [1] * 16 + [2] * 16, [0] * 5 + [1] * 6 + [2] * 9 + [3] * 12 + [4] * 16], np.int32
)

IMPLS = {
    "recurrent": kda_recurrent,
    "chunk": kda_chunk,
    # 16-token chunks: documents start and end on chunk boundaries and inside chunks
    "chunk16": functools.partial(kda_chunk, chunk_size=16),
    "pallas_tpu": functools.partial(kda_pallas_tpu, interpret=True),
    "pallas_gpu": functools.partial(kda_pallas_gpu, interpret=True),
}


def rel_rms(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.sqrt(np.mean((ref - got) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-30))


def spans(seg_T):
    """[(start, stop)] of the documents of one row, split at change points."""
    cuts = [0] + [t for t in range(1, len(seg_T)) if seg_T[t] != seg_T[t - 1]] + [len(seg_T)]
    return list(zip(cuts[:-1], cuts[1:]))


def separate(q, k, v, g, beta, h0, seg_BT):
    """Each document alone through the recurrence: the row's initial state feeds its first
    document, every later one starts from zero; the final state is the last document's."""
    outs, finals = [], []
    for b in range(q.shape[0]):
        state, o_b = h0[b : b + 1], []
        for i, (lo, hi) in enumerate(spans(seg_BT[b])):
            sl = lambda x: x[b : b + 1, lo:hi]
            o, state = kda_recurrent(
                sl(q),
                sl(k),
                sl(v),
                sl(g),
                sl(beta),
                initial_state=state if i == 0 else None,
                output_final_state=True,
                use_qk_l2norm=True,
            )
            o_b.append(o)
        outs.append(jnp.concatenate(o_b, axis=1))
        finals.append(state)
    return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


def case(seed, B, T, H=2, K=16, V=16):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    g = jnp.asarray(-rng.uniform(0.0, 0.3, (B, T, H, K)).astype(np.float32))
    beta = jax.nn.sigmoid(f(B, T, H))
    inputs = (f(B, T, H, K), f(B, T, H, K), f(B, T, H, V), g, beta, 0.5 * f(B, H, K, V))
    return inputs, f(B, T, H, V), f(B, H, K, V)


def value_and_grads(fn, inputs, do, dht):
    """(o, ht, grads of sum(o*do) + sum(ht*dht) w.r.t. q, k, v, g, beta, h0), one jitted program."""

    def loss(*args):
        o, ht = fn(*args)
        return jnp.sum(o * do) + jnp.sum(ht * dht), (o, ht)

    grads, (o, ht) = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(*inputs)
    return (o, ht) + grads


@pytest.fixture(scope="module")
def reference():
    """The case and its answers, computed once: the recurrence with explicit resets (distinct
    ids), which `test_reference_is_separate_documents` ties to the documents run one by one."""
    inputs, do, dht = case(0, *SEG_BT.shape)
    recurrent = lambda *a: kda_recurrent(
        *a[:5],
        initial_state=a[5],
        segment_ids=jnp.asarray(DOC_BT),
        output_final_state=True,
        use_qk_l2norm=True,
    )
    return inputs, do, dht, value_and_grads(recurrent, inputs, do, dht)


def test_document_index():
    doc = np.asarray(document_index(jnp.asarray(SEG_BT)))
    np.testing.assert_array_equal(doc, DOC_BT)
    np.testing.assert_array_equal(document_index(jnp.asarray(doc)), doc)  # idempotent


def test_reference_is_separate_documents(reference):
    inputs, _, _, ref = reference
    o, ht = jax.jit(lambda *a: separate(*a, SEG_BT))(*inputs)
    assert rel_rms(o, ref[0]) <= TOL
    assert rel_rms(ht, ref[1]) <= TOL


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_reused_id_equals_separate_documents(impl, reference):
    inputs, do, dht, ref = reference
    seg = jnp.asarray(SEG_BT)
    packed = lambda *a: IMPLS[impl](
        *a[:5], initial_state=a[5], segment_ids=seg, output_final_state=True, use_qk_l2norm=True
    )
    got = value_and_grads(packed, inputs, do, dht)
    names = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")
    errs = {n: rel_rms(r, x) for n, r, x in zip(names, ref, got)}
    assert all(e <= TOL for e in errs.values()), errs


def test_through_dispatcher(reference):
    # kda(...) hands the ids on untouched; the public entry gives the same answer
    inputs, _, _, ref = reference
    o, ht = jax.jit(
        lambda *a: kda(
            *a[:5],
            initial_state=a[5],
            segment_ids=jnp.asarray(SEG_BT),
            output_final_state=True,
            use_qk_l2norm=True,
            impl="chunk",
        )
    )(*inputs)
    assert rel_rms(ref[0], o) <= TOL
    assert rel_rms(ref[1], ht) <= TOL
