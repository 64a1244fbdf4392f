"""Run by test_multidevice.py in a subprocess with 8 virtual CPU devices; prints one JSON line."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny_lm  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.train import (  # noqa: E402
    ConfigError,
    RunConfig,
    loop,  # noqa: E402
    train,
)
from jaxllm.train import checkpoint as ckpt_lib  # noqa: E402

tiny_lm.register()
workdir, data_dir = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8
base = dict(
    model="tiny_test",
    seq_len=32,
    batch_size=8,
    steps=20,
    lr=1e-2,
    warmup_steps=3,
    save_every=10,
    data_dir=data_dir,
    num_samples=0,
    progress=False,
    async_checkpoints=False,
)
quiet = lambda m: None  # noqa: E731


def run(name, mesh_kw, devices=None):
    config = RunConfig(**base, **{f"mesh_{k}": v for k, v in mesh_kw.items()})
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_kw), devices=devices)
    return config, mesh, train(config, os.path.join(workdir, name), mesh=mesh, log=quiet)


def spec_report(params, boxed, mesh):
    """For every param: (actual spec == rule spec, actual spec)."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = shd.logical_names_tree(boxed)
    flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple) or x is None)
    for (path, arr), ln in zip(flat, flat_names):
        want = shd.logical_to_spec(ln, arr.shape, mesh)
        got = arr.sharding.spec
        pad = lambda s: tuple(s) + (None,) * (arr.ndim - len(tuple(s)))  # noqa: E731
        out[jax.tree_util.keystr(path)] = [
            pad(got) == pad(want),
            str(got),
            [list(s.data.shape) for s in arr.addressable_shards[:1]],
        ]
    return out


result = {}
_, _, one = run("one", dict(data=1), devices=jax.devices()[:1])
result["one"] = [one.losses[s] for s in range(1, 21)]
for name, mesh_kw in (
    ("fsdp4_tensor2", dict(data=1, fsdp=4, tensor=2)),
    ("data2_expert4", dict(data=2, expert=4)),
):
    config, mesh, r = run(name, mesh_kw)
    s = loop.setup(config, mesh=mesh)
    result[name] = [r.losses[s_] for s_ in range(1, 21)]
    result[name + "_specs"] = spec_report(r.params, s.boxed, mesh)
    if name == "fsdp4_tensor2":
        final_fsdp = jax.device_get(r.params)

# Restore the fsdp x tensor checkpoint onto the data x expert mesh.
config = RunConfig(**base, mesh_data=2, mesh_expert=4)
mesh = shd.make_mesh(shd.MeshConfig(data=2, expert=4))
s = loop.setup(config, mesh=mesh)
with jax.set_mesh(mesh):
    abstract = loop.abstract_state(s)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "fsdp4_tensor2", "checkpoints"), save_every=10, keep=3)
    state, data_state = ck.restore(20, abstract, ckpt_lib.make_meta(config, abstract["params"]))
    ck.close()
same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), state["params"], final_fsdp)
result["restored_equal"] = all(jax.tree.leaves(same))
result["restored_step"] = int(state["step"])
result["restored_specs"] = spec_report(state["params"], s.boxed, mesh)
result["restored_data_state"] = data_state
# What the data position of step 20 must be: a fresh pipeline of the same run, 20 batches on; and
# resuming from the restored position must give that pipeline's next batch.
fresh = loop.make_data(s)
for _ in range(20):
    fresh.next_rows()
result["expected_rows"] = {
    str(r): [p.epoch, p.cursor, p.offset] for r, p in fresh.state.items()
}  # not get_state()
resumed = loop.make_data(s)
resumed.set_state(data_state)
after, want = resumed.next_rows(), fresh.next_rows()
result["resumed_batch_equal"] = all(np.array_equal(after[k], want[k]) for k in want)

try:
    loop.setup(RunConfig(**{**base, "batch_size": 6}, mesh_fsdp=4, mesh_tensor=2))
    result["indivisible_error"] = None
except ConfigError as e:
    result["indivisible_error"] = str(e)
print("RESULT " + json.dumps(result))
