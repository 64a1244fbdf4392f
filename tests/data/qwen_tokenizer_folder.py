"""Qwen-style Hugging Face tokenizer folders built at test time (no downloads): a byte-level BPE
trained on a few lines, Qwen's chat tokens added after its vocabulary (as in Qwen's files)."""

import json

from jaxllm.data.chat_template import IM_END, IM_START, QWEN_SPECIAL_TOKENS

SPECIAL = ("<|endoftext|>", IM_START, IM_END)  # special=True in Qwen's files
TAGS = tuple(t for t in QWEN_SPECIAL_TOKENS if t not in SPECIAL)  # added, special=False


def qwen_bpe(corpus, vocab_size, *, tags=TAGS, tags_special=False):
    import tokenizers  # noqa: PLC0415 (optional dependency: tokenizers)
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 (optional dependency: tokenizers)

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=tags_special, normalized=False) for t in tags])
    return tok


def write_folder(path, tok, *, config_extra=None, generation=None):
    """tokenizer.json, tokenizer_config.json (added_tokens_decoder, eos <|im_end|>, a chat_template)
    and, when given, generation_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    decoder = {
        str(i): {
            "content": t.content,
            "special": t.special,
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
        }
        for i, t in tok.get_added_tokens_decoder().items()
    }
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "chat_template": "{{ messages }}",  # present, as in Qwen's folders; rendered by jaxllm in Python
        **(config_extra or {}),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path
