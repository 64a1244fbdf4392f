"""Train-step throughput and MFU of the default (small) Kimi Linear config on this machine.

    python tools/bench_train.py [--config configs/train_default.json] [--steps 10] [field=value ...]

Prints one JSON line: tokens/s and MFU of the jitted jaxllm train step (forward, backward,
AdamW update), and, when `torch` and `transformers` are installed, the same figure for the
equivalent `transformers` KimiLinearForCausalLM (forward, backward, torch AdamW) measured in
the same run, with the ratio. MFU uses XLA's FLOP count of the compiled step and, on CPU,
the measured f32 matmul throughput of this machine as the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxllm.models.config import KimiLinearConfig  # noqa: E402
from jaxllm.train import loop  # noqa: E402
from jaxllm.train import metrics as ml  # noqa: E402
from jaxllm.train.config import load_config  # noqa: E402


def bench_jax(config, steps: int) -> dict:
    s = loop.setup(config)
    with jax.set_mesh(s.mesh):
        state = loop.init_state(s)
        step_fn = loop.compile_step(s)
        rng = np.random.default_rng(0)
        shape = (config.grad_accum, config.batch_size // config.grad_accum, config.seq_len)
        ids = rng.integers(3, s.tokenizer.vocab_size, size=shape, dtype=np.int32)
        local = {
            "inputs": ids,
            "targets": np.roll(ids, -1, axis=-1),
            "segment_ids": np.ones_like(ids),
            "loss_mask": np.ones_like(ids),
        }
        batch = loop.global_batch(s, local)
        times = []
        for i in range(steps + 2):
            t = time.perf_counter()
            state, m = step_fn(state, batch)
            jax.block_until_ready(m)
            if i >= 2:
                times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    flops = ml.compiled_flops(step_fn)
    peak, src = ml.peak_tflops_per_device(config.peak_tflops)
    tokens = config.batch_size * config.seq_len
    return {
        "tokens_per_s": tokens / dt,
        "step_s": dt,
        "flops_per_step": flops,
        "mfu": flops / dt / (peak * 1e12) if flops else None,  # both per device
        "peak_tflops_per_device": peak,
        "peak_source": src,
        "devices": jax.device_count(),
        "params": ml.param_count(state["params"]),
        "model_config": s.model.config.__dict__ if hasattr(s.model, "config") else None,
    }


def bench_transformers(model_config, config, steps: int) -> dict:
    try:
        import torch  # noqa: PLC0415 (optional dependency: the hf extra)
        import transformers  # noqa: PLC0415 (optional dependency: the hf extra)
    except ImportError as e:
        return {"skipped": f"torch/transformers not installed ({e.name})"}
    hf_cfg = model_config.to_hf_config(layout="transformers")
    try:
        cfg = transformers.AutoConfig.for_model(**hf_cfg)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - report why the comparison could not run
        return {"skipped": f"transformers could not build KimiLinear: {type(e).__name__}: {e}"}
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ids = torch.randint(3, 259, (config.batch_size, config.seq_len))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    return {
        "tokens_per_s": config.batch_size * config.seq_len / dt,
        "step_s": dt,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "train_default.json"))
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides)
    jax_res = bench_jax(config, args.steps)
    model_cfg = jax_res.pop("model_config")
    hf = {"skipped": "model has no KimiLinearConfig"}
    if model_cfg is not None:
        hf = bench_transformers(KimiLinearConfig(**model_cfg), config, args.steps)
    out = {
        "bench": "train_step",
        "config": os.path.relpath(args.config, ROOT) if args.config else None,
        "batch": config.batch_size,
        "seq_len": config.seq_len,
        "jaxllm": jax_res,
        "transformers": hf,
    }
    if "tokens_per_s" in hf:
        out["speedup_vs_transformers"] = jax_res["tokens_per_s"] / hf["tokens_per_s"]
    out["machine"] = f"{platform.machine()} {os.cpu_count()} cpus, jax {__import__('jax').__version__}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
