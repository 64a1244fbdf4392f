"""`jaxllm train` starting from a Hugging Face checkpoint (`init_from=DIR`) and fine-tuning it."""

import pathlib

import jax
import numpy as np
import pytest
import tiny_lm

import jaxllm
from jaxllm.train import ConfigError, loop, train

QWEN3 = pathlib.Path(__file__).parents[1] / "golden" / "qwen_family" / "qwen3_tiny"


def cfg(data_dir, *overrides):
    return tiny_lm.run_config(data_dir, "model=qwen3", f"init_from={QWEN3}", "seq_len=16", *overrides)


def test_initial_state_is_the_checkpoint(data_dir):
    s = loop.setup(cfg(data_dir))
    state = loop.init_state(s)
    _, ref = jaxllm.load_hf_checkpoint(QWEN3, dtype="float32")
    got, want = jax.tree.leaves_with_path(state["params"]), jax.tree.leaves_with_path(ref)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert int(state["step"]) == 0


def test_fine_tunes_and_resumes(tmp_path, data_dir):
    r = train(cfg(data_dir, "steps=6", "save_every=3", "lr=3e-3"), str(tmp_path), log=tiny_lm.quiet)
    losses = [r.losses[k] for k in sorted(r.losses)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    # a longer run resumes from this run's checkpoint, not from init_from again
    r2 = train(cfg(data_dir, "steps=8", "save_every=3", "lr=3e-3"), str(tmp_path), log=tiny_lm.quiet)
    assert sorted(r2.losses) == [7, 8]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model=llama"], "is a 'qwen3' model, not 'llama'"),
        ([f"init_from={QWEN3.parent}"], "no config.json"),
        (["model_args.config_file=x.json"], "keep one"),
    ],
)
def test_bad_init_from_is_named(data_dir, overrides, match):
    with pytest.raises(ConfigError, match=match):
        loop.setup(cfg(data_dir, *overrides))
