"""Run by test_resume.py: train the tiny LM; with --slow, sleep per step so the test can SIGKILL it.
With --moe: a one-layer Kimi Linear MoE with aux-loss-free balancing instead (its final correction
biases go to <workdir>/final_bias.json)."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import tiny_lm  # noqa: E402

from jaxllm.train import loop  # noqa: E402
from jaxllm.train.config import load_config  # noqa: E402

tiny_lm.register()
workdir, data_dir, slow, moe = sys.argv[1], sys.argv[2], "--slow" in sys.argv, "--moe" in sys.argv
if slow:
    _global_batch = loop.global_batch

    def slow_batch(*a, **k):
        time.sleep(0.3)
        return _global_batch(*a, **k)

    loop.global_batch = slow_batch
MOE = [
    "model=kimi_linear",
    'model_args={"hidden_size": 16, "num_hidden_layers": 1, "layer_types": ["mla"], "mlp_layer_types": '
    '["moe"], "kda_num_heads": 1, "kda_head_dim": 8, "num_attention_heads": 1, "kv_lora_rank": 8, '
    '"qk_nope_head_dim": 8, "qk_rope_head_dim": 0, "v_head_dim": 8, "intermediate_size": 16, '
    '"moe_intermediate_size": 8, "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 0}',
    "moe_bias_update_rate=0.01",
]
config = load_config(
    None,
    (MOE if moe else ["model=tiny_test"])
    + [
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
result = loop.train(config, workdir)
if moe:
    bias = result.params["params"]["layers_0"]["moe"]["e_score_correction_bias"]
    with open(os.path.join(workdir, "final_bias.json"), "w") as f:
        json.dump([float(b) for b in bias], f)
