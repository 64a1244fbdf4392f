"""Compiled memory of one MLA layer (tools/mla_memory.py at small widths; nothing runs).

- fwd+bwd grows linearly in T: temporaries at 4T within 5x those at T (the dense [B,H,T,T]
  scores made it ~16x);
- a cached append does not grow with the cache's capacity: temporaries at 4x the capacity within
  1.5x (expanding per-head K/V over the capacity made them grow 4x);
- a short cached KDA append needs at most 2x its state + the layer's weights (the chunk op, which
  pads it to a whole chunk, needed 3.4x here, as at the 48B widths).
"""

from __future__ import annotations

import importlib.util
import pathlib
import types

import jax.numpy as jnp

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "mla_memory.py"
WIDTHS = types.SimpleNamespace(
    hidden_size=64,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    q_lora_rank=None,
)
BLOCKS = (("block_q", 64), ("block_k", 64))


def _tool():
    spec = importlib.util.spec_from_file_location("mla_memory", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fwd_bwd_temporaries_linear_in_T():
    tool = _tool()
    layer = tool.mla_layer(WIDTHS, "auto", jnp.float32, attention_impl="blockwise", attention_options=BLOCKS)
    small, large = (tool.train_temp_bytes(layer, 1, T, jnp.float32) for T in (256, 1024))
    assert large <= 5 * small, (small, large)


def test_append_temporaries_flat_in_capacity():
    tool = _tool()
    layer = tool.mla_layer(WIDTHS, "auto", jnp.float32, attention_impl="blockwise", attention_options=BLOCKS)
    small, large = (tool.append_temp_bytes(layer, 4, 8, S, jnp.float32)[0] for S in (1024, 4096))
    assert large <= 1.5 * small, (small, large)


def test_short_kda_append_within_twice_the_state_plus_weights():
    widths = types.SimpleNamespace(hidden_size=128, kda_num_heads=2, kda_head_dim=128, kda_conv_kernel=4)
    temp, state, weights = _tool().kda_append_temp_bytes(widths, 32, 16, jnp.float32)
    assert temp <= 2 * state + weights, (temp, state, weights)
