"""The agent on a Hugging Face checkpoint: a real (byte-level BPE) tokenizer folder with Qwen's chat
tokens, the Qwen3 chat template, a tiny random qwen3_moe (Tongyi-DeepResearch's architecture).

The tokenizer is built here (no downloads): a byte-level BPE with 31 merges, trained on the texts
the episodes render, then Qwen's chat tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``
special; the tags not), 296 ids in all, below the tiny model's vocab_size 300.
"""

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import cli
from jaxllm.agent import episodes, react_jnp, synth, train
from jaxllm.agent import protocol as P
from jaxllm.agent import rollout as R
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig
from jaxllm.data import chat_template as ct
from jaxllm.data.hf_tokenizer import load_hf_tokenizer
from jaxllm.data.tokenizers import ByteTokenizer

tokenizers = pytest.importorskip("tokenizers")

QWEN3_MOE = pathlib.Path(__file__).parents[1] / "golden" / "qwen_family" / "qwen3_moe_tiny"
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "data"))
from qwen_tokenizer_folder import qwen_bpe, write_folder  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from rollout_testing import assert_same as _assert_same  # noqa: E402

CFG = R.RolloutConfig(max_turns=2, turn_tokens=80, token_budget=1600, chunk=32)
WIKI = SimulatedWiki(WikiConfig(seed=0))
PERSON = WIKI.world.by_kind("person")[0]
SPECS = synth.wiki_executor(WIKI).tool_specs()
SEARCH = "<think>\nI should search.\n</think>\n\n" + P.render_tool_call("search", {"query": [PERSON.name]})
ANSWER = f"<think>\nFound it.\n</think>\n\n<answer>\n{PERSON.name}\n</answer>"
# Closed by the model with <|im_end|>; the text after it must never be written.
CLOSED = f"<think>\nNo tool needed.\n</think>\n\nI give up.{ct.IM_END}never written"


def build_folder(path, *, tags_special=False):
    """A Qwen-style tokenizer folder (tokenizer.json, tokenizer_config.json, generation_config.json)."""
    # 256 byte symbols + 31 merges + 9 chat tokens = 296 ids < the model's 300.
    corpus = [ct.tongyi_system_prompt(SPECS, date=synth.SYNTH_DATE), SEARCH, ANSWER]
    tok = qwen_bpe(corpus, 256 + 31, tags_special=tags_special)
    eos = [tok.token_to_id(ct.IM_END), tok.token_to_id("<|endoftext|>")]
    return write_folder(path, tok, generation={"eos_token_id": eos})


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    t = load_hf_tokenizer(tok_dir)
    assert t.vocab_size == 296 and t.stop_ids == (t.added_tokens[ct.IM_END], t.added_tokens["<|endoftext|>"])
    return t


@pytest.fixture(scope="module")
def model_params():
    model, params = jaxllm.load_hf_checkpoint(QWEN3_MOE, dtype=jnp.float32)
    assert model.config.model_type == "qwen3_moe" and model.config.vocab_size == 300
    return model, params


# The template lists a tool (search; the executor serves both): its system turn is not chatml's.
FMT = P.Qwen3Format(tools=SPECS[:1])


@pytest.fixture(scope="module")
def episode(tok, model_params):
    """Row 0: a scripted search, then a scripted answer. Row 1: a scripted turn the model closes
    with <|im_end|> (no action: an error observation follows), then a free greedy turn."""
    model, params = model_params
    qs = ["Which person does the wiki list first?", "Who founded it?"]
    return R.segmented_rollout(
        model,
        params,
        tok,
        synth.wiki_executor(WIKI),
        qs,
        config=CFG,
        system_prompt="Answer with tools.",
        forced_turns=[[SEARCH, ANSWER], [CLOSED]],
        chat_format=FMT,
    )


def _template_ids(tok, messages):
    return tok.encode(ct.render_chat(messages, tools=SPECS[:1], add_generation_prompt=True)).tolist()


def test_prompt_tokens_are_the_qwen3_template(tok, episode):
    for r in range(2):
        n = int((episode.kind[r] == R.KIND_PROMPT).sum())
        assert episode.tokens[r, :n].tolist() == _template_ids(tok, episode.messages[r][:2])
        assert (episode.kind[r, :n] == R.KIND_PROMPT).all()
    assert episode.messages[0][0] == {"role": "system", "content": "Answer with tools."}


def test_scripted_search_answers(tok, episode):
    assert episode.status[0] == R.ANSWERED and episode.answers[0] == PERSON.name
    assert episode.turns[0] == 2 and not episode.forced_answer[0]
    obs = episode.messages[0][3]
    assert obs["role"] == "user" and P.is_tool_response(obs["content"]) and PERSON.name in obs["content"]
    # The row through the observation is what the Qwen3 template renders for the messages so far:
    # the search turn's tokens, its <|im_end|> and the observation's user turn, framed by the template.
    n = _template_ids(tok, episode.messages[0][:4])
    assert episode.tokens[0, : len(n)].tolist() == n
    assert episode.kind[0, len(n)] == R.KIND_FORCED  # the answer turn starts right there


def test_turn_ends_on_im_end_by_id(tok, episode):
    im_end = tok.added_tokens[ct.IM_END]
    assert episode.messages[1][2] == {
        "role": "assistant",
        "content": "<think>\nNo tool needed.\n</think>\n\nI give up.",
    }
    start = int((episode.kind[1] == R.KIND_PROMPT).sum())
    turn = episode.tokens[1, start : start + int((episode.kind[1] == R.KIND_FORCED).sum())].tolist()
    assert turn == tok.encode(CLOSED.split(ct.IM_END)[0]).tolist() + [im_end]  # cut right after the id
    assert episode.kind[1, start + len(turn)] == R.KIND_TOOL
    # The model closed its turn: the framing opens the user turn without a second <|im_end|>, and
    # the row is again exactly the template's rendering of the messages.
    assert P.parse_assistant(episode.messages[1][2]["content"]).message.startswith("no action")
    n = _template_ids(tok, episode.messages[1][:4])
    assert episode.tokens[1, : len(n)].tolist() == n


def test_free_turn_is_the_models_greedy_choice(tok, model_params, episode):
    model, params = model_params
    assert episode.status[1] == R.MAX_TURNS and episode.turns[1] == 2
    row = episode.tokens[1, : episode.lengths[1]]
    logits = np.asarray(model.apply(params, jnp.asarray(row[None])).logits[0])  # no cache
    t = np.flatnonzero(episode.model_mask[1])
    assert len(t) > 0 and not episode.model_mask[0].any()
    np.testing.assert_array_equal(row[t], logits[t - 1].argmax(-1))
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[t - 1]), -1))
    np.testing.assert_allclose(
        episode.logprobs[1, t], logp[np.arange(len(t)), episode.tokens[1, t]], atol=1e-4
    )
    # The random model samples <|endoftext|> (an eos id of generation_config.json) after 57 tokens,
    # under the cap of 80: the free turn ends on that id too.
    assert row[t[-1]] == tok.added_tokens["<|endoftext|>"] and len(t) < CFG.turn_tokens


def test_stop_ids_and_decoding(tok, tmp_path):
    eot = tok.added_tokens["<|endoftext|>"]
    enc = lambda s: tok.encode(s).tolist()  # noqa: E731
    assert R.cut_turn_ids(tok, enc(f"abc{ct.IM_END}def")) == ("abc", ct.IM_END)
    assert R.cut_turn_ids(tok, enc("abc<|endoftext|>def")) == ("abc", "<|endoftext|>")
    assert R.cut_turn_ids(tok, enc(f"<answer>x</answer>y{ct.IM_END}")) == ("<answer>x</answer>", "</answer>")
    assert R.cut_turn_ids(tok, enc("no stop")) == ("no stop", None)
    # ids past the tokenizer's 296 (the model has 300) decode to nothing, as with the byte tokenizer
    assert R.decode_turn(tok, enc("ab") + [298, eot] + enc("c")) == "abc"
    # A folder that flags the protocol's tags special still shows them to the parser.
    flagged = load_hf_tokenizer(build_folder(tmp_path / "flagged", tags_special=True))
    assert flagged.added_tokens["<tool_call>"] in flagged.special_ids
    text, stop = R.cut_turn_ids(flagged, flagged.encode(SEARCH + ct.IM_END))
    assert (text, stop) == (SEARCH, "</tool_call>")
    assert P.parse_assistant(text) == P.ToolCall("search", {"query": [PERSON.name]}, think="I should search.")


def test_observation_and_forced_answer_use_the_format():
    """The host judge frames turns with the rollout's format (here one that differs from chatml:
    no thinking, so every generation prompt pre-fills an empty think block)."""
    fmt, tok_b, ex = P.Qwen3Format(enable_thinking=False), ByteTokenizer(), synth.wiki_executor(WIKI)
    obs = ex.execute(P.parse_assistant(SEARCH)).text
    ep = episodes.Episodes(1, CFG, ex, tok_b, [P.initial_messages("q", "s")], limit=10_000, fmt=fmt)
    assert tok_b.decode(ep.judge(0, tok_b.encode(SEARCH), 0)) == fmt.observation(obs)
    ep = episodes.Episodes(
        1, CFG, ex, tok_b, [P.initial_messages("q", "s")], limit=200, fmt=fmt
    )  # no room left
    assert tok_b.decode(ep.judge(0, tok_b.encode(SEARCH), 0)) == fmt.forced_answer() and ep.forced_answer[0]
    assert fmt.forced_answer() != P.CHATML.forced_answer()


def test_scan_loop_equals_the_segmented_loop(tok, model_params, episode):
    """The compiled loop on the Hugging Face tokenizer and the Qwen3 format: stops found on each
    token's bytes (a stop id, <|endoftext|>, ends row 1's free turn; <|im_end|> the scripted one),
    every turn judged on the host, messages rebuilt through the format's framing."""
    model, params = model_params
    scan = R.scan_rollout(
        model,
        params,
        tok,
        synth.wiki_executor(WIKI),
        ["Which person does the wiki list first?", "Who founded it?"],
        config=CFG,
        system_prompt="Answer with tools.",
        forced_turns=[[SEARCH, ANSWER], [CLOSED]],
        chat_format=FMT,
    )
    _assert_same(episode, scan)
    assert scan.host_callbacks == 2  # env "auto" is "host" here: one callback per turn
    with pytest.raises(ValueError, match="env='jnp' needs .* the ByteTokenizer and the chatml format"):
        R.scan_rollout(
            model, params, tok, synth.wiki_executor(WIKI), ["q"], config=CFG, system_prompt="s", env="jnp"
        )


def crossing_tokenizer(path):
    """A byte-level BPE without the pre-tokenizer's regex split, so merges cross punctuation and
    stop strings end inside tokens (as Qwen's ``>\\n`` after ``</answer>`` does)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 (optional dependency)

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"x</answer>\n{ct.IM_END}y</tool_call>z<tool_response>w " * 4, ANSWER, SEARCH]
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 40, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", ct.IM_START, ct.IM_END)]
    )
    return load_hf_tokenizer(
        write_folder(path, bpe, generation={"eos_token_id": [bpe.token_to_id(ct.IM_END)]})
    )


@pytest.mark.parametrize("which", ["qwen_bpe", "crossing"])
def test_stop_hit_finds_the_stops_of_cut_turn_ids(tok, tmp_path, which):
    """Token by token, react_jnp.stop_hit ends a turn exactly where cut_turn_ids first finds a stop
    (string or id), on random mixes of the BPE's tokens: multi-byte tokens, stop strings split
    across tokens or ending inside one, special ids (dropped from the text, so a stop may straddle
    one), ids past the tokenizer's vocabulary, protocol tags as single ids."""
    tok = tok if which == "qwen_bpe" else crossing_tokenizer(tmp_path / "crossing")
    vocab = 300  # the model's, past both tokenizers' vocabularies
    tt = react_jnp.turn_text(tok, vocab)
    assert int(tt.n_V.max()) > 1 and int(tt.n_V[tok.added_tokens[ct.IM_END]]) == 0
    texts = ("</answer>", "</tool_call>", "<tool_response>", "x</answer>\ny", "abc", "\n", "</ans")
    pieces = [tok.encode(s).tolist() for s in texts]
    pieces += [[int(i)] for s in texts for i in tok.encode(s)]
    pieces += [[tok.added_tokens[ct.IM_START]], [298]]
    if which == "crossing":  # the case the split BPE cannot make: a stop ending mid-token
        inside = [i for i in range(tok.vocab_size) if ">" in tok.decode([i])[:-1]]  # ">\n", "e>w"
        assert inside, "no token continues past a stop's closing >"
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):
        ids = []
        while len(ids) < 24:
            ids += pieces[rng.integers(len(pieces))] if rng.random() < 0.5 else [int(rng.integers(vocab))]
        rows.append(ids[:24])
    ids_BN = jnp.asarray(rows, jnp.int32)
    step = jax.jit(react_jnp.stop_hit)
    tail = jnp.full((len(rows), tt.stops_SK.shape[1]), -1, jnp.int32)
    live = jnp.ones((len(rows),), bool)
    got = np.full((len(rows),), -1)
    for t in range(ids_BN.shape[1]):
        tail, hit = step(tt, tail, ids_BN[:, t], live)
        hit = np.asarray(hit)
        got[hit & (got < 0)] = t
        live = live & ~jnp.asarray(hit)
    want = [
        next((t for t in range(len(r)) if R.cut_turn_ids(tok, r[: t + 1])[1] is not None), -1) for r in rows
    ]
    assert (np.asarray(want) >= 0).sum() >= 32  # most rows stop somewhere
    np.testing.assert_array_equal(got, want)


def test_scan_loop_refuses_tokens_that_are_not_bytes(tmp_path, model_params):
    """A sentencepiece-style tokenizer (Metaspace, like Llama-2's) has no byte table: refused with
    a pointer to the segmented loop, which runs any tokenizer."""
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 (optional dependency)

    sp = tokenizers.Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(
        ["search the wiki for answers"], trainers.BpeTrainer(vocab_size=60, show_progress=False)
    )
    sp.add_special_tokens(["<|endoftext|>", ct.IM_START, ct.IM_END])
    metaspace = load_hf_tokenizer(write_folder(tmp_path / "sp", sp))
    model, params = model_params
    with pytest.raises(ValueError, match="not a byte-level BPE token.*use the segmented loop"):
        R.scan_rollout(model, params, metaspace, synth.wiki_executor(WIKI), ["q"], config=CFG)


def test_chat_setup_follows_the_tokenizer(tok):
    fmt, system = train.chat_setup(tok, SPECS)
    assert fmt == P.Qwen3Format() and system == ct.tongyi_system_prompt(SPECS, date=synth.SYNTH_DATE)
    fmt, system = train.chat_setup(ByteTokenizer(), SPECS)
    assert fmt == P.CHATML and system == P.build_system_prompt(SPECS, date=synth.SYNTH_DATE)
    # The Qwen3 format frames turns as the template does; without thinking it pre-fills an empty block.
    assert P.Qwen3Format().observation("x") == P.CHATML.observation("x")
    assert (
        P.Qwen3Format(enable_thinking=False)
        .forced_answer(True)
        .endswith("assistant\n<think>\n\n</think>\n\n")
    )


@pytest.fixture
def hf_dir(tmp_path, tok_dir):
    """The golden checkpoint (config.json, model.safetensors) with the test tokenizer beside it."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(QWEN3_MOE / f, d / f)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize("loop", [[], ["--rollout", "segmented"]], ids=["scan", "segmented"])
def test_agent_run_checkpoint_end_to_end(hf_dir, tmp_path, capsys, loop):
    out = tmp_path / "preds.jsonl"
    argv = ["agent", "run", "--checkpoint", str(hf_dir), "--question", "Who founded it?", "--out", str(out)]
    argv += ["--max-turns", "1", "--turn-tokens", "16"] + loop  # the default token budget, 1536
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 1 and sum(summary["status"].values()) == 1
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["turns"] == 1 and rec["status"] in ("answered", "max_turns")
    system = ct.tongyi_system_prompt(SPECS, date=synth.SYNTH_DATE)
    assert rec["trajectory"][:2] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "Who founded it?"},
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "NOCONFIG"], "has no config.json"),
        (["--checkpoint", "NOTOK"], "has no tokenizer.json"),
        (["--checkpoint", "/nonexistent/dir"], "no such directory"),
        (["--checkpoint", "CKPT", "--step", "3"], "--step applies to --workdir"),
        (["--checkpoint", "CKPT", "--token-budget", "100"], "token_budget"),
        (["--workdir", "W", "--max-turns", "2"], "--max-turns applies to --checkpoint"),
    ],
)
def test_agent_run_checkpoint_errors(hf_dir, tmp_path, capsys, argv, message):
    noconfig, notok = tmp_path / "noconfig", tmp_path / "notok"
    noconfig.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", noconfig)
    notok.mkdir()
    shutil.copy(hf_dir / "config.json", notok)
    subs = {"NOCONFIG": str(noconfig), "NOTOK": str(notok), "CKPT": str(hf_dir), "W": str(tmp_path / "w")}
    argv = ["agent", "run", "--question", "q"] + [subs.get(a, a) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: agent run: ") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
