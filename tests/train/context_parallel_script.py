"""Run by test_context_parallel.py in a subprocess with 8 virtual CPU devices.

A tiny Kimi Linear (3 KDA layers, 1 MLA layer, MoE) train step's loss and gradients on meshes that
split the sequence over `context` against one device; packed documents cross the span boundaries.
Prints one RESULT JSON line: per mesh, the loss error and the worst per-parameter gradient error
(rms-relative, float32), and whether the step really ran the context-parallel shard_maps."""

import json
import os
import pathlib
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.models import registry  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
kda_impl, T = sys.argv[1], int(sys.argv[2])
assert jax.device_count() == 8
config = registry.config_from_file(str(ROOT / "configs" / "tiny.json"), kda_impl=kda_impl)
model = registry.build(config)
B = 2
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.integers(3, config.vocab_size, (B, T + 1)), jnp.int32)
inputs, targets = ids[:, :-1], ids[:, 1:]
# packed documents: change points inside spans, on span boundaries (T/8, T/4, T/2) and a reused id
seg = np.zeros((B, T), np.int32)
for b, cuts in enumerate(([T // 8 + 5, T // 4, T // 2 + 3, 3 * T // 4 + 7], [T // 2, 5 * T // 8 + 1])):
    for n, c in enumerate(cuts):
        seg[b, c:] = (n + 1) % 2  # ids alternate 0/1: every document after the first reuses an id
seg = jnp.asarray(seg)
params = shd.unbox(model.init(jax.random.PRNGKey(0), inputs[:, :64], segment_ids=seg[:, :64]))["params"]


def loss_fn(params, inputs, targets, seg):
    out = model.apply({"params": params}, inputs, segment_ids=seg)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets)
    return jnp.mean(ce) + sum(out.aux_losses.values())


step = jax.jit(jax.value_and_grad(loss_fn))
ref_loss, ref_grads = step(params, inputs, targets, seg)
result = {}
for name, mesh_kw in (
    ("context8", dict(data=1, context=8)),
    ("fsdp2_context4", dict(data=1, fsdp=2, context=4)),
):
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_kw))
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), inputs[:, :64], segment_ids=seg[:, :64]))
    p_sh = shd.tree_shardings(boxed, mesh)["params"]
    rows = NamedSharding(mesh, shd.batch_spec())
    placed = (jax.device_put(params, p_sh), *(jax.device_put(x, rows) for x in (inputs, targets, seg)))
    with jax.set_mesh(mesh):
        sharded = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(p_sh, rows, rows, rows))
        lowered = sharded.lower(*placed)
        text = lowered.as_text()
        loss, grads = lowered.compile()(*placed)
    errs = jax.tree.map(
        lambda a, b: float(
            np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
            / (np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)) + 1e-30)
        ),
        ref_grads,
        grads,
    )
    flat = {jax.tree_util.keystr(p): e for p, e in jax.tree_util.tree_flatten_with_path(errs)[0]}
    diff2 = sum(
        float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
        for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads))
    )
    norm2 = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in jax.tree.leaves(ref_grads))
    worst = max(flat, key=flat.get)
    result[name] = dict(
        loss=float(loss),
        ref_loss=float(ref_loss),
        loss_err=abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
        grad_err=flat[worst],
        grad_err_global=float(np.sqrt(diff2 / norm2)),
        worst=worst,
        all_gather="all-gather" in text or "all_gather" in text,
        ppermute="collective-permute" in text or "collective_permute" in text,
        batch_spec=str(rows.spec),
    )
print("RESULT " + json.dumps(result))
