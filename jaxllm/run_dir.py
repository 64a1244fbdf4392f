"""The one place that knows a run directory's files (`jaxllm train`, `autodeco-train`, `agent sft|rl`).

    <workdir>/run_config.json          the run's config (`jaxllm.train.config.RunConfig`)
    <workdir>/metrics.jsonl            one JSON line per logged step
    <workdir>/tensorboard/             TensorBoard event files
    <workdir>/checkpoints/<step>/      orbax checkpoints (or the config's `checkpoint_dir`, e.g. gs://)
    <workdir>/agent.json               an agent run's settings (world, limits, chat format)
    <workdir>/autodeco/heads.safetensors, heads.json, metrics.jsonl     AutoDeco heads of the run

Everything else asks these functions for paths; no file name is spelled anywhere else.
"""

from __future__ import annotations

import json
import os

from jaxllm.errors import CheckpointError, ConfigError

CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
AGENT_FILE = "agent.json"
AUTODECO_DIR = "autodeco"
HEADS_FILE = "heads.safetensors"
HEADS_INFO_FILE = "heads.json"


def config_file(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def metrics_file(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, TENSORBOARD_DIR)


def checkpoints(workdir: str, checkpoint_dir: str = "") -> str:
    """The checkpoint folder: `checkpoint_dir` when set (a remote one, say), else <workdir>/checkpoints."""
    return checkpoint_dir or os.path.join(workdir, CHECKPOINT_DIR)


def agent_file(workdir: str) -> str:
    return os.path.join(workdir, AGENT_FILE)


def autodeco_dir(workdir: str) -> str:
    return os.path.join(workdir, AUTODECO_DIR)


def heads_file(heads_dir: str) -> str:
    return os.path.join(heads_dir, HEADS_FILE)


def heads_info_file(heads_dir: str) -> str:
    return os.path.join(heads_dir, HEADS_INFO_FILE)


def require_run(workdir: str, what: str = "a training workdir") -> str:
    """The run's config file; a ConfigError naming the folder when it has none."""
    path = config_file(workdir)
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir!r} is not {what}: {CONFIG_FILE} not found")
    return path


def load_trained(workdir: str, step: int | None = None, *, model=None):
    """(model, params, tokenizer) of a run's checkpoint (default: the latest step), for inference.

    Restores the params alone (no optimizer state is read or allocated), replicated over this
    process's devices; builds no optimizer, data pipeline or train step.
    """
    import jax  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)
    from jax.sharding import NamedSharding  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)

    from jaxllm import sharding as shd  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)
    from jaxllm.train import checkpoint as ckpt_lib  # noqa: PLC0415 (cycle: jaxllm.train.loop imports run_dir)
    from jaxllm.train.config import load_config  # noqa: PLC0415 (cycle: jaxllm.train.loop imports run_dir)
    from jaxllm.train.loop import build_run_model, init_variables  # noqa: PLC0415 (cycle: jaxllm.train.loop imports run_dir)

    config = load_config(require_run(workdir))
    model, tokenizer, _ = build_run_model(config, model)
    replicated = NamedSharding(shd.make_mesh(shd.MeshConfig(data=-1), jax.local_devices()), P())
    shapes = jax.eval_shape(lambda rng: init_variables(config, model, rng), jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    ckpt = ckpt_lib.Checkpointer(
        checkpoints(workdir, config.checkpoint_dir),
        save_every=1,
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
        params = ckpt.restore_params(step, abstract, ckpt_lib.make_meta(config, abstract))
    finally:
        ckpt.close()
    return model, params, tokenizer


def save_heads(out_dir: str, state_dict: dict, info: dict) -> None:
    """AutoDeco heads (official key names) and their info into `out_dir`, each file replaced atomically."""
    import numpy as np  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)
    from safetensors.numpy import save_file  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)

    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_dict.items()}
    tmp = heads_file(out_dir) + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, heads_file(out_dir))
    tmp = heads_info_file(out_dir) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, heads_info_file(out_dir))


def load_heads(workdir: str, *, hidden_size: int | None = None):
    """``(module, variables, info)`` from ``<workdir>/autodeco``; clear errors when missing or mismatched."""
    from jaxllm.nn.autodeco import heads_from_official  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)

    d = autodeco_dir(workdir)
    path, ipath = heads_file(d), heads_info_file(d)
    if not os.path.exists(path) or not os.path.exists(ipath):
        raise CheckpointError(
            f"no AutoDeco heads in {d} ({HEADS_FILE} and {HEADS_INFO_FILE}); train them first with "
            f"`jaxllm autodeco-train --workdir {workdir}`"
        )
    try:
        from safetensors.numpy import load_file  # noqa: PLC0415 (run_dir stays light: the CLI imports it at startup)

        state_dict = load_file(path)
        with open(ipath, encoding="utf-8") as f:
            info = json.load(f)
        module, variables = heads_from_official(state_dict)
    except Exception as e:  # noqa: BLE001 - safetensors/json/shape errors: name the file.
        raise CheckpointError(
            f"AutoDeco heads in {d} are unreadable or corrupted: {type(e).__name__}: {e}"
        ) from e
    H = state_dict["temp_head.mlp.0.weight"].shape[1]
    if hidden_size is not None and H != hidden_size:
        raise CheckpointError(
            f"AutoDeco heads in {d} expect hidden size {H}, the base model has {hidden_size}"
        )
    return module, variables, info
