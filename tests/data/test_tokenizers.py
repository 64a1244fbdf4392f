"""Optional tokenizer files: a Hugging Face `tokenizers` JSON trained here, offline."""

import numpy as np
import pytest

from jaxllm.data.pipeline import PackedBatches
from jaxllm.data.tokenizers import make_tokenizer


def test_hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers  # noqa: PLC0415 (optional dependency: tokenizers)

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    corpus = ["def foo(x): return x + 1", "class Bar: pass", "import os, sys"] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    t = make_tokenizer(f"hf:{path}")
    assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
    ids = t.encode("def foo(x): return x")
    assert ids.dtype == np.int32 and ids.max() < t.vocab_size
    assert t.decode(ids).replace(" ", "") == "deffoo(x):returnx"
    b = next(PackedBatches(corpus, t, seq_len=8, batch_size=2, vocab_size=t.vocab_size))
    assert b["inputs"].max() < t.vocab_size and b["loss_mask"].sum() > 0
