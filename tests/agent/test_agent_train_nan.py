"""The agent SFT driver follows the one NaN policy of jaxllm.train.step: a non-finite step stops
training with NonFiniteLossError, naming the step and the last good checkpoint."""

import pytest

from jaxllm.agent import synth
from jaxllm.agent import train as at
from jaxllm.errors import NonFiniteLossError
from jaxllm.train.config import RunConfig

DENSE = dict(
    hidden_size=16,
    num_hidden_layers=1,
    layer_types=["mla"],
    mlp_layer_types=["dense"],
    kda_num_heads=1,
    kda_head_dim=8,
    num_attention_heads=1,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=0,
    v_head_dim=8,
    intermediate_size=16,
)


def test_sft_stops_at_the_first_nonfinite_step(tmp_path):
    records = synth.synthesize(2, seed=0, hops=(1,), obfuscate_prob=0.0, system_prompt="Use the tools.")
    settings = at.settings_from_records(records, None)
    config = RunConfig(
        model="kimi_linear",
        model_args=DENSE,
        seq_len=1023,
        batch_size=1,
        steps=4,
        lr=1e25,
        warmup_steps=0,
        save_every=1,
        num_samples=0,
        progress=False,
    )
    with pytest.raises(NonFiniteLossError) as e:
        at.train_sft(config, str(tmp_path), records, settings, strip=True, log=lambda msg: None)
    assert e.value.step >= 2 and e.value.last_good == e.value.step - 1, str(e.value)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert max(saved) == e.value.last_good
