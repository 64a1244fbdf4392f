"""Run by test_multihost.py: one process of an N-process run (N=1 or 2) of the tiny LM on 8 CPU devices in all.

usage: multihost_script.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR [--hang-at STEP]

With N > 1 it joins ``jax.distributed`` (coordinator 127.0.0.1:PORT). ``--hang-at STEP`` writes
``<WORKDIR>/hanging_<i>`` and sleeps instead of running step STEP, so the test can SIGKILL every
process at a known point. Prints ``RESULT {json}`` (this process's rows, start step and losses) at the end.
"""

import argparse
import json
import os
import resource
import sys
import time

T0 = time.time()

sys.path.insert(0, os.path.dirname(__file__))

pid, nproc, port, workdir, data_dir = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
    sys.argv[5],
)
hang_at = int(sys.argv[sys.argv.index("--hang-at") + 1]) if "--hang-at" in sys.argv else None
assert f"--xla_force_host_platform_device_count={8 // nproc}" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402

if nproc > 1:
    # gloo is the default CPU collectives of jax 0.10-0.12 already; say so in case a version changes it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The way `jaxllm train --distributed` starts on a cluster JAX does not detect by itself:
    # jax.distributed.initialize(coordinator_address="127.0.0.1:PORT", num_processes=NPROC, process_id=PID).
    os.environ.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(nproc), JAX_PROCESS_ID=str(pid)
    )
    from jaxllm.cli import _maybe_distributed

    _maybe_distributed(argparse.Namespace(distributed=True))
assert jax.process_count() == nproc and jax.device_count() == 8 and jax.process_index() == pid

import tiny_lm  # noqa: E402

from jaxllm.train import loop  # noqa: E402

tiny_lm.register()
extra = [a for a in sys.argv[6:] if "=" in a]  # field=value overrides (for experiments)
config = tiny_lm.run_config(
    data_dir,
    *extra,
    steps=20,
    batch_size=8,
    grad_accum=2,
    seq_len=32,
    save_every=10,
    keep_checkpoints=2,
    async_checkpoints=True,
    warmup_steps=3,
    mesh_data=2,
    mesh_fsdp=2,
    mesh_tensor=2,
    peak_tflops=1.0,
)
if hang_at is not None:  # a fresh run: the n-th batch is step n's
    _global_batch, calls = loop.global_batch, [0]

    def global_batch(*a, **k):
        calls[0] += 1
        if calls[0] == hang_at:
            open(os.path.join(workdir, f"hanging_{pid}"), "w").close()
            time.sleep(600)  # the test SIGKILLs us here
        return _global_batch(*a, **k)

    loop.global_batch = global_batch

result = loop.train(config, workdir)  # default log: prints on process 0 only
s = loop.setup(config)
use = resource.getrusage(resource.RUSAGE_SELF)
print(
    "RESULT "
    + json.dumps(
        {
            "process": pid,
            "rows": loop.process_rows(s),
            "start": result.start_step,
            "losses": {str(k): v for k, v in result.losses.items()},
            "wall_s": time.time() - T0,
            "user_s": use.ru_utime,
            "sys_s": use.ru_stime,
        }
    ),
    flush=True,
)
if nproc > 1:
    jax.distributed.shutdown()
