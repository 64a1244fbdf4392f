"""Run config: loading, overrides and error messages that name the field."""

import dataclasses
import json
import pathlib

import pytest

from jaxllm.models.registry import config_from_run_args
from jaxllm.train.config import ConfigError, RunConfig, apply_overrides, load_config


def test_defaults_and_overrides():
    c = apply_overrides(
        RunConfig(),
        ["lr=1e-3", "steps=7", "progress=false", "model_args.hidden_size=64", "dataset=files:/tmp/x.txt"],
    )
    assert (c.lr, c.steps, c.progress, c.model_args["hidden_size"], c.dataset) == (
        1e-3,
        7,
        False,
        64,
        "files:/tmp/x.txt",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 2.0  # frozen


def test_unknown_field_names_it_and_the_allowed_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field 'learning_rate'.*allowed fields: .*\blr\b"):
        apply_overrides(RunConfig(), ["learning_rate=1"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ConfigError, match=r"'stepz' \(did you mean steps"):
        load_config(str(path))


def test_bad_values_name_field_and_allowed_values():
    with pytest.raises(ConfigError, match=r"remat='some'.*allowed values: none, full, dots"):
        RunConfig(remat="some")
    with pytest.raises(ConfigError, match=r"compute_dtype='fp8'.*float32, bfloat16"):
        apply_overrides(RunConfig(), ["compute_dtype=fp8"])
    with pytest.raises(ConfigError, match=r"steps='ten' is not an integer"):
        apply_overrides(RunConfig(), ["steps=ten"])
    with pytest.raises(ConfigError, match=r"progress='maybe' is not a boolean; allowed: true, false"):
        apply_overrides(RunConfig(), ["progress=maybe"])
    with pytest.raises(ConfigError, match="batch_size=6 must be divisible by grad_accum=4"):
        RunConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="mesh_tensor=0"):
        RunConfig(mesh_tensor=0)
    with pytest.raises(
        ConfigError, match="loss_chunk=48 must be 0 .off. or a positive divisor of seq_len=128"
    ):
        apply_overrides(RunConfig(), ["loss_chunk=48"])
    assert apply_overrides(RunConfig(), ["loss_chunk=32"]).loss_chunk == 32
    with pytest.raises(ConfigError, match="must look like field=value"):
        apply_overrides(RunConfig(), ["lr"])
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_config("/nonexistent/run.json")


def test_kimi_model_args_are_validated():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['hiden_size'\]"):
        config_from_run_args(
            "kimi_linear", {"hiden_size": 3}, vocab_size=320, compute_dtype="float32", param_dtype="float32"
        )
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_run_args(
            "kimi_linear",
            {
                "hidden_size": -1,
                "num_hidden_layers": 1,
                "kda_num_heads": 1,
                "kda_head_dim": 8,
                "intermediate_size": 8,
            },
            vocab_size=320,
            compute_dtype="float32",
            param_dtype="float32",
        )


def test_default_config_file_loads():
    path = pathlib.Path(__file__).parents[2] / "configs" / "train_default.json"
    c = load_config(str(path))
    cfg = config_from_run_args(
        c.model, c.model_args, vocab_size=320, compute_dtype="float32", param_dtype="float32"
    )
    assert cfg.layer_types.count("kda") == 3 * cfg.layer_types.count("mla")
    assert "moe" in cfg.mlp_layer_types


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"model_type 'kimi' is not a known architecture; known: .*kimi_linear.*qwen3_moe"
    ):
        config_from_run_args("kimi", {}, vocab_size=320, compute_dtype="float32", param_dtype="float32")
