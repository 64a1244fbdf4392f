"""KDA at Kimi Linear's real head size, K = V = 128: the chunk path and both Pallas kernels (interpret
mode) against the lax.scan recurrence, outputs, final state and all six gradients.

The other kernel tests use K, V <= 64 to stay fast; code that splits or tiles the head dims (the
GPU kernel's 64-wide V slices, 128-lane TPU tiles) only shows its seams at 128. Two 64-token
chunks (the state crosses a chunk boundary) keep it cheap: the time is compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda import kda
from pallas_kernels.kda.reference import kda_recurrent

B, T, H, K, V = 1, 128, 1, 128, 128
TOL = 1e-4  # float32, rms(ref - impl) / rms(ref) as fla reports it
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
IMPLS = {
    "chunk": functools.partial(kda, impl="chunk"),
    "pallas_tpu": functools.partial(kda, impl="pallas_tpu", interpret=True),
    "pallas_gpu": functools.partial(kda, impl="pallas_gpu", interpret=True),
}


def rel_rms(ref, got):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    assert ref.shape == got.shape and np.isfinite(got).all()
    return float(np.sqrt(np.mean((ref - got) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


def outputs_and_grads(fn, inputs, do, dht):
    """(o, ht, grads w.r.t. q, k, v, g, beta, h0) of sum(o*do) + sum(ht*dht), under jit."""

    def loss(q, k, v, g, beta, h0):
        o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
        return jnp.sum(o * do) + jnp.sum(ht * dht), (o, ht)

    grads, (o, ht) = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(*inputs)
    return o, ht, grads


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(128)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    # log decays: most mild, a quarter strong, so some channels forget within a chunk
    u = rng.uniform(size=(B, T, H, K))
    g = jnp.asarray(np.where(rng.uniform(size=u.shape) < 0.25, -1.0 + 0.1 * u, -0.1 * u), jnp.float32)
    beta = jax.nn.sigmoid(f(B, T, H))
    inputs = (f(B, T, H, K), f(B, T, H, K), f(B, T, H, V), g, beta, 0.5 * f(B, H, K, V))
    do, dht = f(B, T, H, V), f(B, H, K, V)
    return inputs, do, dht, outputs_and_grads(kda_recurrent, inputs, do, dht)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_head_size_128_matches_recurrence(case, impl):
    inputs, do, dht, (o_ref, ht_ref, grads_ref) = case
    o, ht, grads = outputs_and_grads(IMPLS[impl], inputs, do, dht)
    assert o.shape == (B, T, H, V) and ht.shape == (B, H, K, V)
    assert rel_rms(o_ref, o) <= TOL, "o"
    assert rel_rms(ht_ref, ht) <= TOL, "final state"
    for name, ref, got in zip(GRAD_NAMES, grads_ref, grads):
        assert rel_rms(ref, got) <= TOL, name
