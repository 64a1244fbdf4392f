"""Run by test_resume.py: train the tiny LM; with --slow, sleep per step so the test can SIGKILL it."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import tiny_lm  # noqa: E402

from jaxllm.train import loop  # noqa: E402
from jaxllm.train.config import load_config  # noqa: E402

tiny_lm.register()
workdir, data_dir, slow = sys.argv[1], sys.argv[2], "--slow" in sys.argv
if slow:
    _global_batch = loop.global_batch

    def slow_batch(*a, **k):
        time.sleep(0.3)
        return _global_batch(*a, **k)

    loop.global_batch = slow_batch
config = load_config(
    None,
    [
        "model=tiny_test",
        "seq_len=32",
        "batch_size=8",
        "steps=16",
        "lr=1e-2",
        "warmup_steps=2",
        "save_every=3",
        f"data_dir={data_dir}",
        "num_samples=0",
        "progress=false",
    ],
)
loop.train(config, workdir)
