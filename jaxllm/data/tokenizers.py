"""Tokenizers: byte-level (default, no files), Hugging Face ``tokenizers`` and sentencepiece.

Spec strings (as in the run config's ``tokenizer`` field):
  ``byte``                 256 byte ids shifted by 3 specials: pad=0, bos=1, eos=2.
  ``hf:<tokenizer.json>``  a Hugging Face ``tokenizers`` file (needs ``pip install tokenizers``).
  ``spm:<model file>``     a sentencepiece model (needs ``pip install sentencepiece``).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; id = byte + 3. Lossless for any text, vocab 259."""

    offset = 3
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 256 + offset

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)] - self.offset
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps ``tokenizers.Tokenizer.from_file``."""

    def __init__(self, path: str):
        try:
            import tokenizers  # noqa: PLC0415 (optional dependency: tokenizers)
        except ImportError as e:
            raise ImportError(
                "tokenizer 'hf:...' needs the `tokenizers` package: pip install tokenizers"
            ) from e
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def find(*names):
            for n in names:
                if n in vocab:
                    return vocab[n]
            return None

        self.pad_id = find("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")
        self.bos_id = find("<s>", "[BOS]", "<|bos|>", "<|begin_of_text|>", "<|endoftext|>")
        self.eos_id = find("</s>", "[EOS]", "<|eos|>", "<|end_of_text|>", "<|endoftext|>")
        missing = [
            n for n, v in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)) if v is None
        ]
        if missing:
            raise ValueError(
                f"tokenizer file {path} has no {'/'.join(missing)} token "
                "(looked for <pad>/<s>/</s>, [PAD]/[BOS]/[EOS], <|endoftext|>)"
            )

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


class SentencePieceTokenizer:
    """Wraps ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, path: str):
        try:
            import sentencepiece  # noqa: PLC0415 (optional dependency: sentencepiece)
        except ImportError as e:
            raise ImportError(
                "tokenizer 'spm:...' needs the `sentencepiece` package: pip install sentencepiece"
            ) from e
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path} must define bos and eos ids")

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def make_tokenizer(spec: str) -> Tokenizer:
    """Builds a tokenizer from its spec string (see module docstring)."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, path = spec.partition(":")
    if kind in ("hf", "spm") and path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist (tokenizer={spec!r})")
        return HFTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)
    raise ValueError(
        f"tokenizer={spec!r} is not valid; allowed: 'byte', 'hf:<tokenizer.json>', 'spm:<model file>'"
    )
