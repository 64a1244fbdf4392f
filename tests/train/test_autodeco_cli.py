"""`jaxllm autodeco-train` on a trained workdir, then `jaxllm generate --autodeco / --fixed-mean`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxllm import cli, generation, run_dir
from jaxllm.data.pipeline import PackedBatches
from jaxllm.data.sources import load_source
from jaxllm.nn.autodeco import AutoDecoHeads, heads_to_official
from jaxllm.run_dir import load_trained
from jaxllm.train import autodeco_run as ad
from jaxllm.train import checkpoint as ckpt_lib
from jaxllm.train import loop
from jaxllm.train.autodeco_eval import evaluate, line_passes
from jaxllm.train.config import load_config

OFFICIAL_KEYS = {
    f"{h}.mlp.{i}.{k}" for h in ("temp_head", "top_p_head") for i in (0, 2) for k in ("weight", "bias")
}
H = 32


def _corpus(path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "import os", "def f(x):", "return x", "class A:"]
    docs = ["\n".join(" ".join(rng.choice(words, 6)) for _ in range(6)) for _ in range(40)]
    path.write_text("\n\n\n".join(docs))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Kimi Linear base (KDA + MLA layer, dense FFNs) trained for a few steps, then heads on it."""
    root = tmp_path_factory.mktemp("ad")
    _corpus(root / "corpus.txt")
    w = root / "run"
    args = [
        "train",
        "--workdir",
        str(w),
        "--steps",
        "3",
        f"dataset=files:{root / 'corpus.txt'}",
        f"data_dir={root / 'tfds'}",
        "seq_len=32",
        "batch_size=4",
        "num_samples=0",
        "progress=false",
        f"model_args.hidden_size={H}",
        "model_args.num_hidden_layers=2",
        'model_args.layer_types=["kda","mla"]',
        'model_args.mlp_layer_types=["dense","dense"]',
        "model_args.kda_num_heads=2",
        "model_args.kda_head_dim=16",
        "model_args.num_attention_heads=2",
        "model_args.kv_lora_rank=16",
        "model_args.qk_nope_head_dim=16",
        "model_args.qk_rope_head_dim=0",
        "model_args.v_head_dim=16",
        "model_args.intermediate_size=64",
    ]
    assert cli.main(args) == 0
    assert (
        cli.main(
            ["autodeco-train", "--workdir", str(w), "--steps", "12", "--lr", "3e-3", "--eval-batches", "2"]
        )
        == 0
    )
    return w


def test_autodeco_train_saves_official_heads_that_learned(workdir):
    d = workdir / "autodeco"
    sd = load_file(str(d / "heads.safetensors"))
    assert set(sd) == OFFICIAL_KEYS
    assert sd["temp_head.mlp.0.weight"].shape == (256, H)  # torch (out, in)
    assert sd["top_p_head.mlp.0.weight"].shape == (256, H + 5)  # [h, T, 4 stats]
    info = json.loads((d / "heads.json").read_text())
    recs = [json.loads(l) for l in open(d / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) and r["n_valid"] > 0 for r in recs)
    assert info["base_step"] == 3 and info["steps"] == 12
    assert 0 < info["mean_temperature"] < 2 and 0 < info["mean_top_p"] < 1 and info["eval_positions"] > 0
    # Same eval batches, same easy-token draws: the trained heads beat the fresh ones.
    assert info["eval_loss_trained"] < info["eval_loss_init"] - 1e-3, info
    # The saved file is what load_heads returns, and it is not the initialisation.

    module, variables, info2 = run_dir.load_heads(str(workdir), hidden_size=H)
    assert info2 == info
    back = heads_to_official(variables)
    for k in OFFICIAL_KEYS:
        np.testing.assert_array_equal(back[k], sd[k])
    fresh = heads_to_official(
        AutoDecoHeads().init(jax.random.PRNGKey(0), jnp.zeros((1, 1, H)), jnp.zeros((1, 1, 320)))
    )
    assert max(float(np.abs(fresh[k] - sd[k]).max()) for k in OFFICIAL_KEYS) > 1e-3


def test_mean_values_match_the_heads_on_the_eval_data(workdir):
    """heads.json's mean T/P equals the heads applied to the frozen base on the batches that follow training."""
    model, params, tok = load_trained(str(workdir))
    module, variables, info = run_dir.load_heads(str(workdir))
    c = load_config(str(workdir / "run_config.json"))
    data = PackedBatches(
        load_source(c.dataset, "train", data_dir=c.data_dir, text_key=c.text_key),
        tok,
        seq_len=c.seq_len,
        batch_size=c.batch_size,
        seed=c.seed,
        vocab_size=model.config.vocab_size,
    )
    for _ in range(info["steps"]):
        next(data)
    t_sum = p_sum = n = 0.0
    fwd = jax.jit(lambda p, x, s: model.apply(p, x, segment_ids=s))
    for _ in range(info["eval_batches"]):
        b = {k: jnp.asarray(v[0]) for k, v in next(data).items()}
        out = fwd(params, b["inputs"], b["segment_ids"])
        t, p = module.apply(variables, out.hidden, out.logits)
        valid = np.asarray(ad.shifted_labels(b["targets"], b["loss_mask"])[:, 1:] != -100)
        t_sum += float(np.asarray(t)[:, :-1, 0][valid].sum())
        p_sum += float(np.asarray(p)[:, :-1, 0][valid].sum())
        n += valid.sum()
    assert abs(t_sum / n - info["mean_temperature"]) < 1e-4
    assert abs(p_sum / n - info["mean_top_p"]) < 1e-4


def test_shifted_labels_follow_the_official_shift():
    targets = jnp.array([[5, 6, 7, 8]])
    mask = jnp.array([[1, 0, 1, 1]])
    np.testing.assert_array_equal(ad.shifted_labels(targets, mask), [[-100, 5, -100, 7]])


def test_generate_with_heads_and_fixed_mean(workdir, capsys):
    base = [
        "generate",
        "--workdir",
        str(workdir),
        "--prompt",
        "alpha ",
        "--max-new-tokens",
        "6",
        "--seed",
        "1",
    ]
    for flag in ("--autodeco", "--fixed-mean"):
        assert cli.main(base + [flag]) == 0
        assert capsys.readouterr().out.startswith("alpha ")
    # User temperature 0 in autodeco mode is greedy: equal to plain greedy decoding.
    assert cli.main(base) == 0
    greedy = capsys.readouterr().out
    assert cli.main(base + ["--autodeco", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy


def test_fixed_mean_uses_the_saved_means(workdir):
    info = json.loads((workdir / "autodeco" / "heads.json").read_text())
    cfg = generation.sampling_config("fixed_mean", info, temperature=0.5)
    assert cfg.mode == "fixed_mean" and cfg.temperature == 0.5
    assert cfg.mean_temperature == info["mean_temperature"] and cfg.mean_top_p == info["mean_top_p"]


def test_autodeco_errors_are_one_line(tmp_path, workdir, capsys):
    assert cli.main(["autodeco-train", "--workdir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a training workdir" in err
    # A trained workdir without heads.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("run_config.json",):
        (bare / name).write_bytes((workdir / name).read_bytes())
    os.symlink(workdir / "checkpoints", bare / "checkpoints")
    assert cli.main(["generate", "--workdir", str(bare), "--autodeco"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no AutoDeco heads" in err and "autodeco-train" in err
    assert cli.main(["generate", "--workdir", str(workdir), "--autodeco", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert cli.main(["autodeco-train", "--workdir", str(workdir), "--steps", "0"]) == 2
    assert "steps=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--workdir", str(workdir), "--autodeco", "--fixed-mean"])


def test_pass_at_1_task_checker():
    assert line_passes("import ", "os, sys\nx", "import")
    assert line_passes("from ", "os.path import join\n", "import")
    assert not line_passes("import ", "foo_bar_baz\n", "import")  # not a stdlib module
    assert not line_passes("import ", "os", "import")  # no newline within the budget
    assert not line_passes("import ", "os = 1\n", "import")  # not an import
    assert line_passes("    def ", "__init__(self, a=1):\n", "def")
    assert not line_passes("def ", "f(x)\n", "def")  # no colon
    assert line_passes("def f(x):\n    return ", "x + 1\n", "stmt")
    assert not line_passes("    if ", "x = = 1:\n", "stmt")


def test_load_trained_restores_the_params_alone(workdir, monkeypatch):
    """Inference reads the params of the checkpoint and nothing else: no optimizer (AdamW's two
    moments would triple the bytes), no train setup. Equal to the params the full restore gives."""
    config = load_config(run_dir.config_file(str(workdir)))
    s = loop.setup(config)
    ck = ckpt_lib.Checkpointer(run_dir.checkpoints(str(workdir)), save_every=1, keep=2, async_save=False)
    abstract = loop.abstract_state(s)
    full, _ = ck.restore(
        ck.latest_step(), abstract, ckpt_lib.make_meta(config, abstract["params"]), data=False
    )
    ck.close()

    def refuse(*a, **k):
        raise AssertionError("load_trained built a training setup or an optimizer")

    monkeypatch.setattr(loop, "setup", refuse)
    monkeypatch.setattr(loop, "make_optimizer", refuse)
    before = {id(a) for a in jax.live_arrays()}
    model, params, _ = run_dir.load_trained(str(workdir))
    new_bytes = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    assert new_bytes == param_bytes, (new_bytes, param_bytes)  # the restore made nothing else
    opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(full["opt_state"]))
    assert opt_bytes >= 2 * param_bytes  # what a full restore would have added
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_autodeco_eval_runs_the_heads_modes(workdir):
    """The pass@1 evaluation decodes through the engine (jaxllm.generation.sample_ids)."""
    modes = ["autodeco", "fixed-mean"]  # the two that need the heads (each mode compiles once)
    rows = evaluate(str(workdir), samples=2, max_new_tokens=4, modes=modes, log=lambda *a: None)
    assert [r["mode"] for r in rows] == modes
    assert all(0.0 <= r["pass_at_1"] <= 1.0 for r in rows)
