"""A Qwen-style tokenizer folder, built here from a few lines of text (no downloads).

The folder mirrors Qwen3's: a byte-level BPE with the chat tokens appended after its vocabulary,
``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` flagged special and the tag tokens
(``<tool_call>``, ``<think>``, ...) added but not special, as Qwen flags them;
tokenizer_config.json with ``added_tokens_decoder``, ``eos_token`` and a chat template;
generation_config.json with two eos ids.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

from jaxllm.data.chat_template import IM_END, IM_START, QWEN_SPECIAL_TOKENS, render_chat
from jaxllm.data.hf_tokenizer import PretrainedTokenizer, load_hf_tokenizer
from jaxllm.errors import CheckpointError, TokenIdError

tokenizers = pytest.importorskip("tokenizers")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from qwen_tokenizer_folder import TAGS, qwen_bpe, write_folder  # noqa: E402

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    'search the web: {"name": "search", "arguments": {"query": ["Paris"]}}',
    "Let me think about the question step by step before I answer.",
    "Große Städte, 東京 and São Paulo are cities too.",
] * 4


def build_tokenizer(tags=TAGS):
    return qwen_bpe(CORPUS, 320, tags=tags)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", IM_END)}
    gen = {"eos_token_id": [ids[IM_END], ids["<|endoftext|>"]]}
    return write_folder(tmp_path_factory.mktemp("qwen_tok"), tok, generation=gen)


@pytest.fixture(scope="module")
def tok(folder):
    return load_hf_tokenizer(folder)


def test_interface_matches_jaxllm_tokenizers(tok):
    base = tok._tok.get_vocab_size(with_added_tokens=False)
    assert isinstance(tok, PretrainedTokenizer)
    assert tok.vocab_size == base + len(QWEN_SPECIAL_TOKENS)
    assert tok.eos_id == tok.token_id(IM_END) and tok.pad_id == tok.token_id("<|endoftext|>")
    assert tok.bos_id is None  # Qwen names no BOS token; nothing must be prepended
    ids = tok.encode("Paris")
    assert ids.dtype == np.int32 and ids.ndim == 1 and 0 < ids.max() < tok.vocab_size
    np.testing.assert_array_equal(tok.encode(b"Paris"), ids)


def test_each_chat_token_is_one_id_wherever_it_occurs(tok):
    ids = [tok.added_tokens[t] for t in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(QWEN_SPECIAL_TOKENS)
    assert min(ids) >= tok._tok.get_vocab_size(with_added_tokens=False)  # appended, as Qwen's are
    for t, i in zip(QWEN_SPECIAL_TOKENS, ids):
        assert tok.encode(t).tolist() == [i], t
        # Glued to text on both sides (no spaces): still its single id, the text around intact.
        glued = tok.encode(f"Paris{t}France").tolist()
        assert glued.count(i) == 1, (t, glued)
        k = glued.index(i)
        assert tok.decode(glued[:k]) == "Paris" and tok.decode(glued[k + 1 :]) == "France"


def test_rendered_chat_markers_are_ids(tok):
    msgs = [
        {"role": "user", "content": "capital of France?"},
        {
            "role": "assistant",
            "content": "<think>search</think>",
            "tool_calls": [{"name": "search", "arguments": {}}],
        },
        {"role": "tool", "content": "Paris"},
    ]
    ids = tok.encode(render_chat(msgs, add_generation_prompt=True)).tolist()
    for t, n in ((IM_START, 4), (IM_END, 3), ("<tool_call>", 1), ("<tool_response>", 1), ("<think>", 1)):
        assert ids.count(tok.added_tokens[t]) == n, t
    assert ids[0] == tok.added_tokens[IM_START]


def test_round_trip_and_special_skipping(tok):
    text = (
        "<|im_start|>assistant\n<think>\nGroße 東京?\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>\n"
    )
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    # Skipping drops only tokens flagged special; Qwen's tags are not, so the agent still sees them.
    assert tok.decode(ids) == text.replace(IM_START, "").replace(IM_END, "")
    plain = "What is the capital of France? Große 東京, São Paulo."
    assert tok.decode(tok.encode(plain)) == plain


def test_stop_ids_come_from_the_files(tmp_path, tok):
    im_end, eot = tok.added_tokens[IM_END], tok.added_tokens["<|endoftext|>"]
    assert tok.stop_ids == (im_end, eot)
    built = build_tokenizer()
    # A base model: eos_token <|endoftext|>, no generation_config; <|im_end|> still stops a turn.
    base = load_hf_tokenizer(
        write_folder(tmp_path / "base", built, config_extra={"eos_token": "<|endoftext|>"})
    )
    assert base.eos_id == eot and base.stop_ids == (eot, im_end)
    # An extra eos id named only in generation_config.json is a stop id too.
    extra = built.token_to_id("<think>")
    other = load_hf_tokenizer(write_folder(tmp_path / "gen", built, generation={"eos_token_id": extra}))
    assert other.stop_ids == (im_end, extra)
    # No eos_token: the first generation_config id is eos.
    no_eos = write_folder(
        tmp_path / "noeos", built, config_extra={"eos_token": None}, generation={"eos_token_id": [eot]}
    )
    assert load_hf_tokenizer(no_eos).eos_id == eot


def test_config_token_missing_from_tokenizer_json_is_added_at_its_id(tmp_path, tok):
    # tokenizer.json without </think>; tokenizer_config.json names it at the next id.
    built = build_tokenizer(tags=TAGS[:-1])
    path = write_folder(tmp_path / "cfg", built)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"][str(built.get_vocab_size())] = {"content": "</think>", "special": False}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_hf_tokenizer(path)
    assert loaded.encode("a</think>b").tolist().count(built.get_vocab_size()) == 1
    # The same entry at a wrong id: the files disagree, which is an error, not a shifted vocab.
    cfg["added_tokens_decoder"] = {str(built.get_vocab_size() + 5): {"content": "</think>"}}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'</think>' id"):
        load_hf_tokenizer(path)


def test_chat_template_is_read(tmp_path, tok, folder):
    assert tok.chat_template == "{{ messages }}"
    assert (
        load_hf_tokenizer(folder / "tokenizer.json").chat_template == "{{ messages }}"
    )  # the file path works too
    path = write_folder(tmp_path / "jinja", build_tokenizer(), config_extra={"chat_template": None})
    (path / "chat_template.jinja").write_text("{{ x }}")
    assert load_hf_tokenizer(path).chat_template == "{{ x }}"


def test_clear_errors(tmp_path, tok, folder, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(TokenIdError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([1, tok.vocab_size])
    bad = write_folder(tmp_path / "bad", build_tokenizer(), config_extra={"eos_token": "<|eot_id|>"})
    with pytest.raises(CheckpointError, match="eos_token '<|eot_id|>' is not in"):
        load_hf_tokenizer(bad)
    (tmp_path / "bad" / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        load_hf_tokenizer(bad)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_hf_tokenizer(folder)
