"""Expert parallel vs the dense reference on 8 virtual CPU devices (run by test_moe_parallel.py).

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before JAX starts). Prints one JSON
line per case: max abs error of outputs and gradients against `dispatch="onehot"` on one device, and
the dropped count against the count from numpy.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding as shd
from jaxllm.nn.moe import DROPPED_NAME, ROUTER_LOAD, MoE, grouped_ffn, moe_experts, route
from jaxllm.nn.moe_parallel import capacity, expert_parallel_moe, token_axes

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
jax.config.update("jax_enable_x64", False)


def problem(seed=0, N=64, D=16, F=12, E=16, K=2, skew=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(E, F, D)) * 0.3, jnp.float32)
    router = rng.normal(size=(D, E)) * 0.5
    if skew:  # pile tokens onto the first experts (device 0's) so capacities overflow
        router[:, :3] += 1.5
    wts, idx = route(x, jnp.asarray(router, jnp.float32), None, top_k=K)
    return x, wts, idx, w1, w3, w2


def expected_drops(idx, n_shards, ep, E, cap):
    """Assignments past `cap` per (source shard, destination device) pair, and the kept mask."""
    idx = np.asarray(idx)
    N, K = idx.shape
    n = N // n_shards
    keep = np.ones_like(idx, bool)
    drops = 0
    for s in range(n_shards):
        blk = idx[s * n : (s + 1) * n].reshape(-1)
        order = np.argsort(blk, kind="stable")
        seen = np.zeros(ep, int)
        for a in order:
            d = blk[a] // (E // ep)
            if seen[d] >= cap:
                keep[s * n + a // K, a % K] = False
                drops += 1
            seen[d] += 1
    return drops, keep


def run(mesh_cfg, capacity_factor, dispatch):
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_cfg))
    x, wts, idx, w1, w3, w2 = problem()
    E, K = w1.shape[0], idx.shape[1]
    ffn = functools.partial(grouped_ffn, dispatch=dispatch)

    def ep_loss(x, wts, w1, w3, w2):
        y, dropped = expert_parallel_moe(
            x, wts, idx, w1, w3, w2, mesh=mesh, ffn=ffn, capacity_factor=capacity_factor
        )
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, dropped)

    n_shards = int(np.prod([mesh.shape[a] for a in token_axes(mesh)]))
    cap = capacity(x.shape[0] // n_shards * K, mesh.shape["expert"], capacity_factor)
    want_drops, keep = expected_drops(idx, n_shards, mesh.shape["expert"], E, cap)

    def ref_loss(x, wts, w1, w3, w2):
        y = moe_experts(x, wts * jnp.asarray(keep, jnp.float32), idx, w1, w3, w2, dispatch="onehot")
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    args = (x, wts, w1, w3, w2)
    with jax.set_mesh(mesh):
        (_, (y, dropped)), g = jax.jit(jax.value_and_grad(ep_loss, argnums=tuple(range(5)), has_aux=True))(
            *args
        )
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref_loss, argnums=tuple(range(5)), has_aux=True))(*args)
    err_y = float(jnp.max(jnp.abs(y - y_ref)))
    err_g = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, g_ref))
    return {
        "mesh": mesh_cfg,
        "capacity_factor": capacity_factor,
        "dispatch": dispatch,
        "capacity": cap,
        "err_y": err_y,
        "err_grad": err_g,
        "dropped": int(dropped),
        "expected_dropped": want_drops,
        "ref_scale": float(jnp.max(jnp.abs(y_ref))),
    }


def run_module(mesh_cfg):
    """The MoE module (router, shared expert, params sharded by the logical rules) under a mesh with
    an expert axis (expert parallel) against the same module without a mesh (one device)."""
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_cfg))
    moe = MoE(16, 16, 2, 12, num_shared_experts=1, routed_scaling_factor=2.0)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 8, 16)), jnp.float32)
    boxed = moe.init(jax.random.key(0), x)
    params = shd.unbox(boxed)

    def loss(p, x):
        y, sown = moe.apply(p, x, mutable=[ROUTER_LOAD])
        return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape))), (y, sown)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y_ref, sown_ref)), g_ref = step(params, x)
    shardings = shd.tree_shardings(boxed, mesh)
    params_sh = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        (_, (y, sown)), g = step(params_sh, x)
        jaxpr = str(jax.make_jaxpr(lambda p, x: moe.apply(p, x))(params_sh, x))
    moe_vars = sown[ROUTER_LOAD]
    return {
        "mesh": mesh_cfg,
        "module": True,
        "expert_parallel_ran": DROPPED_NAME in moe_vars and DROPPED_NAME not in sown_ref[ROUTER_LOAD],
        "shard_map_ran": "shard_map" in jaxpr,
        "err_y": float(jnp.max(jnp.abs(y - y_ref))),
        "err_grad": max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))
        ),
        "dropped": int(moe_vars.get(DROPPED_NAME, -1)),
        "expected_dropped": 0 if mesh.shape["expert"] > 1 else -1,  # -1: nothing sown without an expert axis
        "ref_scale": float(jnp.max(jnp.abs(y_ref))),
    }


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    for mesh_cfg, cf, dispatch in cases:
        row = run_module(mesh_cfg) if dispatch == "module" else run(mesh_cfg, cf, dispatch)
        print(json.dumps(row), flush=True)
