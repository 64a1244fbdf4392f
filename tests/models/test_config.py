import json
import pathlib

import pytest

from jaxllm.models.base import count_params
from jaxllm.models.config import ConfigError, KimiLinearConfig
from jaxllm.models.kimi_linear import KimiLinear

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def _hf(golden_dir, case):
    return json.loads((golden_dir / case / "config.json").read_text())


def test_transformers_layout(golden_dir):
    c = KimiLinearConfig.from_hf_config(_hf(golden_dir, "kimi_linear_tiny"))
    assert c.layer_types == ("kda",) * 3 + ("mla",) + ("kda",) * 3 + ("mla",)
    assert c.mlp_layer_types == ("dense",) + ("moe",) * 7
    assert (c.kda_num_heads, c.kda_head_dim, c.kda_conv_kernel) == (4, 16, 4)
    assert (c.num_experts, c.num_experts_per_token, c.routed_scaling_factor) == (8, 2, 2.446)


def test_released_layout_is_one_indexed(golden_dir):
    c = KimiLinearConfig.from_hf_config(_hf(golden_dir, "kimi_linear_tiny_hubcfg"))
    assert c.layer_types == ("kda", "kda", "kda", "mla")
    assert c.mlp_layer_types == ("dense", "moe", "moe", "moe")
    assert (c.kda_num_heads, c.kda_head_dim) == (6, 8)  # linear_attn_config, not top-level head_dim


@pytest.mark.parametrize("layout", ["released", "transformers"])
def test_to_hf_round_trip(layout):
    c = KimiLinearConfig.from_file(CONFIGS / "kimi_linear_48b_a3b.json")
    assert KimiLinearConfig.from_hf_config(c.to_hf_config(layout)) == c


def test_48b_layer_pattern():
    c = KimiLinearConfig.from_file(CONFIGS / "kimi_linear_48b_a3b.json")
    assert c.mla_layers == (3, 7, 11, 15, 19, 23, 26)
    assert len(c.kda_layers) == 20
    assert c.mlp_layer_types[0] == "dense" and set(c.mlp_layer_types[1:]) == {"moe"}


def test_48b_param_counts():
    counts = count_params(KimiLinear(KimiLinearConfig.from_file(CONFIGS / "kimi_linear_48b_a3b.json")))
    assert counts["total"] == 49_122_681_728
    assert abs(counts["active"] / 1e9 - 3.48) < 0.005
    assert abs(counts["active_without_embeddings"] / 1e9 - 2.73) < 0.005


def test_small_config_is_about_100m():
    counts = count_params(KimiLinear(KimiLinearConfig.from_file(CONFIGS / "small.json")))
    assert 80e6 < counts["total"] < 130e6


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("layer_types", ("kda", "attn", "kda", "mla"), "layer_types"),
        ("mlp_layer_types", ("dense", "moe"), "mlp_layer_types"),
        ("kda_impl", "fast", "kda_impl"),
        ("dtype", "int8", "dtype"),
        ("num_experts_per_token", 99, "num_experts_per_token"),
        ("hidden_size", 0, "hidden_size"),
        ("moe_dispatch", "magic", "moe_dispatch"),
    ],
)
def test_bad_field_is_named(field, value, needle):
    c = KimiLinearConfig.from_file(CONFIGS / "tiny.json")
    with pytest.raises(ConfigError, match=needle):
        c.replace(**{field: value})


def test_bad_layer_lists_named(golden_dir):
    cfg = _hf(golden_dir, "kimi_linear_tiny_hubcfg")
    cfg["linear_attn_config"] = dict(cfg["linear_attn_config"], kda_layers=[0, 1, 2])
    with pytest.raises(ConfigError, match="kda_layers"):
        KimiLinearConfig.from_hf_config(cfg)
    cfg["linear_attn_config"] = dict(cfg["linear_attn_config"], kda_layers=[1, 2])
    with pytest.raises(ConfigError, match=r"\[3\]"):
        KimiLinearConfig.from_hf_config(cfg)
