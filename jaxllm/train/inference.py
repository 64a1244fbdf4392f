"""Load a trained workdir (config + latest checkpoint) and generate text from it."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.train import checkpoint as ckpt_lib
from jaxllm.train.config import ConfigError, load_config
from jaxllm.train.loop import CONFIG_FILE, abstract_state, checkpoint_dir, setup


def load_trained(workdir: str, step: int | None = None, *, model=None):
    """(model, params, tokenizer) from ``workdir``; params placed on a mesh over the local devices."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{workdir!r} is not a training workdir: {CONFIG_FILE} not found")
    config = load_config(path)
    # Inference uses whatever devices are here, replicated params split over the batch only.
    config = dataclasses.replace(
        config,
        mesh_data=-1,
        mesh_fsdp=1,
        mesh_tensor=1,
        mesh_expert=1,
        batch_size=config.grad_accum * jax.device_count(),
    )
    s = setup(config, model=model)
    ckpt = ckpt_lib.Checkpointer(
        checkpoint_dir(config, workdir),
        save_every=config.save_every,
        keep=config.keep_checkpoints,
        async_save=False,
    )
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ckpt_lib.CheckpointError(f"no checkpoint in {ckpt.directory}")
        if step not in ckpt.all_steps():
            raise ckpt_lib.CheckpointError(
                f"no checkpoint step {step} in {ckpt.directory}; have {ckpt.all_steps()}"
            )
        with jax.set_mesh(s.mesh):
            abstract = abstract_state(s)
            state, _ = ckpt.restore(
                step, abstract, ckpt_lib.make_meta(config, abstract["params"]), data=False
            )
    finally:
        ckpt.close()
    return s.model, state["params"], s.tokenizer


def generate_text(
    model,
    params,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """Continues ``prompt``; greedy when ``temperature`` is 0, else nucleus sampling."""
    from jaxllm.decode import generate

    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32)[None, :]
    kwargs = {}
    if temperature > 0:
        from jaxllm.ops.sampling import SamplingConfig

        kwargs = {
            "sampling": SamplingConfig(mode="sample", temperature=temperature, top_p=top_p),
            "rng": jax.random.PRNGKey(seed),
        }
    out = np.asarray(generate(model, params, jnp.asarray(ids), max_new_tokens=max_new_tokens, **kwargs))
    if out.shape[-1] > ids.shape[-1] and np.array_equal(out[0, : ids.shape[1]], ids[0]):
        out = out[:, ids.shape[1] :]
    return prompt + tokenizer.decode(out[0])


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
    from jaxllm.data.hf_tokenizer import load_hf_tokenizer
    from jaxllm.models import autodeco_hf, hf, registry

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


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
    """[1, T] int32: BOS (where the tokenizer names one; Qwen names none) + the prompt's ids."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = np.concatenate([np.asarray(bos, np.int32), tokenizer.encode(prompt)]).astype(np.int32)
    if ids.size == 0:
        raise ConfigError("--prompt encodes to no tokens and the tokenizer has no BOS token; give a prompt")
    return ids[None, :]


def cut_at_stop(ids, stop_ids) -> np.ndarray:
    """`ids` up to (not including) the first stop id."""
    ids = np.asarray(ids)
    hits = np.flatnonzero(np.isin(ids, np.asarray(list(stop_ids), ids.dtype)))
    return ids[: hits[0]] if hits.size else ids


def generate_hf_text(
    model, params, tokenizer, prompt: str, max_new_tokens: int, sampling=None, *, heads=None, seed: int = 0
) -> str:
    """`prompt` + its continuation, cut at the first of `tokenizer.stop_ids`.

    sampling None is greedy; mode "autodeco" needs `heads`. The decode runs the full
    `max_new_tokens` (`jaxllm.generate` has no per-row stop yet); the text is cut afterwards.
    """
    from jaxllm.decode import generate

    ids = prompt_ids(tokenizer, prompt)
    kwargs = {}
    if sampling is not None and sampling.mode != "greedy":
        kwargs = {"sampling": sampling, "rng": jax.random.PRNGKey(seed)}
        if sampling.mode == "autodeco":
            if heads is None:
                raise ConfigError("autodeco sampling needs the checkpoint's heads")
            kwargs["autodeco"] = tuple(heads)
    out = np.asarray(generate(model, params, jnp.asarray(ids), max_new_tokens=max_new_tokens, **kwargs))
    return prompt + tokenizer.decode(cut_at_stop(out[0, ids.shape[1] :], tokenizer.stop_ids))
