"""Load a trained workdir (config + latest checkpoint) and generate text from it."""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxllm import generation
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
    """Continues ``prompt`` (to the tokenizer's eos); greedy when ``temperature`` is 0, else nucleus
    sampling. See `jaxllm.generation.generate_texts`."""
    from jaxllm.ops.sampling import SamplingConfig

    sampling = None
    if temperature > 0:
        sampling = SamplingConfig(mode="sample", temperature=temperature, top_p=top_p)
    return generation.generate_texts(model, params, tokenizer, [prompt], max_new_tokens, sampling, seed=seed)[
        0
    ]
