"""Aux-loss-free load balancing (DeepSeek-V3's bias update) through the real train step.

A one-layer Kimi Linear model (MLA + a 16-expert top-2 MoE, no shared expert) trains on the
embedded corpus for 200 steps from a deliberately skewed router: experts 0 and 1 start with an
e_score_correction_bias of +0.5, so nearly every token picks them (max/mean load ~6-8). With
moe_bias_update_rate=0.02 the bias walks the load back to even; with 0 the skew stays. Both runs
see the same batches from the same init. Numbers are printed (pytest -s) and quoted in
docs/training.md. "By the end" = the counts of the last 10 steps summed (one step's 1024
assignments also carry the sign update's step-to-step oscillation; printed as "per step").
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm.errors import ConfigError
from jaxllm.train import loop
from jaxllm.train.config import RunConfig

E, K, STEPS, RATE, SKEW = 16, 2, 200, 0.02, 0.5
ARGS = dict(
    hidden_size=32,
    num_hidden_layers=1,
    layer_types=["mla"],
    mlp_layer_types=["moe"],
    kda_num_heads=1,
    kda_head_dim=16,
    num_attention_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=0,
    v_head_dim=16,
    intermediate_size=32,
    moe_intermediate_size=8,
    num_experts=E,
    num_experts_per_token=K,
    num_shared_experts=0,
)
LAYER = "layers_0/moe"


def skewed(state):
    """The initial train state with experts 0 and 1 favoured by the router's correction bias."""
    state = jax.tree.map(lambda x: x, state)
    state["params"]["params"]["layers_0"]["moe"]["e_score_correction_bias"] = np.where(
        np.arange(E) < 2, SKEW, 0.0
    ).astype(np.float32)
    return state


def train_from(s, state):
    """(max/mean load per step, counts of the last 10 steps summed, loss per step)."""
    step_fn = loop.compile_step(s)
    data = loop.make_data(s)
    ratios, losses, last10 = [], [], np.zeros(E)
    for i in range(STEPS):
        state, m = step_fn(state, loop.global_batch(s, data.next_rows(), data.rows))
        m = jax.device_get(m)
        assert bool(m["finite"])
        ratios.append(float(m["moe_max_mean_load"]))
        losses.append(float(m["loss"]))
        if i >= STEPS - 10:
            last10 += m[f"expert_load/{LAYER}"]
    return np.array(ratios), last10, np.array(losses)


def test_bias_update_balances_a_skewed_router_and_off_stays_skewed(data_dir):
    config = RunConfig(
        model="kimi_linear",
        model_args=ARGS,
        seq_len=64,
        batch_size=8,
        steps=STEPS,
        lr=1e-2,
        warmup_steps=5,
        data_dir=data_dir,
        num_samples=0,
        progress=False,
        moe_bias_update_rate=RATE,
    )
    on = loop.setup(config)
    off = dataclasses.replace(on, config=dataclasses.replace(config, moe_bias_update_rate=0.0))
    with jax.set_mesh(on.mesh):
        init = skewed(jax.device_get(loop.init_state(on)))
        put = lambda: jax.device_put(init, on.state_shardings)  # noqa: E731 - fresh buffers (donated)
        r_on, load_on, loss_on = train_from(on, put())
        r_off, load_off, loss_off = train_from(off, put())
    end_on, end_off = load_on.max() / load_on.mean(), load_off.max() / load_off.mean()
    tail_on, tail_off = loss_on[-50:].mean(), loss_off[-50:].mean()
    print(
        f"\nmax/mean expert load: step 1 {r_on[0]:.2f}; last 10 steps on {end_on:.3f} "
        f"(per step {r_on[-10:].mean():.3f}), off {end_off:.3f}; training loss (mean of the last 50 "
        f"steps) on {tail_on:.4f}, off {tail_off:.4f}"
    )
    assert r_on[0] > 3 and r_off[0] > 3  # the skew is real
    assert end_on < 1.5, end_on
    assert end_off > 3 and r_off[-10:].min() > 3, (end_off, r_off[-10:])
    # At this size balancing does not buy loss (docs/training.md: equal on the py3.11 corpus, 1.1%
    # worse on py3.12's): the bound is "within 2% of the unbalanced run".
    assert tail_on <= 1.02 * tail_off, (tail_on, tail_off)


def test_bias_update_needs_a_correction_bias(data_dir):
    qwen_moe = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_token=2,
        model_type="qwen3_moe",
        intermediate_size=16,
    )
    config = RunConfig(model="qwen3_moe", model_args=qwen_moe, data_dir=data_dir, moe_bias_update_rate=1e-3)
    with pytest.raises(ConfigError, match="moe_bias_update_rate=0.001 needs MoE layers"):
        loop.setup(config)
    with pytest.raises(ConfigError, match="moe_bias_update_rate"):
        RunConfig(moe_bias_update_rate=-1.0)
