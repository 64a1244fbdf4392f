"""What the rollout tests share (test_rollout.py, test_agent_hf.py, the 4-device
rollout_mesh_script.py): the tiny random Kimi Linear model they run (one KDA and one MLA layer, the
recurrent KDA op: it compiles fastest) and the comparison of two rollouts."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import KimiLinear, KimiLinearConfig


def tiny_model(vocab_size: int):
    """(model, params) of the tiny model over ``vocab_size`` ids (params from PRNGKey(1))."""
    cfg = KimiLinearConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        layer_types=("kda", "mla"),
        mlp_layer_types=("dense", "dense"),
        kda_num_heads=2,
        kda_head_dim=8,
        num_attention_heads=2,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        intermediate_size=32,
        kda_impl="recurrent",
    )
    model = KimiLinear(cfg)
    return model, jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))


def assert_same(a, b, what=""):
    """Two RolloutResults hold the same rows: tokens, kinds, lengths, statuses, turns, errors,
    forced answers, log-probs (1e-5), answers and messages."""
    for f in ("tokens", "kind", "lengths", "status", "turns", "tool_errors", "forced_answer"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{what} {f}")
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, err_msg=what)
    assert a.answers == b.answers and a.messages == b.messages, what
