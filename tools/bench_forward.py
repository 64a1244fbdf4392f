#!/usr/bin/env python
"""Forward+backward tokens/s: jaxllm vs transformers' model of the same `model_type` (CPU).

Any registered architecture: `--model kimi_linear` (transformers' KimiLinearForCausalLM, pure-torch
path) or `--model qwen3_moe` (Qwen3MoeForCausalLM), or `--config` any Hugging Face config.json.
Same config, same weights (written by `jaxllm.save_hf_checkpoint` and read back by
`AutoModelForCausalLM.from_pretrained`), same batch of token ids, next-token cross-entropy loss,
gradients for every parameter. Both run in this one process, alternating, so machine noise hits
both; the JSON line carries both throughputs, their ratio and the relative RMS difference of the
two models' logits (a check that the comparison is like for like).

Needs torch and transformers (not test dependencies): pip install torch transformers

    python tools/bench_forward.py --model kimi_linear --batch 2 --seq 256     # configs/small.json
    python tools/bench_forward.py --model qwen3_moe --batch 2 --seq 256       # configs/qwen3_moe_small.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxllm  # noqa: E402
from jaxllm.models import registry  # noqa: E402

DEFAULT_CONFIGS = {"kimi_linear": "configs/small.json", "qwen3_moe": "configs/qwen3_moe_small.json"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="kimi_linear", choices=sorted(DEFAULT_CONFIGS))
    ap.add_argument("--config", default=None, help="a Hugging Face config.json (default: the --model's)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kda-impl", default="auto")
    ap.add_argument("--moe-dispatch", default="auto")
    args = ap.parse_args(argv)

    import torch  # noqa: PLC0415 (optional dependency: the hf extra)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 (optional dependency: the hf extra)

    args.config = args.config or DEFAULT_CONFIGS[args.model]
    hf_config = registry.read_hf_config(args.config)
    arch = registry.get(hf_config["model_type"])
    fields = {f.name for f in dataclasses.fields(arch.config_cls)}
    runtime = {
        k: v for k, v in (("kda_impl", args.kda_impl), ("moe_dispatch", args.moe_dispatch)) if k in fields
    }
    config = arch.config_cls.from_hf_config(hf_config, **runtime)
    model = registry.build(config)
    ids = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.seq + 1), 0, config.vocab_size)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), ids[:, :8])
    ids_np = np.asarray(ids)

    def loss_fn(p, x, y):
        logits = model.apply(p, x).logits
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

    step = jax.jit(jax.value_and_grad(loss_fn))
    x, y = ids[:, :-1], ids[:, 1:]

    with tempfile.TemporaryDirectory() as d:
        layout = "transformers" if "transformers" in getattr(config, "HF_LAYOUTS", ()) else None
        jaxllm.save_hf_checkpoint(d, model, params, layout=layout)
        tmodel = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tmodel.train()
    tx = torch.as_tensor(ids_np[:, :-1], dtype=torch.long)

    def torch_step():
        tmodel.zero_grad(set_to_none=True)
        out = tmodel(input_ids=tx, labels=torch.as_tensor(ids_np[:, :-1], dtype=torch.long))
        # HF shifts labels internally; we pass the inputs as labels -> same next-token loss
        out.loss.backward()
        return float(out.loss.detach())

    # like-for-like check on the logits
    with torch.no_grad():
        t_logits = tmodel(input_ids=tx).logits.float().numpy()
    j_logits = np.asarray(jax.jit(model.apply)(params, x).logits)
    rel = float(np.sqrt(np.mean((t_logits - j_logits) ** 2) / np.mean(t_logits**2)))

    jax.block_until_ready(step(params, x, y))  # compile
    torch_step()  # warm up
    tj, tt = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x, y))
        tj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_step()
        tt.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    j_tps, t_tps = tokens / float(np.median(tj)), tokens / float(np.median(tt))
    print(
        json.dumps(
            dict(
                bench="forward_backward",
                model_type=config.model_type,
                config=os.path.basename(args.config),
                device=jax.devices()[0].device_kind,
                batch=args.batch,
                seq=args.seq,
                reps=args.reps,
                **runtime,
                jaxllm_tokens_per_s=round(j_tps, 1),
                transformers_tokens_per_s=round(t_tps, 1),
                speedup=round(j_tps / t_tps, 2),
                logits_rel_rms=rel,
                torch_threads=torch.get_num_threads(),
                torch_version=torch.__version__,
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
