"""Text in, text out: prompts through a tokenizer and the inference engine (`jaxllm.decode`).

    texts = generate_texts(model, params, tokenizer, ["def f(", "Once"], 64)         # greedy
    texts = generate_texts(..., sampling=SamplingConfig(temperature=0.8), seed=1)
    generate_texts(..., ["Once"], 64, stream_to=lambda piece: print(piece, end=""))  # as it comes

Every prompt of a call decodes in one ragged batch; a row ends at the tokenizer's stop ids (a
Hugging Face tokenizer's `stop_ids`: eos, `<|im_end|>`; else its eos) or after `max_new_tokens`.
The returned text is the prompt plus the continuation, without the stop token. Nothing here builds
a training setup; `jaxllm generate` and the training loop's end-of-run samples both use it.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np

from jaxllm import decode
from jaxllm.data.hf_tokenizer import load_hf_tokenizer
from jaxllm.errors import ConfigError
from jaxllm.models import autodeco_hf, hf, registry
from jaxllm.ops.sampling import SamplingConfig


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
    """[T] int32: BOS (where the tokenizer names one; Qwen names none) + the prompt's ids."""
    bos = [] if getattr(tokenizer, "bos_id", None) is None else [tokenizer.bos_id]
    ids = np.concatenate([np.asarray(bos, np.int32), np.asarray(tokenizer.encode(prompt), np.int32)])
    if ids.size == 0:
        raise ValueError("the prompt encodes to no tokens and the tokenizer has no BOS token; give a prompt")
    return ids.astype(np.int32)


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a continuation: the tokenizer's `stop_ids`, else its eos id, else none."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        ids = [] if eos is None else [eos]
    return sorted(int(i) for i in ids)


def _sampling_args(sampling, heads, seed: int) -> dict:
    if sampling is None or sampling.mode == "greedy":
        return {}
    kwargs = {"sampling": sampling, "rng": jax.random.PRNGKey(seed)}
    if sampling.mode == "autodeco":
        if heads is None:
            raise ValueError("autodeco sampling needs the AutoDeco heads: heads=(module, variables)")
        kwargs["autodeco"] = tuple(heads)
    return kwargs


def generate_texts(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    sampling=None,
    *,
    heads=None,
    seed: int = 0,
    stop: bool = True,
    stream_to: Callable[[str], None] | None = None,
) -> list[str]:
    """Each prompt + its continuation. sampling: None (greedy) or a `SamplingConfig`; mode
    "autodeco" needs `heads`. stop: end rows at `stop_ids(tokenizer)`. stream_to (one prompt only):
    called with each new piece of text as the tokens come."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_texts: no prompts")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    kwargs = dict(_sampling_args(sampling, heads, seed), stop_ids=stop_ids(tokenizer) if stop else None)
    if stream_to is None:
        done = decode.complete(model, params, ids, max_new_tokens, **kwargs)
        tokens, lengths, stopped = (np.asarray(x) for x in (done.tokens, done.lengths, done.stopped))
        new = [t[: n - int(s)] for t, n, s in zip(tokens, lengths, stopped)]  # the stop id stays out
        return [p + tokenizer.decode(n) for p, n in zip(prompts, new)]
    if len(prompts) != 1:
        raise ValueError("generate_texts: stream_to streams one prompt; give one")
    stops, new, shown = set(kwargs["stop_ids"] or ()), [], ""
    for tok_B, live_B in decode.stream(model, params, ids, max_new_tokens, **kwargs):
        if not live_B[0] or int(tok_B[0]) in stops:
            break
        new.append(int(tok_B[0]))
        # the whole continuation so far, less an incomplete character at its end (the next token
        # may complete it)
        text = tokenizer.decode(new).rstrip("\ufffd")
        if text.startswith(shown) and len(text) > len(shown):
            stream_to(text[len(shown) :])
            shown = text
    final = tokenizer.decode(new)
    if final.startswith(shown) and len(final) > len(shown):
        stream_to(final[len(shown) :])
    return [prompts[0] + final]


def sampling_config(mode: str, info: dict | None = None, *, temperature: float = 1.0, top_p: float = 1.0):
    """The SamplingConfig of ``mode`` in ``greedy|sample|autodeco|fixed_mean`` (fixed_mean reads ``info``)."""
    try:
        if mode == "fixed_mean":
            if info is None:
                raise ValueError("fixed_mean sampling needs the heads' info (mean_temperature, mean_top_p)")
            return SamplingConfig(
                mode="fixed_mean",
                temperature=temperature,
                top_p=top_p,
                mean_temperature=float(info["mean_temperature"]),
                mean_top_p=float(info["mean_top_p"]),
            )
        if mode == "greedy":
            return SamplingConfig(mode="greedy")
        return SamplingConfig(mode=mode, temperature=temperature, top_p=top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def sample_ids(
    model,
    params,
    tokenizer,
    prompt: str,
    n: int,
    max_new_tokens: int,
    sampling=None,
    *,
    heads=None,
    seed: int = 0,
) -> np.ndarray:
    """``n`` continuations of ``prompt`` in one batch, each exactly ``max_new_tokens`` long (no stop):
    ``[n, max_new_tokens]`` ids. ``sampling`` None is greedy; mode ``autodeco`` needs ``heads``."""
    ids = prompt_ids(tokenizer, prompt)
    out = decode.complete(model, params, [ids] * n, max_new_tokens, **_sampling_args(sampling, heads, seed))
    return np.asarray(out.tokens)


# ------------------------------------------------------------------ Hugging Face folders
TOKENIZER_FILE = "tokenizer.json"


def tokenizer_folder(checkpoint: str, base: str | None = None) -> str:
    """The folder holding tokenizer.json: the checkpoint's own, else the base model's."""
    tried = [d for d in (checkpoint, base) if d is not None]
    for d in tried:
        if os.path.isfile(os.path.join(d, TOKENIZER_FILE)):
            return d
    raise FileNotFoundError(
        f"no {TOKENIZER_FILE} in {' nor in '.join(repr(d) for d in tried)}; a Hugging Face folder "
        "for `jaxllm generate --checkpoint` needs its tokenizer"
    )


def load_hf_for_generation(checkpoint: str, base: str | None = None, *, autodeco: bool = False):
    """(model, params, tokenizer, heads) from a Hugging Face folder.

    A plain model folder, or an AutoDeco one (merged, or head-only with its base in `base` or in a
    local `base_model_name_or_path`). heads is `(module, variables)` when `autodeco`, else None.
    """
    cfg = registry.read_hf_config(checkpoint)
    is_autodeco = hf.is_autodeco_config(cfg)
    if autodeco and not is_autodeco:
        raise ConfigError(
            f"--autodeco needs an AutoDeco checkpoint (config.json model_type 'autodeco'); {checkpoint} "
            f"is a {cfg.get('model_type')!r} model"
        )
    heads = None
    if is_autodeco:
        model, params, module, variables = autodeco_hf.load_autodeco(checkpoint, base=base)
        heads = (module, variables) if autodeco else None
        if base is None and not autodeco_hf.is_merged(checkpoint):
            base = autodeco_hf.resolve_base(checkpoint, cfg)  # the base folder may hold the tokenizer
    else:
        if base is not None:
            raise ConfigError("--base is only for a head-only AutoDeco --checkpoint")
        model, params = hf.load_hf_checkpoint(checkpoint)
    tokenizer = load_hf_tokenizer(tokenizer_folder(checkpoint, base))
    return model, params, tokenizer, heads
