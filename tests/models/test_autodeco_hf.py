"""AutoDeco's released checkpoint formats on a tiny golden base (qwen2_tiny, transformers layout).

The merged checkpoint is built twice: by hand, the way the official `merge_autodeco.py merge`
lays it out (golden hub tensors under `llm.`, heads under `temp_head.` / `top_p_head.`, the
wrapper's config.json), and with `save_autodeco`. Loading either must give the golden base and T, P
equal to `AutoDecoHeads` applied by hand to that base's hidden states and logits.
"""

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxllm
from jaxllm import cli
from jaxllm.errors import CheckpointError
from jaxllm.models.autodeco_hf import load_autodeco, save_autodeco
from jaxllm.nn.autodeco import AutoDecoHeads, heads_to_official
from jaxllm.ops.sampling import SamplingConfig

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "qwen_family" / "qwen2_tiny"
HEAD_KEYS = {
    f"{h}.mlp.{i}.{k}" for h in ("temp_head", "top_p_head") for i in (0, 2) for k in ("weight", "bias")
}
N_WORDS = 298  # "w0".."w297" are ids 0..297; the two special tokens take 298, 299 (vocab_size 300)


def rms_rel(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(np.sqrt(np.mean((ref - x) ** 2)) / np.sqrt(np.mean(ref**2)))


def official_heads(heads_params):
    # contiguous: safetensors.numpy.save_file writes a transposed view's buffer as is (0.8.0),
    # and heads_to_official's weights are transposed views.
    return {k: np.ascontiguousarray(v) for k, v in heads_to_official(heads_params).items()}


def _leaves(params):
    p = nn.meta.unbox(params)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(p)}


@pytest.fixture(scope="module")
def base():
    """The golden base, its outputs on the golden ids, random heads and their T, P by hand."""
    model, params = jaxllm.load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    ids = jnp.asarray(np.load(GOLDEN / "golden.npz")["input_ids"])
    out = model.apply(params, ids)
    heads = AutoDecoHeads()
    heads_params = heads.init(jax.random.PRNGKey(7), out.hidden, out.logits)
    T, P = heads.apply(heads_params, out.hidden, out.logits)
    assert float(jnp.std(T)) > 1e-2 and float(jnp.std(P)) > 1e-2  # heads that tell positions apart
    return dict(model=model, params=params, ids=ids, out=out, heads_params=heads_params, T=T, P=P)


def autodeco_config(**extra):
    """The official wrapper's config.json for the golden base: its fields + the AutoDeco ones."""
    cfg = json.loads((GOLDEN / "config.json").read_text())
    cfg.update(
        architectures=["AutoDecoModelForCausalLM"],
        model_type="autodeco",
        base_model_type=cfg["model_type"],
        base_model_name_or_path="Qwen/Qwen2-tiny",
        enable_temperature_head=True,
        enable_top_p_head=True,
        use_enhanced_features=True,
        temperature_hidden_size=cfg["hidden_size"],
        top_p_hidden_size=cfg["hidden_size"],
    )
    cfg.update(extra)
    return cfg


def write_merged_by_hand(path, heads_params, **config_extra):
    """A merged checkpoint as `merge_autodeco.py merge` writes it, without jaxllm's writer."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"llm." + k: v for k, v in load_file(GOLDEN / "model.safetensors").items()}
    tensors.update(official_heads(heads_params))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(autodeco_config(**config_extra)))
    return path


def write_heads_only(path, heads_params, filename="autodeco_heads.safetensors", **config_extra):
    path.mkdir(parents=True, exist_ok=True)
    save_file(official_heads(heads_params), path / filename, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(autodeco_config(**config_extra)))
    return path


def heads_T_P(path, **kw):
    model, params, heads, heads_params = load_autodeco(path, **kw)
    out = model.apply(params, jnp.asarray(np.load(GOLDEN / "golden.npz")["input_ids"]))
    return out, heads.apply(heads_params, out.hidden, out.logits)


@pytest.fixture(scope="module")
def merged_dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("autodeco")
    hp = base["heads_params"]
    save_autodeco(root / "saved", base["model"], base["params"], hp, merged=True)
    save_autodeco(root / "sharded", base["model"], base["params"], hp, merged=True, max_shard_bytes=60_000)
    return {
        "by_hand": write_merged_by_hand(root / "by_hand", hp),
        "save_autodeco": root / "saved",
        "save_autodeco_sharded": root / "sharded",
    }


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("which", ["by_hand", "save_autodeco", "save_autodeco_sharded"])
def test_merged_gives_T_P_of_heads_by_hand(base, merged_dirs, which):
    out, (T, P) = heads_T_P(merged_dirs[which])
    assert rms_rel(base["out"].logits, out.logits) == 0.0
    assert rms_rel(base["T"], T) <= 1e-6
    assert rms_rel(base["P"], P) <= 1e-6


def test_load_hf_checkpoint_on_merged_is_the_base(base, merged_dirs):
    # The llm.-prefixed base of a merged folder loads bit for bit; the head keys are not "unexpected".
    model, params = jaxllm.load_hf_checkpoint(merged_dirs["by_hand"])
    assert model.config == base["model"].config
    got, want = _leaves(params), _leaves(base["params"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("filename", ["autodeco_heads.safetensors", "model.safetensors"])
def test_head_only_with_base(base, tmp_path, filename):
    # autodeco_heads.safetensors: the wrapper's own save; model.safetensors: `merge_autodeco.py split`.
    d = write_heads_only(tmp_path / "heads", base["heads_params"], filename=filename)
    _, (T, P) = heads_T_P(d, base=GOLDEN)
    assert rms_rel(base["T"], T) <= 1e-6 and rms_rel(base["P"], P) <= 1e-6


def test_head_only_base_from_local_base_model_name_or_path(base, tmp_path):
    save_autodeco(
        tmp_path / "heads",
        base["model"],
        base["params"],
        base["heads_params"],
        merged=False,
        base_model_name_or_path=str(GOLDEN),
    )
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == [
        "autodeco_heads.safetensors",
        "config.json",
    ]
    _, (T, P) = heads_T_P(tmp_path / "heads")
    assert rms_rel(base["T"], T) <= 1e-6 and rms_rel(base["P"], P) <= 1e-6


def test_save_autodeco_official_layout(base, merged_dirs):
    d = merged_dirs["save_autodeco"]
    tensors = load_file(d / "model.safetensors")
    golden = load_file(GOLDEN / "model.safetensors")
    assert set(tensors) == {"llm." + k for k in golden} | HEAD_KEYS
    for k, v in golden.items():
        np.testing.assert_array_equal(tensors["llm." + k], v, err_msg=k)
    for k, v in heads_to_official(base["heads_params"]).items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "autodeco" and cfg["base_model_type"] == "qwen2"
    assert cfg["architectures"] == ["AutoDecoModelForCausalLM"]
    assert cfg["enable_temperature_head"] is True and cfg["enable_top_p_head"] is True
    assert cfg["use_enhanced_features"] is True
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 300 and cfg["num_hidden_layers"] == 3
    index = json.loads((merged_dirs["save_autodeco_sharded"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"llm." + k for k in golden} | HEAD_KEYS
    assert len(set(index["weight_map"].values())) > 1


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("value", [None, "autodeco"])
def test_bad_base_model_type_named(base, tmp_path, value):
    # "autodeco": an official config re-saved before fix_base_model_type_bug.
    d = write_merged_by_hand(tmp_path / "m", base["heads_params"], base_model_type=value)
    if value is None:
        cfg = json.loads((d / "config.json").read_text())
        del cfg["base_model_type"]
        (d / "config.json").write_text(json.dumps(cfg))
    for load in (load_autodeco, jaxllm.load_hf_checkpoint):
        with pytest.raises(CheckpointError, match="base_model_type"):
            load(d)


def test_wrong_head_width_named(base, tmp_path):
    heads = AutoDecoHeads()
    h32 = heads.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 32)), jnp.zeros((1, 2, 300)))
    d = write_heads_only(tmp_path / "heads", h32)
    with pytest.raises(CheckpointError, match="hidden size 32.*hidden_size 64"):
        load_autodeco(d, base=GOLDEN)


def test_missing_base_named(base, tmp_path):
    d = write_heads_only(tmp_path / "heads", base["heads_params"])  # base_model_name_or_path: a hub id
    with pytest.raises(CheckpointError, match="Qwen/Qwen2-tiny.*not a local folder.*base="):
        load_autodeco(d)
    with pytest.raises(CheckpointError, match="head-only.*load_autodeco"):
        jaxllm.load_hf_checkpoint(d)


def test_wrong_base_type_named(base, tmp_path):
    d = write_heads_only(tmp_path / "heads", base["heads_params"], base_model_type="llama")
    with pytest.raises(CheckpointError, match="'llama' model \\(base_model_type\\).*'qwen2'"):
        load_autodeco(d, base=GOLDEN)


@pytest.mark.parametrize("flag", ["enable_temperature_head", "enable_top_p_head"])
def test_untrained_head_refused(base, tmp_path, flag):
    d = write_merged_by_hand(tmp_path / "m", base["heads_params"], **{flag: False})
    with pytest.raises(CheckpointError, match=f"{flag}=false"):
        load_autodeco(d)


def test_base_given_for_merged_refused(merged_dirs):
    with pytest.raises(CheckpointError, match="merged.*drop base="):
        load_autodeco(merged_dirs["by_hand"], base=GOLDEN)


# ------------------------------------------------------------------------------ jaxllm generate
def write_tokenizer(folder, eos="<|im_end|>"):
    """A WordLevel tokenizer.json: "wI" is id I (0..297), then <|endoftext|>, <|im_end|> (300 in all)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, models, pre_tokenizers  # noqa: PLC0415 (optional dependency: tokenizers)

    tok = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(N_WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_end|>")]
    )
    assert tok.get_vocab_size() == 300
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "bos_token": None}))
    return folder


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def run_generate(capsys, *args):
    rc = cli.main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_autodeco_on_merged(base, merged_dirs, tmp_path, capsys):
    # The printed text is the heads-driven sample of jaxllm.generate with the original heads.

    g = np.load(GOLDEN / "golden.npz")
    d = tmp_path / "merged"
    shutil.copytree(merged_dirs["by_hand"], d)
    write_tokenizer(d)
    prompt = words(g["input_ids"][0]) + " "
    rc, out, err = run_generate(
        capsys, "--checkpoint", d, "--autodeco", "--prompt", prompt, "--max-new-tokens", 8, "--seed", 3
    )
    assert rc == 0, err
    heads = (AutoDecoHeads(), base["heads_params"])
    ids = jaxllm.generate(
        base["model"],
        base["params"],
        base["ids"][:1],
        max_new_tokens=8,
        sampling=SamplingConfig(mode="autodeco"),
        rng=jax.random.PRNGKey(3),
        autodeco=heads,
    )
    new = np.asarray(ids[0, 40:])
    assert new.max() < N_WORDS  # no special token: the text is the ids' words
    assert not np.array_equal(new, g["greedy_ids"][0, 40:48])  # sampling, not greedy
    assert out == prompt + words(new) + "\n"


def test_generate_head_only_with_base_tokenizer(base, tmp_path, capsys):
    # The head-only folder has no tokenizer; the one of --base is used.
    b = tmp_path / "base"
    shutil.copytree(GOLDEN, b)
    write_tokenizer(b)
    d = write_heads_only(tmp_path / "heads", base["heads_params"])
    rc, out, err = run_generate(capsys, "--checkpoint", d, "--base", b, "--autodeco", "--prompt", "w1 w2 ")
    assert rc == 0, err
    assert out.startswith("w1 w2 ")


def test_generate_plain_checkpoint_greedy_is_golden(tmp_path, capsys):
    # Greedy decoding of the golden prompt continues exactly as transformers did.
    g = np.load(GOLDEN / "golden.npz")
    d = tmp_path / "plain"
    shutil.copytree(GOLDEN, d)
    write_tokenizer(d)
    prompt = words(g["input_ids"][0]) + " "
    rc, out, err = run_generate(capsys, "--checkpoint", d, "--prompt", prompt, "--max-new-tokens", 8)
    assert rc == 0, err
    assert out == prompt + words(g["greedy_ids"][0, 40:48]) + "\n"


def test_generate_text_cut_at_stop_id(tmp_path, capsys):
    # With the third greedy token as eos, the printed text ends after the first two.
    g = np.load(GOLDEN / "golden.npz")
    new = g["greedy_ids"][0, 40:48]
    assert new[2] not in new[:2]
    d = tmp_path / "plain"
    shutil.copytree(GOLDEN, d)
    write_tokenizer(d, eos=f"w{new[2]}")
    prompt = words(g["input_ids"][0]) + " "
    rc, out, err = run_generate(capsys, "--checkpoint", d, "--prompt", prompt, "--max-new-tokens", 8)
    assert rc == 0, err
    assert out == prompt + words(new[:2]) + "\n"


def test_generate_prompts_file_prints_one_json_line_per_prompt(tmp_path, capsys):
    # the two golden prompts in one ragged batch (the second cut shorter): each row as it is alone
    g = np.load(GOLDEN / "golden.npz")
    new = g["greedy_ids"][0, 40:48]
    d = tmp_path / "plain"
    shutil.copytree(GOLDEN, d)
    write_tokenizer(d, eos=f"w{new[2]}")
    prompts = [words(g["input_ids"][0]) + " ", words(g["input_ids"][1][:23]) + " "]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rc, out, err = run_generate(capsys, "--checkpoint", d, "--prompts-file", path, "--max-new-tokens", 8)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert rows[0]["completion"] == words(new[:2])  # cut at the stop id
    rc, alone, err = run_generate(capsys, "--checkpoint", d, "--prompt", prompts[1], "--max-new-tokens", 8)
    assert rc == 0, err
    assert alone == prompts[1] + rows[1]["completion"] + "\n"


def test_generate_errors_one_line(tmp_path, capsys, merged_dirs):
    d = tmp_path / "plain"
    shutil.copytree(GOLDEN, d)  # no tokenizer.json
    rc, out, err = run_generate(capsys, "--checkpoint", d, "--prompt", "w1")
    assert rc == 2 and err.count("\n") == 1 and "tokenizer.json" in err and str(d) in err, err
    write_tokenizer(d)
    rc, out, err = run_generate(capsys, "--checkpoint", d, "--autodeco", "--prompt", "w1")
    assert rc == 2 and "model_type 'autodeco'" in err and "'qwen2'" in err, err
