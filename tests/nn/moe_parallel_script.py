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
from jaxllm.nn.moe import DROPPED_NAME, ROUTER_LOAD, MoE, grouped_ffn, moe_experts, route, sown_by_layer
from jaxllm.nn.moe_parallel import capacity, emulated_ragged_all_to_all, expert_parallel_moe, token_axes
from jaxllm.train import loop
from jaxllm.train import metrics as metrics_lib
from jaxllm.train.config import RunConfig

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


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def shard_map_width(closed_jaxpr) -> int:
    """The experts' intermediate width w1 has inside the (first) shard_map: F / the tensor size when
    the width is split over `tensor`, F when every shard runs it whole."""
    for eqn in _eqns(closed_jaxpr.jaxpr):
        if eqn.primitive.name == "shard_map":
            return int(eqn.params["jaxpr"].invars[3].aval.shape[-1])
    return -1


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


def run(mesh_cfg, capacity_factor, dispatch, exchange="dense"):
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_cfg))
    x, wts, idx, w1, w3, w2 = problem()
    E, K = w1.shape[0], idx.shape[1]
    ffn = functools.partial(grouped_ffn, dispatch=dispatch)

    def ep_loss(x, wts, w1, w3, w2):
        y, dropped = expert_parallel_moe(
            x,
            wts,
            idx,
            w1,
            w3,
            w2,
            mesh=mesh,
            ffn=ffn,
            capacity_factor=capacity_factor,
            exchange=exchange,
            ragged_all_to_all=emulated_ragged_all_to_all,  # XLA:CPU lacks the primitive
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
        width = shard_map_width(jax.make_jaxpr(ep_loss)(*args))
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref_loss, argnums=tuple(range(5)), has_aux=True))(*args)
    err_y = float(jnp.max(jnp.abs(y - y_ref)))
    err_g = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, g_ref))
    return {
        "mesh": mesh_cfg,
        "capacity_factor": capacity_factor,
        "dispatch": dispatch,
        "exchange": exchange,
        "capacity": cap,
        "err_y": err_y,
        "err_grad": err_g,
        "dropped": int(dropped),
        "expected_dropped": want_drops,
        "ref_scale": float(jnp.max(jnp.abs(y_ref))),
        "inner_width": width,
        "full_width": w1.shape[-1],
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
        closed = jax.make_jaxpr(lambda p, x: moe.apply(p, x))(params_sh, x)
        jaxpr = str(closed)
    moe_vars = sown[ROUTER_LOAD]
    return {
        "mesh": mesh_cfg,
        "module": True,
        "expert_parallel_ran": "all_to_all" in jaxpr,
        "shard_map_ran": "shard_map" in jaxpr,
        "err_y": float(jnp.max(jnp.abs(y - y_ref))),
        "err_grad": max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))
        ),
        "dropped": int(moe_vars[DROPPED_NAME]),
        "expected_dropped": int(sown_ref[ROUTER_LOAD][DROPPED_NAME]),  # 0: both are dropless
        "ref_scale": float(jnp.max(jnp.abs(y_ref))),
        "inner_width": shard_map_width(closed),
        "full_width": moe.moe_intermediate_size,
    }


TRAIN_MODEL = dict(
    hidden_size=16,
    num_hidden_layers=1,
    layer_types=["mla"],
    mlp_layer_types=["moe"],
    kda_num_heads=1,
    kda_head_dim=8,
    num_attention_heads=1,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=0,
    v_head_dim=8,
    intermediate_size=16,
    moe_intermediate_size=8,
    num_experts=8,
    num_experts_per_token=2,
)


def run_train(mesh_cfg, capacity_factor):
    """The loop's compiled train step (`loop.compile_step`, 2 microbatches) of a one-layer Kimi
    Linear MoE: the dropped fraction its metrics.jsonl record gets (`aux_and_load_record`) times
    the step's assignments, against the count the layer itself sows on the same params and batch."""
    config = RunConfig(
        model="kimi_linear",
        model_args=dict(TRAIN_MODEL, moe_capacity_factor=capacity_factor),
        seq_len=16,
        batch_size=16,
        grad_accum=2,
        progress=False,
        num_samples=0,
        **{f"mesh_{k}": v for k, v in mesh_cfg.items()},
    )
    s = loop.setup(config)
    ga, micro, T = loop.batch_shape(s)
    ids = np.random.default_rng(0).integers(0, s.vocab_size, size=(ga, micro, T + 1), dtype=np.int32)
    batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:]}
    batch.update(segment_ids=np.ones_like(batch["inputs"]), loss_mask=np.ones_like(batch["inputs"]))
    batch = loop.global_batch(s, batch)
    state = loop.init_state(s)
    apply = jax.jit(lambda p, x, seg: s.model.apply(p, x, segment_ids=seg, mutable=[ROUTER_LOAD])[1])
    layer_dropped = {}
    with jax.set_mesh(s.mesh):
        for g in range(ga):
            sown = apply(state["params"], batch["inputs"][g], batch["segment_ids"][g])[ROUTER_LOAD]
            for layer, count in sown_by_layer(sown, DROPPED_NAME).items():
                layer_dropped[layer] = layer_dropped.get(layer, 0) + int(count)
        _, m = loop.compile_step(s)(state, batch)
    rec = metrics_lib.aux_and_load_record(jax.device_get(m))
    assignments = ga * micro * T * TRAIN_MODEL["num_experts_per_token"]
    return {
        "mesh": mesh_cfg,
        "capacity_factor": capacity_factor,
        "train": True,
        "layer_dropped": layer_dropped,
        "record_dropped": {k: rec.get(f"moe/{k}/dropped", -1.0) * assignments for k in layer_dropped},
        "record_mean": rec.get("moe_dropped", -1.0),
        "assignments": assignments,
    }


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    for mesh_cfg, cf, dispatch, *exchange in cases:
        if dispatch == "train":
            row = run_train(mesh_cfg, cf)
        else:
            row = run_module(mesh_cfg) if dispatch == "module" else run(mesh_cfg, cf, dispatch, *exchange)
        print(json.dumps(row), flush=True)
