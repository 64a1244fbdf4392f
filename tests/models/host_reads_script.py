"""Run by test_hf_host_reads.py: one process of a 2-process run (4 CPU devices each) that loads a hub
checkpoint onto shardings over all 8 devices.

usage: host_reads_script.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT_DIR

For each mesh it loads with `param_shardings` while counting the bytes read from the safetensors
files, checks every local shard against the whole checkpoint (loaded without shardings in this
process), and prints `RESULT {json}`: per mesh the bytes read, the bytes its devices hold (the
host boxes) and the checkpoint's total.
"""

import json
import os
import sys

pid, nproc, port, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
assert jax.process_count() == nproc and jax.device_count() == 8

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402

from jaxllm import sharding  # noqa: E402
from jaxllm.models import hf  # noqa: E402


class CountingFile:
    """safe_open that counts the bytes of every array read from it."""

    bytes_read = 0

    def __init__(self, *args, **kwargs):
        self._f = safetensors.safe_open(*args, **kwargs)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def get_tensor(self, name):
        a = self._f.get_tensor(name)
        CountingFile.bytes_read += a.nbytes
        return a

    def get_slice(self, name):
        return CountingSlice(self._f.get_slice(name))


class CountingSlice:
    def __init__(self, sl):
        self._sl = sl

    def get_shape(self):
        return self._sl.get_shape()

    def __getitem__(self, index):
        a = self._sl[index]
        CountingFile.bytes_read += a.nbytes
        return a


def total_bytes(path):
    n = 0
    with safetensors.safe_open(os.path.join(path, hf.SAFE_SINGLE), "numpy") as f:
        for k in f.keys():
            n += f.get_tensor(k).nbytes
    return n


_, whole = hf.load_hf_checkpoint(ckpt)  # every parameter, on this process's first device
model, _ = hf.load_hf_checkpoint(ckpt)
boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
result = {"total": total_bytes(ckpt)}
hf.safe_open = CountingFile  # what the loader opens from here on
for name, mesh_config in (
    ("fsdp2_tensor2_expert2", sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=2)),
    ("expert8", sharding.MeshConfig(data=1, expert=8)),
):
    mesh = sharding.make_mesh(mesh_config)
    shardings = sharding.tree_shardings(boxed, mesh)
    CountingFile.bytes_read = 0
    _, loaded = hf.load_hf_checkpoint(ckpt, param_shardings=shardings)
    held = 0
    for (path, ref), (_, got), (_, sh) in zip(
        jax.tree_util.tree_leaves_with_path(whole["params"]),
        jax.tree_util.tree_leaves_with_path(loaded["params"]),
        jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shardings)),
    ):
        assert got.sharding == sh, (path, got.sharding, sh)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(ref)[shard.index], str(path))
        box = hf.host_box(sh, ref.shape)
        held += int(np.prod([b - a for a, b in box])) * ref.dtype.itemsize
    result[name] = {"read": CountingFile.bytes_read, "held": held}
print("RESULT " + json.dumps(result), flush=True)
