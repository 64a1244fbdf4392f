"""Cached decoding for any model of the contract (`jaxllm.models.base`): prefill, single-token
steps in a `lax.fori_loop`, `generate`.

The cache is the model's own (`model.init_cache(batch, capacity)`, capacity = prompt length +
max_new_tokens): Kimi Linear keeps KDA states and MLA latents, the Qwen/Llama families keys and values.

    ids = jaxllm.generate(model, params, prompt_ids_BT, max_new_tokens=32)           # greedy
    ids = jaxllm.generate(model, params, prompt_ids_BT, max_new_tokens=32,
                          sampling=SamplingConfig(temperature=0.7, top_p=0.9), rng=key)
    ids = jaxllm.generate(..., sampling=SamplingConfig(mode="autodeco"), rng=key,
                          autodeco=(heads_module, heads_params))

All prompts of a batch have the same length (no padding); returns [B, T + max_new_tokens] int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.models.base import LanguageModel, check_token_ids


def prefill(model: LanguageModel, params, prompt_ids_BT, capacity: int, *, cache_dtype=None):
    """Run the prompt into a fresh cache of `capacity` tokens: (logits_BTV, hidden_BTD, cache)."""
    cache = model.init_cache(prompt_ids_BT.shape[0], capacity, cache_dtype)
    out = model.apply(params, prompt_ids_BT, cache=cache)
    return out.logits, out.hidden, out.cache


def decode_step(model: LanguageModel, params, token_B, cache):
    """One token per row after the cached ones: (logits_BV, hidden_BD, new cache)."""
    out = model.apply(params, token_B[:, None], cache=cache)
    return out.logits[:, 0], out.hidden[:, 0], out.cache


def _heads_outputs(out):
    if isinstance(out, dict):
        return out["temperature_B"], out["top_p_B"]
    t, p = out
    return t, p


@functools.lru_cache(maxsize=32)
def _generate_fn(
    model_cls, config, prompt_len: int, max_new_tokens: int, sampling, heads_module, cache_dtype
):
    model = model_cls(config)
    total = prompt_len + max_new_tokens

    def pick(logits_BV, hidden_BD, rng, out_BN, n_done, heads_params):
        if sampling is None:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        from jaxllm.ops.sampling import sample_next

        kw = {}
        if heads_module is not None:
            t_B, p_B = _heads_outputs(heads_module.apply(heads_params, hidden_BD, logits_BV))
            kw = dict(temperature_B=t_B.reshape(-1), top_p_B=p_B.reshape(-1))
        mask_BN = jnp.broadcast_to(jnp.arange(out_BN.shape[1])[None] < n_done, out_BN.shape)
        return sample_next(logits_BV, rng, sampling, prev_tokens_BT=out_BN, prev_mask_BT=mask_BN, **kw)

    def run(params, prompt_BT, rng, heads_params):
        B = prompt_BT.shape[0]
        logits, hidden, cache = prefill(model, params, prompt_BT, total, cache_dtype=cache_dtype)
        out = jnp.zeros((B, max(max_new_tokens, 1)), jnp.int32)
        rng, sub = jax.random.split(rng)
        tok = pick(logits[:, -1], hidden[:, -1], sub, out, 0, heads_params)
        out = out.at[:, 0].set(tok)

        def body(i, carry):
            cache, tok, out, rng = carry
            logits_BV, hidden_BD, cache = decode_step(model, params, tok, cache)
            rng, sub = jax.random.split(rng)
            nxt = pick(logits_BV, hidden_BD, sub, out, i, heads_params)
            return cache, nxt, out.at[:, i].set(nxt), rng

        _, _, out, _ = jax.lax.fori_loop(1, max_new_tokens, body, (cache, tok, out, rng))
        return jnp.concatenate([prompt_BT, out[:, :max_new_tokens]], axis=1)

    return jax.jit(run)


def generate(
    model: LanguageModel,
    params,
    prompt_ids,
    max_new_tokens: int = 16,
    sampling=None,
    rng=None,
    autodeco=None,
    *,
    cache_dtype=None,
):
    """Prefill the prompts then decode `max_new_tokens` tokens; returns [B, T + max_new_tokens] ids.

    sampling: None for greedy, else a `jaxllm.ops.sampling.SamplingConfig` (needs `rng`).
    autodeco: optional `(heads_module, heads_params)`; `heads_module.apply(heads_params, hidden_BD,
    logits_BV)` gives per-row temperature and top-p (a dict with `temperature_B`/`top_p_B`, or a pair)
    passed to `sample_next` (use `SamplingConfig(mode="autodeco")`).
    """
    config = model.config
    prompt = jnp.asarray(prompt_ids)
    if prompt.ndim != 2:
        raise ValueError(f"generate: prompt_ids must be [B,T], got shape {prompt.shape}")
    if prompt.shape[1] < 1:
        raise ValueError("generate: prompt_ids must hold at least one token per row")
    check_token_ids(prompt, config.vocab_size, "prompt_ids")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return prompt.astype(jnp.int32)
    heads_module, heads_params = (None, None) if autodeco is None else autodeco
    if sampling is not None and rng is None:
        raise ValueError("generate: sampling needs an `rng` key (jax.random.key(...))")
    if autodeco is not None and sampling is None:
        raise ValueError("generate: autodeco heads need `sampling` (e.g. SamplingConfig(mode='autodeco'))")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    fn = _generate_fn(
        type(model),
        config,
        prompt.shape[1],
        max_new_tokens,
        sampling,
        heads_module,
        None if cache_dtype is None else jnp.dtype(cache_dtype),
    )
    return fn(params, prompt.astype(jnp.int32), rng, heads_params)
