"""The KDA layer's per-shard wrapper (jaxllm/nn/kda_attention.py `_per_shard_if_pallas`) on CPU.

A Pallas kernel cannot be partitioned by XLA, so under a mesh the layer runs it inside
`shard_map` (rows over the batch axes, heads over `tensor`). Here, on 4 virtual CPU devices
(fsdp=2 x tensor=2), the wrapped call must give the unwrapped call's output, final state and
gradients, and must really go through shard_map. Runs without libtpu (a subprocess sets the
device count before JAX starts).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxllm import sharding as shd
from jaxllm.nn.kda_attention import _per_shard_if_pallas
from pallas_kernels.kda import kda

mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=2, expert=1))
B, T, H, K = 4, 48, 2, 16
ks = jax.random.split(jax.random.PRNGKey(0), 7)
q, k, v = (jax.random.normal(ks[i], (B, T, H, K)) for i in range(3))
g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
h0 = jax.random.normal(ks[5], (B, H, K, K))
seg = jnp.cumsum(jax.random.bernoulli(ks[6], 0.05, (B, T)), axis=1).astype(jnp.int32)
fn = lambda q, k, v, g, beta, h0, seg: kda(
    q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True, impl="chunk", segment_ids=seg
)

def loss(wrap, q, k, v, g, beta, h0):
    impl = "pallas_tpu" if wrap else "chunk"  # the wrapper engages for Pallas impls only
    o, ht = _per_shard_if_pallas(fn, impl, q, k, v, g, beta, h0, seg)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(ht ** 2), (o, ht)

args = (q, k, v, g, beta, h0)
ref = jax.jit(jax.value_and_grad(functools.partial(loss, False), argnums=range(6), has_aux=True))(*args)
tok, st = NamedSharding(mesh, P(("fsdp",), None, "tensor")), NamedSharding(mesh, P(("fsdp",), "tensor"))
placed = [jax.device_put(a, s) for a, s in zip(args, (tok, tok, tok, tok, NamedSharding(mesh, P(("fsdp",), None, "tensor")), st))]
wrapped = jax.jit(jax.value_and_grad(functools.partial(loss, True), argnums=range(6), has_aux=True))
with jax.set_mesh(mesh):
    text = str(wrapped.trace(*placed).jaxpr)
    got = wrapped(*placed)
assert "shard_map" in text, "the Pallas path did not go through shard_map"
for name, a, b in zip(["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"],
                      [*ref[0][1], *ref[1]], [*got[0][1], *got[1]]):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(a ** 2)) + 1e-30)
    assert err < 1e-5, (name, err)
print("ok")
"""


def test_per_shard_wrapper_matches_unwrapped():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout[-2000:] + proc.stderr[-4000:]
    )
