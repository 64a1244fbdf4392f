"""Each process reads from a hub checkpoint only what its devices hold.

Unit level: every transform's `read_box` equals converting the whole tensor and slicing it, and a box
split along one dimension (what a sharding makes) reads exactly its own elements.
Two processes (4 CPU devices each, one 8-device mesh): loading the Kimi Linear golden checkpoint onto
shardings gives every local shard exactly, and each process reads at most a little more than the
bytes its devices hold (the whole model before host boxes: every process read every byte).
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.models.hf_keys import Conv, Identity, Linear, Reshape

HERE = pathlib.Path(__file__).parent
GOLDEN = HERE.parent / "golden" / "kimi_linear_tiny"

TRANSFORMS = [
    ("identity", Identity(), (6, 4, 5)),
    ("linear", Linear(), (6, 4, 5)),
    ("linear_two_in", Linear(n_in=2), (3, 4, 10)),
    ("conv", Conv(), (4, 3, 6)),
    ("reshape", Reshape(lambda s: (1, 1, math.prod(s), 1)), (6, 4)),
    ("reshape_rows", Reshape(lambda s: (s[0] * s[1] // 2, 2)), (6, 4)),
]


def _counting(hub):
    read = []

    def get(index):
        part = hub[index]
        read.append(part.size)
        return part

    return get, read


def _boxes(shape, rng, n=40):
    for _ in range(n):
        box = []
        for size in shape:
            a = int(rng.integers(0, size))
            box.append((a, int(rng.integers(a + 1, size + 1))))
        yield tuple(box)


@pytest.mark.parametrize("name,transform,shape", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_read_box_equals_slicing_the_whole(name, transform, shape):
    rng = np.random.default_rng(0)
    ours = rng.standard_normal(shape).astype(np.float32)
    hub = np.ascontiguousarray(transform.to_hf(ours, shape))
    assert hub.shape == transform.hf_shape(shape)
    np.testing.assert_array_equal(transform.to_ours(hub, shape), ours)
    for box in _boxes(shape, rng):
        get, _ = _counting(hub)
        got = transform.read_box(get, shape, box)
        np.testing.assert_array_equal(got, ours[tuple(slice(a, b) for a, b in box)], str(box))


# the dimensions that lead their flattened group (the logical-axis rules split only those: a
# trailing one such as "kv" or "conv" is never sharded), where a half box is one contiguous read
LEADING_DIMS = {"identity": (0, 1, 2), "linear": (0, 1), "linear_two_in": (0, 2), "conv": (0, 1)}


@pytest.mark.parametrize("name,transform,shape", TRANSFORMS[:4], ids=[t[0] for t in TRANSFORMS[:4]])
def test_a_box_split_along_a_leading_dimension_reads_only_itself(name, transform, shape):
    ours = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    hub = np.ascontiguousarray(transform.to_hf(ours, shape))
    for d in LEADING_DIMS[name]:
        for part in range(2):
            box = tuple((0, n) for n in shape)
            box = box[:d] + ((part * shape[d] // 2, (part + 1) * shape[d] // 2),) + box[d + 1 :]
            get, read = _counting(hub)
            transform.read_box(get, shape, box)
            assert sum(read) == math.prod(b - a for a, b in box), (d, box, read)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_process_reads_what_its_devices_hold(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
    )
    env.pop("JAX_NUM_CPU_DEVICES", None)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "host_reads_script.py"), str(pid), "2", port, str(GOLDEN)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-4000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [
        json.loads(line[len("RESULT ") :])
        for o in outs
        for line in o.splitlines()
        if line.startswith("RESULT ")
    ]
    assert len(results) == 2, outs
    for r in results:
        total = r["total"]
        for mesh in ("fsdp2_tensor2_expert2", "expert8"):
            read, held = r[mesh]["read"], r[mesh]["held"]
            print(f"{mesh}: read {read} of {total} bytes; the devices hold {held}")
            # every byte a device holds is read; little more (small tensors with a leading 1 are read whole)
            assert held <= read <= 1.02 * held, (mesh, read, held)
        # the process splits embed (fsdp) and heads/mlp (tensor) in half: about half of the model
        assert r["fsdp2_tensor2_expert2"]["read"] < 0.6 * total, r
        # experts held by the other process are never read; the rest is replicated
        assert r["expert8"]["read"] < 0.8 * total, r
