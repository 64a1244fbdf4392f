"""A Hugging Face tokenizer folder (Qwen3, Tongyi DeepResearch, ...) through the `tokenizers` package.

A folder as the hub ships it::

    tokenizer.json           the tokenizer itself (required)
    tokenizer_config.json    optional: added_tokens_decoder, eos/pad/bos tokens, chat_template,
                             split_special_tokens
    chat_template.jinja      optional: the chat template, where newer transformers saves it
    generation_config.json   optional: eos_token_id (an int or a list) that ends generation

``load_hf_tokenizer(folder)`` gives a ``PretrainedTokenizer`` with the interface of the other jaxllm
tokenizers (``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode``, ``decode``) plus what
chat models need: every added token (``<|im_start|>``, ``<|im_end|>``, ``<tool_call>``,
``<think>``, ...) encodes to its single id wherever it occurs in the text, ``stop_ids`` lists the
ids that end an assistant turn (the eos ids the files name, and ``<|im_end|>``), and
``chat_template`` holds the folder's Jinja template (``jaxllm.data.chat_template`` renders the
Qwen3 one in Python).

``tokenizers`` is optional: it is imported when a folder is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from jaxllm.data.chat_template import IM_END
from jaxllm.errors import CheckpointError, TokenIdError

__all__ = ["PretrainedTokenizer", "load_hf_tokenizer", "read_token_name", "eos_ids_from_generation_config"]


def _import_tokenizers():
    try:
        import tokenizers  # noqa: PLC0415 (optional dependency: tokenizers)
    except ImportError as e:
        raise ImportError(
            "loading a Hugging Face tokenizer folder needs the `tokenizers` package: pip install tokenizers"
        ) from e
    return tokenizers


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None where the (optional) file does not exist."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_token_name(config: dict, key: str) -> str | None:
    """A token named in tokenizer_config.json: a string, an ``AddedToken`` dict or null."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(
        f"tokenizer_config.json: {key} must be a string, an object with 'content', or null; got {value!r:.80}"
    )


def eos_ids_from_generation_config(gen: dict | None) -> list[int]:
    """``eos_token_id`` of generation_config.json as a list (it may be one int or a list)."""
    if not gen or gen.get("eos_token_id") is None:
        return []
    eos = gen["eos_token_id"]
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(
            f"generation_config.json: eos_token_id must be a non-negative int or a list of them, got {eos!r}"
        )
    return list(ids)


def _read_chat_template(folder: str, config: dict) -> str | None:
    """The folder's chat template: tokenizer_config's ``chat_template`` (a string, or a list of
    named templates of which "default" is used) or else ``chat_template.jinja``."""
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if "default" not in named:
            raise CheckpointError(
                f"tokenizer_config.json: chat_template is a list without a 'default' entry (names: {sorted(named)})"
            )
        tpl = named["default"]
    if tpl is not None and not isinstance(tpl, str):
        raise CheckpointError(
            f"tokenizer_config.json: chat_template must be a string, got {type(tpl).__name__}"
        )
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if tpl is None and os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            tpl = f.read()
    return tpl


def _register_config_tokens(tok, config: dict) -> None:
    """Make every token of ``added_tokens_decoder`` an added token of ``tok`` at its stated id.

    Usually tokenizer.json lists them already; one it lacks (or holds only as a plain vocab entry,
    which the pre-tokenizer would split) is added here, and any id disagreement is an error rather
    than a silently shifted vocabulary.
    """
    tokenizers = _import_tokenizers()
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError("tokenizer_config.json: added_tokens_decoder must be an object {id: token}")
    have = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    for key, entry in decoder.items():
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise CheckpointError(
                f"tokenizer_config.json: added_tokens_decoder[{key!r}] must map an id to an object with 'content'"
            )
        want, content = int(key), entry["content"]
        if content not in have:
            added = tokenizers.AddedToken(
                content,
                special=bool(entry.get("special", False)),
                normalized=bool(entry.get("normalized", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                single_word=bool(entry.get("single_word", False)),
            )
            (tok.add_special_tokens if added.special else tok.add_tokens)([added])
            have[content] = tok.token_to_id(content)
        if have[content] != want:
            raise CheckpointError(
                f"tokenizer_config.json gives {content!r} id {want} but tokenizer.json gives it id "
                f"{have[content]}; the two files are from different tokenizers"
            )


class PretrainedTokenizer:
    """A loaded tokenizer folder (see the module docstring); build it with ``load_hf_tokenizer``.

    Attributes: ``vocab_size`` (added tokens included), ``pad_id``, ``bos_id`` (None where the
    folder names no BOS token: Qwen prepends none, so callers must not either), ``eos_id``,
    ``stop_ids``, ``added_tokens`` ({content: id}), ``special_ids`` (ids that
    ``decode(skip_special_tokens=True)`` drops), ``chat_template`` (str or None), ``path``.
    """

    def __init__(self, tok, *, path: str, config: dict, generation_config: dict | None, chat_template):
        self._tok = tok
        self.path = path
        self.chat_template = chat_template
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        decoder = tok.get_added_tokens_decoder()
        self.added_tokens = {t.content: i for i, t in sorted(decoder.items())}
        self.special_ids = frozenset(i for i, t in decoder.items() if t.special)

        gen_eos = eos_ids_from_generation_config(generation_config)
        eos_name = read_token_name(config, "eos_token")
        if eos_name is not None:
            self.eos_id = self.token_id(eos_name, what="eos_token")
        elif gen_eos:
            self.eos_id = gen_eos[0]
        else:
            raise CheckpointError(
                f"{path}: no eos token: tokenizer_config.json names no eos_token and "
                "generation_config.json no eos_token_id"
            )
        pad_name = read_token_name(config, "pad_token")
        # No pad token: pad with eos (padding is masked out, any valid id will do).
        self.pad_id = self.token_id(pad_name, what="pad_token") if pad_name is not None else self.eos_id
        bos_name = read_token_name(config, "bos_token")
        self.bos_id = self.token_id(bos_name, what="bos_token") if bos_name is not None else None
        # The chatml turn end: chat models end an assistant turn with it, while a base model's
        # eos_token is <|endoftext|>, so it is always a stop id when the vocabulary has it.
        im_end = [self.added_tokens[IM_END]] if IM_END in self.added_tokens else []
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *gen_eos, *im_end]))
        for i in self.stop_ids:
            self._check_ids([i], where="generation_config.json eos_token_id")

    # -- lookups --------------------------------------------------------------------------

    def token_id(self, content: str, *, what: str = "token") -> int:
        """The id of a token string (an added token or a plain vocab entry)."""
        i = self._tok.token_to_id(content)
        if i is None:
            raise CheckpointError(f"{self.path}: {what} {content!r} is not in the tokenizer's vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        self._check_ids([i], where="id_to_token")
        return self._tok.id_to_token(int(i))

    # -- encode / decode ------------------------------------------------------------------

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids of ``text`` (int32). Added tokens in the text become their single ids; no
        BOS/EOS is added (chat templates write the markers they need as text)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str or bytes, got {type(text).__name__}")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. ``skip_special_tokens`` (the jaxllm default, as the other tokenizers)
        drops tokens flagged special (``<|im_end|>``, ``<|endoftext|>``); Qwen flags ``<think>``
        and ``<tool_call>`` as not special, so they are kept either way."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        self._check_ids(flat, where="decode")
        return self._tok.decode(flat, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Sequence[int], *, where: str) -> None:
        # `tokenizers` silently drops unknown ids in decode; a wrong id must not vanish.
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise TokenIdError(
                f"{where}: token id {bad[0]} is outside the tokenizer's vocabulary [0, {self.vocab_size})"
                + (f" ({len(bad)} such ids)" if len(bad) > 1 else "")
            )

    def __repr__(self) -> str:
        return (
            f"PretrainedTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"stop_ids={self.stop_ids})"
        )


def _check_single_ids(tok, split_special: bool) -> None:
    """Every added token must encode, alone and between other text, to exactly its own id."""
    for i, t in tok.get_added_tokens_decoder().items():
        if split_special and t.special:
            continue
        content = t.content
        # A single_word token only matches as a whole word, so it is checked alone.
        for text in (content,) if t.single_word else (content, f"a{content}b"):
            ids = tok.encode(text, add_special_tokens=False).ids
            if i not in ids or (text == content and ids != [i]):
                raise CheckpointError(
                    f"added token {content!r} (id {i}) does not encode to its single id (got {ids}); "
                    "check its lstrip/rstrip/normalized flags in tokenizer.json"
                )


def load_hf_tokenizer(path: str | os.PathLike) -> PretrainedTokenizer:
    """Load a Hugging Face tokenizer folder (or a ``tokenizer.json`` beside its config files)."""
    path = os.fspath(path)
    folder, tok_file = (
        (os.path.dirname(path) or ".", path)
        if path.endswith(".json")
        else (path, os.path.join(path, "tokenizer.json"))
    )
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(
            f"no tokenizer.json at {tok_file!r}; give a Hugging Face model folder or its tokenizer.json"
        )
    tokenizers = _import_tokenizers()
    try:
        tok = tokenizers.Tokenizer.from_file(tok_file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{tok_file} cannot be read by `tokenizers`: {e}") from None
    config = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    gen = _read_json(os.path.join(folder, "generation_config.json"))
    _register_config_tokens(tok, config)
    # transformers' split_special_tokens: text spelling a special token is encoded as plain text.
    # Qwen sets it false, so chat markers in the rendered template become their single ids.
    split = config.get("split_special_tokens", False)
    if not isinstance(split, bool):
        raise CheckpointError(
            f"tokenizer_config.json: split_special_tokens must be true or false, got {split!r}"
        )
    tok.encode_special_tokens = split
    _check_single_ids(tok, split)
    return PretrainedTokenizer(
        tok,
        path=folder,
        config=config,
        generation_config=gen,
        chat_template=_read_chat_template(folder, config),
    )
