"""KDA with context parallelism (pallas_kernels/kda/context.py) == KDA on the whole sequence.

8 virtual CPU devices in a subprocess (the device count must be set before JAX starts): the
sequence split over `context` (8 spans, and batch 2 x context 4), forward and backward, with an
initial state and packed documents whose boundaries fall inside spans, on a span boundary, and
with a reused id across spans. Float32, rms-relative error <= 1e-5 on every output and gradient.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kda import kda
from pallas_kernels.kda.context import incoming_states, span_transition

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from pallas_kernels.kda import kda, kda_context

B, T, H, K, V = 2, 256, 2, 16, 8
ks = jax.random.split(jax.random.PRNGKey(0), 6)
q, k = (jax.random.normal(ks[i], (B, T, H, K)) for i in range(2))
v = jax.random.normal(ks[2], (B, T, H, V))
g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)) - 1.0)
beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
h0 = jax.random.normal(ks[5], (B, H, K, V))
# spans are 32 (context=8) or 64 (context=4) tokens: change points inside spans (40, 150), on a
# boundary of both (64), and id 0 reused for a later document
seg = np.zeros((B, T), np.int32)
seg[0, 40:64] = 1; seg[0, 150:] = 2
seg[1, 100:] = 5
seg = jnp.asarray(seg)

def loss(fn, *a):
    o, ht = fn(*a)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(ht)), (o, ht)

def check(mesh, batch_axis, impl, with_seg):
    s = seg if with_seg else None
    kw = dict(output_final_state=True, use_qk_l2norm=True, impl=impl)
    ref = lambda q, k, v, g, beta, h0: kda(q, k, v, g, beta, initial_state=h0, segment_ids=s, **kw)
    tok, st = P(batch_axis, "context"), P(batch_axis)

    def cp(q, k, v, g, beta, h0):
        f = lambda q, k, v, g, beta, h0, s: kda_context(
            q, k, v, g, beta, axis_name="context", initial_state=h0, segment_ids=s, **kw)
        specs = (tok,) * 5 + (st,) + ((tok,) if with_seg else ())
        body = f if with_seg else (lambda *a: f(*a, None))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok, st), check_vma=False)(
            q, k, v, g, beta, h0, *((s,) if with_seg else ()))

    args = (q, k, v, g, beta, h0)
    grad = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=range(6), has_aux=True))
    r = grad(ref)(*args)
    with jax.set_mesh(mesh):
        c = grad(cp)(*args)
    errs = {}
    for name, a, b in zip(["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"], [*r[0][1], *r[1]], [*c[0][1], *c[1]]):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errs[name] = float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a ** 2)))
    print(mesh.shape, impl, with_seg, errs, flush=True)
    assert max(errs.values()) <= 1e-5, errs

auto = jax.sharding.AxisType.Auto
check(jax.make_mesh((8,), ("context",), axis_types=(auto,)), None, "recurrent", True)
check(jax.make_mesh((2, 4), ("b", "context"), axis_types=(auto,) * 2), "b", "chunk", True)
check(jax.make_mesh((8,), ("context",), axis_types=(auto,)), None, "recurrent", False)
print("ok")
"""


def test_context_parallel_kda_matches_whole_sequence():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout[-3000:] + proc.stderr[-4000:]
    )


def test_span_transition_is_the_affine_map_of_the_incoming_state():
    """One span's (o0, c, A, B) reproduce KDA from any incoming state, and two spans chained by
    `incoming_states` reproduce the whole sequence (single device, no collectives)."""
    B, T, H, K, V = 1, 48, 2, 8, 4
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    q, k = (jax.random.normal(ks[i], (B, T, H, K)) for i in range(2))
    v = jax.random.normal(ks[2], (B, T, H, V))
    # slow decay, so a span's transition A is far from zero and carries h0 through both spans
    g = -0.05 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    h0 = jax.random.normal(ks[5], (B, H, K, V))
    kw = dict(use_qk_l2norm=True, impl="recurrent")
    o_ref, ht_ref = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    half = T // 2
    spans = [tuple(x[:, s : s + half] for x in (q, k, v, g, beta)) for s in (0, half)]
    parts = [span_transition(*sp, **kw) for sp in spans]
    a_all = jnp.stack([p[2] for p in parts])
    b_all = jnp.stack([p[3] for p in parts])
    s_in, final = incoming_states(a_all, b_all, jnp.zeros((2, B), bool), h0)
    o = jnp.concatenate([p[0] + jnp.einsum("bthk,bhkv->bthv", p[1], s) for p, s in zip(parts, s_in)], axis=1)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, ht_ref, rtol=1e-5, atol=1e-5)
