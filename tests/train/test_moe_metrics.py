"""MoE load metrics and aux losses of a real `jaxllm train` run: in metrics.jsonl, in TensorBoard and
drawn by `jaxllm plot`."""

import json

import numpy as np
import pytest
from test_validation_tensorboard import read_scalars

from jaxllm.plot import drop_curves, load_curves, plot_loss
from jaxllm.train import loop
from jaxllm.train.config import RunConfig

ARGS = dict(
    hidden_size=16,
    num_hidden_layers=2,
    layer_types=["mla", "mla"],
    mlp_layer_types=["moe", "moe"],
    kda_num_heads=1,
    kda_head_dim=8,
    num_attention_heads=1,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=0,
    v_head_dim=8,
    intermediate_size=16,
    moe_intermediate_size=8,
    num_experts=8,
    num_experts_per_token=2,
    seq_balance_loss_alpha=0.01,
    router_z_loss_coef=0.001,
)
LAYERS = ("layers_0/moe", "layers_1/moe")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    w = tmp_path_factory.mktemp("moe_run")
    config = RunConfig(
        model="kimi_linear",
        model_args=ARGS,
        seq_len=32,
        batch_size=4,
        steps=3,
        data_dir=data_dir,
        num_samples=0,
        progress=False,
        tensorboard=True,
        moe_bias_update_rate=1e-3,
    )
    loop.train(config, str(w), log=lambda msg: None)
    return w, [json.loads(line) for line in open(w / "metrics.jsonl")]


def test_metrics_jsonl_has_per_layer_load_and_named_aux_losses(run):
    _, recs = run
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        ratios = [r[f"moe/{layer}/max_mean_load"] for layer in LAYERS]
        overs = [r[f"moe/{layer}/overflow"] for layer in LAYERS]
        assert all(1.0 <= x <= 8 / 2 for x in ratios)  # at most E/k: every token on the same k experts
        assert all(0.0 <= x < 1.0 for x in overs)
        np.testing.assert_allclose(r["moe_max_mean_load"], max(ratios), rtol=1e-6)
        np.testing.assert_allclose(r["moe_overflow"], np.mean(overs), rtol=1e-6)
        assert r["aux/moe_balance"] > 0 and r["aux/router_z"] > 0
        np.testing.assert_allclose(r["aux_loss"], r["aux/moe_balance"] + r["aux/router_z"], rtol=1e-5)
        assert not any(k.startswith(("expert_load", "dropped_count")) for k in r)  # raw counts stay out
        # one device: the dispatch is dropless, and the drop metrics say so (a capacity factor
        # under expert parallelism: tests/nn/test_moe_parallel.py::test_train_step_records_...)
        assert [r[f"moe/{layer}/dropped"] for layer in LAYERS] == [0.0, 0.0] and r["moe_dropped"] == 0.0


def test_tensorboard_and_plot_carry_the_load(run, tmp_path):
    w, recs = run
    scalars = read_scalars(w / "tensorboard")
    keys = ("moe/max_mean_load", "moe/dropped", *(f"moe/{layer}/max_mean_load" for layer in LAYERS))
    for key in (*keys, f"moe/{LAYERS[0]}/dropped", "aux/router_z"):
        assert key in scalars, sorted(scalars)
    got = [v for _, v in scalars[f"moe/{LAYERS[1]}/max_mean_load"]]
    np.testing.assert_allclose(got, [r[f"moe/{LAYERS[1]}/max_mean_load"] for r in recs], rtol=1e-6)
    curves = load_curves(str(w))
    assert sorted(curves) == list(LAYERS)
    np.testing.assert_allclose(curves[LAYERS[0]][1], [r[f"moe/{LAYERS[0]}/max_mean_load"] for r in recs])
    out = plot_loss([str(w)], str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").stat().st_size > 1000 and out.endswith("loss.png")


def test_plot_draws_the_dropped_fraction(tmp_path):
    """A run that dropped assignments (an expert-parallel capacity factor) gets its per-layer
    dropped fraction as curves; a dropless run (all 0) gets no such panel."""
    recs = [
        {"step": i, "loss": 3.0 - 0.1 * i, "moe/l0/max_mean_load": 1.5, "moe/l0/dropped": 0.1 * i}
        for i in (1, 2, 3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    steps, dropped = drop_curves(str(tmp_path))["l0"]
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_allclose(dropped, [0.1, 0.2, 0.3])
    plot_loss([str(tmp_path)], str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").stat().st_size > 1000
