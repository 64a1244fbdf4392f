"""End-to-end training on a tiny LM (1 device): metrics, accumulation, checkpoint errors, NaN stop."""

import json

import jax
import numpy as np
import pytest
import tiny_lm

from jaxllm.train import CheckpointError, ConfigError, NonFiniteLossError, loop, train
from jaxllm.train.step import DTYPES, make_train_step

tiny_lm.register()


def cfg(data_dir, *overrides):
    return tiny_lm.run_config(data_dir, *overrides)


quiet = tiny_lm.quiet


def test_loss_falls_and_metrics_are_logged(tmp_path, data_dir):
    r = train(cfg(data_dir, "steps=25"), str(tmp_path), log=quiet)
    losses = [r.losses[s] for s in sorted(r.losses)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in recs] == list(range(1, 26))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"):
        assert all(np.isfinite(x[key]) for x in recs), key
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        20,
        24,
        25,
    ]  # keep_checkpoints=3
    assert json.load(open(tmp_path / "run_config.json"))["model"] == "tiny_test"


def test_grad_accumulation_matches_one_big_batch(tmp_path, data_dir):
    a = train(cfg(data_dir, "steps=4", "grad_accum=1"), str(tmp_path / "a"), log=quiet)
    b = train(cfg(data_dir, "steps=4", "grad_accum=4"), str(tmp_path / "b"), log=quiet)
    np.testing.assert_allclose(
        [a.losses[s] for s in range(1, 5)], [b.losses[s] for s in range(1, 5)], rtol=1e-5
    )


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (scan, remat, pjit, custom_vjp ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def test_bf16_compute_and_remat_run(tmp_path, data_dir):
    c = cfg(data_dir, "steps=3", "compute_dtype=bfloat16", "remat=dots")
    r = train(c, str(tmp_path), log=quiet)
    assert all(np.isfinite(v) for v in r.losses.values())
    leaf = r.params["params"]["embed"]
    assert leaf.dtype == np.float32  # master weights stay float32
    # The step the loop compiles, traced: every matmul (forward and backward) takes bfloat16 operands,
    # and the blocks are rematerialised with the dots policy.
    s = loop.setup(c)
    step = make_train_step(s.model.apply, s.tx, s.schedule, DTYPES[c.compute_dtype])
    batch = {
        k: jax.ShapeDtypeStruct(loop.batch_shape(s), np.int32)
        for k in ("inputs", "targets", "segment_ids", "loss_mask")
    }
    eqns = list(_eqns(jax.make_jaxpr(step)(loop.abstract_state(s), batch).jaxpr))
    dots = [[str(v.aval.dtype) for v in e.invars] for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) > 20 and all(d == ["bfloat16", "bfloat16"] for d in dots), dots
    remats = [
        e for e in eqns if e.primitive.name in ("remat2", "checkpoint")
    ]  # the name varies by JAX version
    assert len(remats) == 2  # one per block
    assert all(e.params["policy"] is jax.checkpoint_policies.checkpoint_dots for e in remats)


def test_rerun_after_finish_does_nothing_and_longer_run_resumes(tmp_path, data_dir):
    train(cfg(data_dir, "steps=4"), str(tmp_path), log=quiet)
    again = train(cfg(data_dir, "steps=4"), str(tmp_path), log=quiet)
    assert again.start_step == 4 and again.losses == {}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    c = cfg(data_dir, "steps=12", "save_every=1", "lr=1e25", "warmup_steps=0")
    with pytest.raises(NonFiniteLossError) as e:
        train(c, str(tmp_path), log=quiet)
    msg = str(e.value)
    assert f"at step {e.value.step}" in msg and f"last good checkpoint: step {e.value.last_good}" in msg
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == e.value.last_good == e.value.step - 1


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, data_dir):
    train(cfg(data_dir, "steps=4"), str(tmp_path), log=quiet)
    with pytest.raises(CheckpointError, match=r"does not match this run's model:(.|\n)*model_args"):
        train(cfg(data_dir, "steps=8", "model_args.dim=48"), str(tmp_path), log=quiet)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, data_dir):
    train(cfg(data_dir, "steps=4"), str(tmp_path), log=quiet)
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* is corrupted"):
        train(cfg(data_dir, "steps=8"), str(tmp_path), log=quiet)


def test_model_vocab_smaller_than_tokenizer_is_rejected(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"vocab_size=100 is smaller than the tokenizer's vocabulary \(259"):
        train(cfg(data_dir, "model_args.vocab_size=100"), str(tmp_path), log=quiet)
