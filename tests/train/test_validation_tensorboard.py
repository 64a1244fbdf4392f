"""Validation loss (held-out split, logged as val_loss) and TensorBoard event files, on the tiny test LM."""

import glob
import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_lm

from jaxllm.data.sources import DatasetError, load_source
from jaxllm.train import ConfigError, loop, train

tiny_lm.register()


def cfg(data_dir, *overrides):
    return tiny_lm.run_config(data_dir, *overrides, steps=6, save_every=100)


quiet = tiny_lm.quiet


def read_scalars(logdir):
    """{tag: [(step, value), ...]} from TensorBoard event files, read as raw TFRecords (no TensorFlow)."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415 (optional dependency: tensorboardX)

    out = {}
    files = sorted(glob.glob(f"{logdir}/events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    for path in files:
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            pos += 12  # length + its masked crc32c
            event = event_pb2.Event.FromString(data[pos : pos + length])
            pos += length + 4  # record + its masked crc32c
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    w = tmp_path_factory.mktemp("run")
    r = train(cfg(data_dir, "eval_every=4", "eval_batches=2", "tensorboard=true"), str(w), log=quiet)
    return w, r


def test_val_loss_logged_every_eval_every_and_at_the_end(run):
    w, r = run
    recs = [json.loads(l) for l in open(w / "metrics.jsonl")]
    assert [x["step"] for x in recs] == list(range(1, 7))
    with_val = {x["step"]: x["val_loss"] for x in recs if "val_loss" in x}
    assert sorted(with_val) == [4, 6]
    assert with_val == r.val_losses
    assert all(np.isfinite(v) and 0 < v < 10 for v in with_val.values())
    assert with_val[6] < with_val[4] + 0.5  # it trained; val loss is in the same range as the train loss


def test_val_loss_is_the_token_mean_over_the_first_eval_batches_of_the_held_out_split(run, data_dir):
    _, r = run
    c = cfg(data_dir, "eval_every=4", "eval_batches=2")
    s = loop.setup(c)
    data = loop.make_data(s, "validation")
    total, count = 0.0, 0.0
    for _ in range(2):
        b = next(data)
        for i in range(b["inputs"].shape[0]):
            logits = s.model.apply(
                r.params, jnp.asarray(b["inputs"][i]), segment_ids=jnp.asarray(b["segment_ids"][i])
            )
            logp = jax.nn.log_softmax(np.asarray(logits.logits, np.float64), -1)
            ce = -np.take_along_axis(np.asarray(logp), b["targets"][i][..., None], -1)[..., 0]
            total += float((ce * b["loss_mask"][i]).sum())
            count += float(b["loss_mask"][i].sum())
    np.testing.assert_allclose(r.val_losses[6], total / count, rtol=1e-5)


def test_validation_split_is_disjoint_from_training_data(data_dir):
    train_src = load_source("stdlib", "train", data_dir=data_dir)
    val_src = load_source("stdlib", "validation", data_dir=data_dir)
    val = {val_src[i] for i in range(len(val_src))}
    assert len(val) >= 20 and len(train_src) > 20 * len(val)
    assert not val & {train_src[i] for i in range(len(train_src))}


def test_tensorboard_scalars_equal_metrics_jsonl(run):
    w, _ = run
    recs = [json.loads(l) for l in open(w / "metrics.jsonl")]
    scalars = read_scalars(w / "tensorboard")
    for key, tag in (
        ("loss", "train/loss"),
        ("grad_norm", "train/grad_norm"),
        ("lr", "train/lr"),
        ("tokens_per_s", "perf/tokens_per_s"),
        ("mfu", "perf/mfu"),
        ("val_loss", "val/loss"),
    ):
        want = [(x["step"], x[key]) for x in recs if key in x]
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose(
            [v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=tag
        )  # float32 in events
    assert [s for s, _ in scalars["val/loss"]] == [4, 6]


def test_tensorboard_without_tensorboardx_is_a_clear_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"tensorboard=true needs the tensorboardX package.*jaxllm\[tb\]"):
        train(cfg(data_dir, "tensorboard=true"), str(tmp_path), log=quiet)


def test_missing_eval_split_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(DatasetError, match=r"eval_split='nosuch'"):
        train(cfg(data_dir, "eval_every=2", "eval_split=nosuch"), str(tmp_path), log=quiet)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval_batches=0", "eval_batches=0 must be a positive integer"),
        ("eval_split=train", "eval_split='train' is not allowed"),
        ("eval_every=-1", "eval_every=-1 must be >= 0"),
        ("tensorboard=maybe", "tensorboard='maybe' is not a boolean"),
    ],
)
def test_bad_eval_and_tensorboard_fields_are_rejected(data_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        cfg(data_dir, override)
