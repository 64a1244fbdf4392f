"""The tiny random Kimi Linear model the rollout tests run (test_rollout.py and the 4-device
rollout_mesh_script.py): one KDA and one MLA layer, the recurrent KDA op (it compiles fastest)."""

import jax
import jax.numpy as jnp

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
