"""Kimi Linear MoE on 1 device vs 8 virtual CPU devices as fsdp x tensor = 4 x 2.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before JAX starts).

  python moe_routing_script.py check <data_dir>   same params, same batch on both meshes: routing
                                                   (top-k expert choice of every token), loss and
                                                   gradients; one JSON line (test_moe_routing.py)
  python moe_routing_script.py drift <data_dir>   the investigation behind docs/training.md: train
                                                   STEPS (default 8) steps on each mesh and, per step,
                                                   compare routing on each run's own params and on the
                                                   same params; prints a table (a one-off, ~2 min)
"""

import json
import os
import sys
import time

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.nn.moe import route  # noqa: E402
from jaxllm.train import RunConfig, loop  # noqa: E402
from jaxllm.train.step import lm_loss  # noqa: E402

mode, data_dir = sys.argv[1], sys.argv[2]
TOP_K = 2
if mode == "check":  # small: two layers (KDA, MLA), both with a top-2-of-4 MoE
    ARGS = dict(
        hidden_size=32,
        num_hidden_layers=2,
        layer_types=["kda", "mla"],
        mlp_layer_types=["moe", "moe"],
        kda_num_heads=2,
        kda_head_dim=16,
        num_attention_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=0,
        v_head_dim=16,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_token=TOP_K,
        num_shared_experts=1,
    )
    MOE_LAYERS, SEQ = (0, 1), 32
else:  # the configuration of the reported drift: hidden 64, 3 KDA + 1 MLA, MoE in layers 1-3
    ARGS = dict(
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=["kda", "kda", "kda", "mla"],
        mlp_layer_types=["dense", "moe", "moe", "moe"],
        kda_num_heads=2,
        kda_head_dim=32,
        num_attention_heads=2,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=0,
        v_head_dim=32,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_token=TOP_K,
        num_shared_experts=1,
    )
    MOE_LAYERS, SEQ = (1, 2, 3), 64
STEPS = int(os.environ.get("STEPS", 8))
BASE = dict(
    model="kimi_linear",
    model_args=ARGS,
    seq_len=SEQ,
    batch_size=8,
    steps=STEPS,
    lr=3e-3,
    warmup_steps=3,
    data_dir=data_dir,
    num_samples=0,
    progress=False,
    async_checkpoints=False,
)
MESHES = {"1dev": (dict(data=1), jax.devices()[:1]), "4x2": (dict(data=1, fsdp=4, tensor=2), None)}


def make_setup(name):
    mesh_kw, devices = MESHES[name]
    config = RunConfig(**BASE, **{f"mesh_{k}": v for k, v in mesh_kw.items()})
    return loop.setup(config, mesh=shd.make_mesh(shd.MeshConfig(**mesh_kw), devices=devices))


def loss_grads_and_moe_inputs(s):
    """jit(params, batch) -> (mean token loss, grads, {layer: MoE input [B*T, D]}) on s.mesh."""
    loss_fn = lm_loss(s.model.apply)

    def f(params, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        (_, out), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        ce, n = out.means["loss"], out.weight
        _, inter = s.model.apply(
            params,
            mb["inputs"],
            segment_ids=mb["segment_ids"],
            capture_intermediates=lambda mdl, _: mdl.name == "post_attention_layernorm",
        )
        h = {
            i: inter["intermediates"][f"layers_{i}"]["post_attention_layernorm"]["__call__"][0]
            for i in MOE_LAYERS
        }
        return ce / n, jax.tree.map(lambda x: x / n, g), h

    sh = s.state_shardings["params"]
    return jax.jit(f, in_shardings=(sh, s.batch_sharding))


def routing(params, h, layer):
    """(sorted top-k experts [N, k], gap between the k-th and (k+1)-th corrected router score [N])."""
    mp = params["params"][f"layers_{layer}"]["moe"]
    x = jnp.asarray(h).reshape(-1, h.shape[-1])
    _, idx = route(x, mp["router"], mp["e_score_correction_bias"], top_k=TOP_K)
    scores = np.asarray(
        jax.nn.sigmoid(jnp.dot(x, mp["router"], precision=jax.lax.Precision.HIGHEST))
        + mp["e_score_correction_bias"]
    )
    ranked = -np.sort(-scores, -1)
    return np.sort(np.asarray(idx), -1), ranked[:, TOP_K - 1] - ranked[:, TOP_K]


def rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(la, lb))
    return float(np.sqrt(num / sum(float(np.sum(np.asarray(x) ** 2)) for x in la)))


def evaluate(setups, fns, params, local):
    out = {}
    for name, s in setups.items():
        with jax.set_mesh(s.mesh):
            out[name] = jax.device_get(fns[name](params, loop.global_batch(s, local)))
    return out


def check():
    setups = {name: make_setup(name) for name in MESHES}
    s1 = setups["1dev"]
    with jax.set_mesh(s1.mesh):
        params = jax.device_get(loop.init_state(s1)["params"])
        local = next(loop.make_data(s1))
    fns = {name: loss_grads_and_moe_inputs(s) for name, s in setups.items()}
    out = evaluate(setups, fns, params, local)
    (l1, g1, h1), (l8, g8, h8) = out["1dev"], out["4x2"]
    result = {"loss_rel": abs(float(l8) - float(l1)) / abs(float(l1)), "grad_rel": rel(g1, g8), "layers": {}}
    for i in MOE_LAYERS:
        i1, gap = routing(params, h1[i], i)
        i8, _ = routing(params, h8[i], i)
        result["layers"][i] = {
            "tokens": len(gap),
            "flips": int(np.any(i1 != i8, -1).sum()),
            "input_rel": float(np.abs(h1[i] - h8[i]).max() / np.abs(h1[i]).max()),
            "min_gap": float(gap.min()),
        }
    s8 = setups["4x2"]
    w1 = loop.abstract_state(s8)["params"]["params"][f"layers_{MOE_LAYERS[0]}"]["moe"]["w1"]
    result["w1_spec"] = str(w1.sharding.spec)
    print("RESULT " + json.dumps(result))


def drift():
    t0 = time.time()
    setups = {name: make_setup(name) for name in MESHES}
    runs = {}
    for name, s in setups.items():
        with jax.set_mesh(s.mesh):
            data, state, step = loop.make_data(s), loop.init_state(s), loop.compile_step(s)
            params, batches, losses = [], [], []
            for _ in range(STEPS):
                local = next(data)
                params.append(jax.device_get(state["params"]))
                batches.append(local)
                state, m = step(state, loop.global_batch(s, local))
                losses.append(float(m["loss"]))
        runs[name] = (params, batches, losses)
        print(f"[{time.time() - t0:.0f}s] {name} losses {np.round(losses, 6).tolist()}", flush=True)
    fns = {name: loss_grads_and_moe_inputs(s) for name, s in setups.items()}
    (p1, b1, l1), (p8, _, l8) = runs["1dev"], runs["4x2"]
    print(
        "step | loss rel diff (runs) | max param rel diff (runs) | same params: loss rel, flips | "
        "own params: flips (k/k+1 gap of each flipped token on 1 device)"
    )
    for t in range(STEPS):
        same = evaluate(setups, fns, p1[t], b1[t])
        own8 = evaluate({"4x2": setups["4x2"]}, fns, p8[t], b1[t])["4x2"]
        prel = max(
            float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30))
            for a, b in zip(jax.tree.leaves(p1[t]), jax.tree.leaves(p8[t]))
        )
        flips_same, flips_own, gaps = 0, 0, []
        for i in MOE_LAYERS:
            i1, gap = routing(p1[t], same["1dev"][2][i], i)
            flips_same += int(np.any(i1 != routing(p1[t], same["4x2"][2][i], i)[0], -1).sum())
            f = np.any(i1 != routing(p8[t], own8[2][i], i)[0], -1)
            flips_own += int(f.sum())
            gaps += gap[f].tolist()
        lrel = abs(float(same["4x2"][0]) - float(same["1dev"][0])) / float(same["1dev"][0])
        print(
            f"{t + 1:4d} | {abs(l8[t] - l1[t]) / l1[t]:.1e} | {prel:.1e} | {lrel:.1e}, {flips_same} | {flips_own} "
            f"{['%.1e' % x for x in gaps[:6]]}",
            flush=True,
        )
    g = evaluate(setups, fns, p1[0], b1[0])
    print(
        f"gradients at the same (initial) params: global relative difference {rel(g['1dev'][1], g['4x2'][1]):.1e}"
    )


{"check": check, "drift": drift}[mode]()
