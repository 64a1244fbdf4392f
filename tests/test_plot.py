"""`jaxllm.plot`: metric curves read from metrics.jsonl (resumed runs, validation) and the PNG."""

import json

from jaxllm import plot


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_metric_curve_keeps_the_last_record_per_step_and_reads_val_loss(tmp_path):
    # A run killed after step 3 and resumed from its step-2 checkpoint rewrites step 3.
    _write(
        tmp_path / "metrics.jsonl",
        [
            {"step": 1, "loss": 5.0},
            {"step": 2, "loss": 4.0, "val_loss": 4.5},
            {"step": 3, "loss": 3.9},
            {"step": 3, "loss": 3.5},
            {"step": 4, "loss": 3.0, "val_loss": 3.25},
        ],
    )
    steps, losses = plot.loss_curve(str(tmp_path))
    assert steps.tolist() == [1, 2, 3, 4] and losses.tolist() == [5.0, 4.0, 3.5, 3.0]
    steps, val = plot.metric_curve(str(tmp_path), "val_loss")
    assert steps.tolist() == [2, 4] and val.tolist() == [4.5, 3.25]


def test_plot_with_validation_losses_writes_a_png(tmp_path):
    _write(
        tmp_path / "metrics.jsonl",
        [{"step": s, "loss": 6.0 - s, **({"val_loss": 6.2 - s} if s % 2 == 0 else {})} for s in range(1, 7)],
    )
    out = plot.plot_loss([str(tmp_path)], str(tmp_path / "out" / "loss.png"), smooth=2)
    assert open(out, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
