"""The training loop: mesh, sharded state, data, jitted step, checkpoints, metrics, samples.

``train(config, workdir)`` is the whole job. Each piece is a small function so that
tests and other entry points can reuse it (``setup``, ``restore_or_init``, ...).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import run_dir
from jaxllm import sharding as shd
from jaxllm.data.pipeline import DataStateError, PackedBatches
from jaxllm.data.sources import DatasetError, load_source
from jaxllm.data.tokenizers import make_tokenizer
from jaxllm.errors import NonFiniteLossError  # noqa: F401 - re-exported: jaxllm.train, the CLI
from jaxllm.generation import generate_texts
from jaxllm.models.hf import load_hf_checkpoint
from jaxllm.ops.sampling import SamplingConfig
from jaxllm.train import checkpoint as ckpt_lib
from jaxllm.train import metrics as metrics_lib
from jaxllm.train.config import ConfigError, RunConfig, save_config
from jaxllm.train.models import build_model
from jaxllm.train.optim import make_optimizer
from jaxllm.train.step import (
    DTYPES,
    check_finite,
    make_eval_step,
    make_train_step,
    require_correction_biases,
)


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first step."""

    config: RunConfig
    mesh: Any
    model: Any
    tokenizer: Any
    vocab_size: int
    tx: Any
    schedule: Callable
    boxed: Any  # abstract variables with logical-axis boxes
    state_shardings: Any
    batch_sharding: NamedSharding
    init_fn: Callable


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def model_vocab_size(config: RunConfig, tokenizer) -> int:
    """The model vocab: ``model_args.vocab_size`` or the tokenizer's rounded up to 64."""
    vocab = config.model_args.get("vocab_size")
    if vocab is None:
        return round_up(tokenizer.vocab_size, 64)
    if not isinstance(vocab, int) or vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model_args.vocab_size={vocab!r} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids from tokenizer={config.tokenizer!r}); allowed: an int >= "
            f"{tokenizer.vocab_size}"
        )
    return vocab


def checkpoint_dir(config: RunConfig, workdir: str) -> str:
    """``config.checkpoint_dir``, or ``<workdir>/checkpoints`` when that is empty."""
    return run_dir.checkpoints(workdir, config.checkpoint_dir)


def make_run_mesh(config: RunConfig):
    mesh_config = shd.MeshConfig(
        config.mesh_data, config.mesh_fsdp, config.mesh_tensor, config.mesh_expert, config.mesh_context
    )
    try:
        return shd.make_mesh(mesh_config)
    except ValueError as e:
        raise ConfigError(f"mesh_data/mesh_fsdp/mesh_tensor/mesh_expert/mesh_context: {e}") from None


def _cast_params(tree, dtype):
    if dtype == jnp.float32:
        return tree
    return jax.tree.map(
        lambda p: p.astype(dtype) if p.ndim >= 2 and jnp.issubdtype(p.dtype, jnp.floating) else p, tree
    )


def build_run_model(config: RunConfig, model=None):
    """(model, tokenizer, vocab size) of a run config; no arrays allocated."""
    tokenizer = make_tokenizer(config.tokenizer)
    vocab_size = model_vocab_size(config, tokenizer)
    if model is None:
        model = build_model(
            config.model,
            _model_args(config),
            vocab_size=vocab_size,
            compute_dtype=config.compute_dtype,
            param_dtype=config.param_dtype,
            remat=config.remat,
        )
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", vocab_size)
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocab_size {vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} (tokenizer={config.tokenizer!r})"
        )
    return model, tokenizer, vocab_size


def init_variables(config: RunConfig, model, rng):
    """The model's variables as a run stores them (unboxed, in the run's param dtype)."""
    ids = jnp.zeros((1, config.seq_len), jnp.int32)
    variables = shd.unbox(model.init(rng, ids, segment_ids=jnp.ones_like(ids)))
    return _cast_params(variables, DTYPES[config.param_dtype])


def setup(config: RunConfig, *, model=None, mesh=None) -> Setup:
    """Builds mesh, tokenizer, model, optimizer and all shardings (no arrays allocated)."""
    mesh = mesh or make_run_mesh(config)
    model, tokenizer, vocab_size = build_run_model(config, model)
    micro = config.batch_size // config.grad_accum
    shards = shd.batch_shard_count(mesh)
    if micro % shards:
        raise ConfigError(
            f"batch_size={config.batch_size} / grad_accum={config.grad_accum} = {micro} rows per "
            f"microbatch must be divisible by the {shards} batch shards of mesh {dict(mesh.shape)} "
            "(data x fsdp x expert)"
        )
    if config.seq_len % shd.context_size(mesh):
        raise ConfigError(
            f"seq_len={config.seq_len} must be divisible by the mesh's context axis "
            f"({shd.context_size(mesh)}: context parallelism splits the sequence evenly)"
        )
    tx, schedule = make_optimizer(config)
    ids = jnp.zeros((1, config.seq_len), jnp.int32)

    def init_fn(rng):
        init_rng, state_rng = jax.random.split(rng)
        variables = init_variables(config, model, init_rng)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": variables,
            "opt_state": tx.init(variables),
            "rng": state_rng,
        }

    boxed = jax.eval_shape(
        lambda r: model.init(r, ids, segment_ids=jnp.ones_like(ids)), jax.random.PRNGKey(0)
    )
    require_correction_biases(config.moe_bias_update_rate, boxed, config.model)
    param_sh = shd.tree_shardings(boxed, mesh)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    index = shd.path_index(abstract["params"], param_sh)
    replicated = NamedSharding(mesh, P())
    state_sh = {
        "step": replicated,
        "params": param_sh,
        "opt_state": shd.match_shardings(abstract["opt_state"], index, mesh),
        "rng": replicated,
    }
    batch_sh = NamedSharding(mesh, shd.batch_spec(extra_leading=1))
    return Setup(config, mesh, model, tokenizer, vocab_size, tx, schedule, boxed, state_sh, batch_sh, init_fn)


def abstract_state(s: Setup):
    """ShapeDtypeStructs of the train state carrying this run's shardings."""
    shapes = jax.eval_shape(s.init_fn, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, s.state_shardings
    )


def _model_args(config: RunConfig) -> dict:
    """model_args, with the config.json of ``init_from`` as the model's config."""
    if not config.init_from:
        return dict(config.model_args)
    if not os.path.isfile(os.path.join(config.init_from, "config.json")):
        raise ConfigError(
            f"init_from={config.init_from!r} is not a Hugging Face checkpoint folder: no config.json"
        )
    if "config_file" in config.model_args:
        raise ConfigError("init_from and model_args.config_file both name the model's config; keep one")
    return {"config_file": config.init_from, **config.model_args}


def state_from_params(s: Setup, params, seed: int) -> dict:
    """A train state holding ``params`` (step 0, fresh optimizer state), placed on ``s``'s shardings:
    training that starts from another run's params (agent SFT ``--init``, agent RL)."""
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": s.tx.init(params),
        "rng": jax.random.PRNGKey(seed),
    }
    return jax.device_put(state, s.state_shardings)


def init_state(s: Setup):
    """A fresh train state: initialised params, or the ``init_from`` checkpoint's, placed on their shardings."""
    if not s.config.init_from:
        init = jax.jit(s.init_fn, out_shardings=s.state_shardings)
        return init(jax.random.PRNGKey(s.config.seed))
    abstract = abstract_state(s)
    _, variables = load_hf_checkpoint(
        s.config.init_from,
        dtype=s.config.param_dtype,
        param_shardings=s.state_shardings["params"]["params"],
        **{k: v for k, v in s.config.model_args.items() if k != "vocab_size"},
    )
    if jax.tree.structure(variables) != jax.tree.structure(abstract["params"]):
        raise ConfigError(
            f"init_from={s.config.init_from!r}: its parameters do not match model {s.config.model!r}"
        )
    # the run's dtypes (vectors such as norms stay float32 under a bf16 param_dtype)
    to_run = jax.jit(
        lambda v: jax.tree.map(lambda x, a: x.astype(a.dtype), v, abstract["params"]),
        out_shardings=s.state_shardings["params"],
    )
    params = to_run(variables)
    opt_state = jax.jit(s.tx.init, out_shardings=s.state_shardings["opt_state"])(params)
    _, state_rng = jax.random.split(jax.random.PRNGKey(s.config.seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": state_rng}


def batch_shape(s: Setup) -> tuple[int, int, int]:
    c = s.config
    return (c.grad_accum, c.batch_size // c.grad_accum, c.seq_len)


def process_rows(s: Setup) -> list[int]:
    """The global batch rows (``r = microbatch * rows_per_microbatch + i``) this process's devices hold.

    Read off the batch sharding, so any device order or mesh layout is right, including rows
    that several processes hold (replicated over a mesh axis that spans hosts).
    """
    ga, micro, _ = shape = batch_shape(s)
    rows = set()
    for index in s.batch_sharding.addressable_devices_indices_map(shape).values():
        rows.update(g * micro + i for g in range(ga)[index[0]] for i in range(micro)[index[1]])
    return sorted(rows)


def make_data(s: Setup, split: str = "train") -> PackedBatches:
    """This process's rows of the global batches of ``split``: it reads only those rows' documents."""
    c = s.config
    source = load_source(c.dataset, split, data_dir=c.data_dir or None, text_key=c.text_key)
    return PackedBatches(
        source,
        s.tokenizer,
        seq_len=c.seq_len,
        batch_size=c.batch_size,
        grad_accum=c.grad_accum,
        seed=c.seed,
        rows=process_rows(s),
        vocab_size=s.vocab_size,
    )


def global_batch(s: Setup, batch: dict[str, np.ndarray], rows=None) -> dict[str, jax.Array]:
    """Global arrays on ``s.batch_sharding`` from host data.

    ``rows=None``: ``batch`` holds the whole global batch ``[grad_accum, rows/grad_accum, seq_len]``
    (every process passes the same). Otherwise ``batch`` holds the global rows ``rows`` as
    ``[len(rows), seq_len]`` (``PackedBatches.next_rows()``), at least those this process's devices hold.
    """
    ga, micro, seq = shape = batch_shape(s)
    if rows is None:
        for k, v in batch.items():
            if v.shape != shape:
                raise ValueError(f"batch[{k!r}] has shape {v.shape}; the global batch is {shape}")
        return {
            k: jax.make_array_from_callback(shape, s.batch_sharding, lambda index, v=v: v[index])
            for k, v in batch.items()
        }
    where = {int(r): i for i, r in enumerate(rows)}

    def pick(v, index):
        try:
            sel = np.array(
                [[where[g * micro + i] for i in range(micro)[index[1]]] for g in range(ga)[index[0]]]
            )
        except KeyError as e:
            raise ValueError(
                f"global batch row {e.args[0]} is held by this process's devices but not in the rows given"
            ) from None
        return v[sel.reshape(-1)].reshape(sel.shape + (seq,))[..., index[2]]

    return {
        k: jax.make_array_from_callback(shape, s.batch_sharding, lambda index, v=v: pick(v, index))
        for k, v in batch.items()
    }


def compile_step(s: Setup):
    c = s.config
    step = make_train_step(
        s.model.apply,
        s.tx,
        s.schedule,
        DTYPES[c.compute_dtype],
        bias_update_rate=c.moe_bias_update_rate,
        loss_chunk=c.loss_chunk,
    )
    replicated = NamedSharding(s.mesh, P())
    jitted = jax.jit(
        step,
        in_shardings=(s.state_shardings, s.batch_sharding),
        out_shardings=(s.state_shardings, replicated),
        donate_argnums=(0,),
    )
    shape = (c.grad_accum, c.batch_size // c.grad_accum, c.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s.batch_sharding)
        for k in ("inputs", "targets", "segment_ids", "loss_mask")
    }
    return jitted.lower(abstract_state(s), batch).compile()


class Validation:
    """The held-out loss: the first ``eval_batches`` batches of ``eval_split``, the same ones every time."""

    def __init__(self, s: Setup, train_data: PackedBatches, log):
        c = s.config
        try:
            self.data = make_data(s, c.eval_split)
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - TFDS raises several kinds for a missing split
            raise DatasetError(
                f"eval_split={c.eval_split!r}: dataset {c.dataset!r} has no such split or it cannot be "
                f"read ({type(e).__name__}: {e}); set eval_split to one of its held-out splits"
            ) from None
        src, train_src = self.data.source, train_data.source
        if len(src) == 1 and len(train_src) and src[0] == train_src[len(train_src) - 1]:
            log(
                f"warning: dataset {c.dataset!r} is too small for a held-out split (1 in 50 documents); its "
                f"'{c.eval_split}' split repeats a training document, so val_loss is not held-out"
            )
        self.s = s
        self.batches = c.eval_batches
        step = make_eval_step(s.model.apply, DTYPES[c.compute_dtype], c.loss_chunk)
        replicated = NamedSharding(s.mesh, P())
        self._fn = jax.jit(
            step,
            in_shardings=(s.state_shardings["params"], s.batch_sharding),
            out_shardings=(replicated, replicated),
        )

    def __call__(self, params) -> float:
        self.data.reset()
        total, count = 0.0, 0.0
        for _ in range(self.batches):
            l, n = jax.device_get(
                self._fn(params, global_batch(self.s, self.data.next_rows(), self.data.rows))
            )
            total, count = total + float(l), count + float(n)
        return total / max(count, 1.0)


def restore(ckpt, step: int, abstract, meta: dict, data: PackedBatches):
    """The train state of checkpoint ``step``, with ``data`` set to this process's rows' saved positions.

    Every process either succeeds or raises: a process whose data position fails (its own files)
    tells the others through a collective instead of leaving them waiting in the first step.
    """
    problem = None
    state = None
    try:
        state, data_state = ckpt.restore(step, abstract, meta, rows=data.rows)
        data.set_state(data_state)
    except DataStateError as e:
        problem = ckpt_lib.CheckpointError(f"checkpoint step {step} in {ckpt.directory}: {e}")
    except ckpt_lib.CheckpointError as e:
        problem = e
    if jax.process_count() > 1:
        failed = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None))).reshape(-1)
        if failed.any() and problem is None:
            problem = ckpt_lib.CheckpointError(
                f"checkpoint step {step} in {ckpt.directory}: process(es) {np.flatnonzero(failed).tolist()} could not "
                "restore it (see their error)"
            )
    if problem is not None:
        raise problem
    return state


def _is_main() -> bool:
    return jax.process_index() == 0


@dataclasses.dataclass
class TrainResult:
    start_step: int
    final_step: int
    losses: dict[int, float]
    checkpoint_dir: str
    samples: list[str]
    params: Any = None
    val_losses: dict[int, float] = dataclasses.field(default_factory=dict)


def train(
    config: RunConfig, workdir: str, *, model=None, mesh=None, log: Callable[[str], None] | None = None
) -> TrainResult:
    """Runs (or resumes) training until ``config.steps``; returns losses, final params and samples.

    ``model`` (a Linen module) replaces ``config.model``; ``mesh`` replaces the config's mesh.
    Several processes (after ``jax.distributed.initialize()``) each run this same call: each packs
    and saves the data of the batch rows its devices hold; only process 0 logs (``log`` is not
    called on the others) and writes ``run_config.json``, ``metrics.jsonl`` and TensorBoard events.
    """
    if not _is_main():
        log = lambda msg: None  # noqa: E731
    log = log or (lambda msg: print(msg, flush=True))
    if "://" in workdir:
        raise ConfigError(
            f"--workdir {workdir!r}: the workdir must be a local (or mounted) directory, as metrics.jsonl "
            "is appended to; put checkpoints on shared or cloud storage with checkpoint_dir=gs://..."
        )
    os.makedirs(workdir, exist_ok=True)
    s = setup(config, model=model, mesh=mesh)
    with jax.set_mesh(s.mesh):
        return _train(s, workdir, log)


def _train(s: Setup, workdir: str, log) -> TrainResult:
    c = s.config
    ckpt = ckpt_lib.Checkpointer(
        checkpoint_dir(c, workdir),
        save_every=c.save_every,
        keep=c.keep_checkpoints,
        async_save=c.async_checkpoints,
    )
    if (
        jax.process_count() > 1
    ):  # process 0 prepares a shared data_dir before the others read (or prepare) theirs
        if _is_main():
            load_source(c.dataset, "train", data_dir=c.data_dir or None, text_key=c.text_key)
        multihost_utils.sync_global_devices("jaxllm: dataset prepared by process 0")
    data = make_data(s)
    abstract = abstract_state(s)
    meta = ckpt_lib.make_meta(c, abstract["params"])
    start = ckpt.latest_step()
    if start is not None:
        state = restore(ckpt, start, abstract, meta, data)
        log(f"resumed from checkpoint step {start} in {ckpt.directory}")
    else:
        start = 0
        state = init_state(s)
    if _is_main():
        save_config(c, run_dir.config_file(workdir))
    nparams = metrics_lib.param_count(abstract["params"])
    log(shd.describe(s.mesh))
    log(
        f"model {c.model}: {nparams:,} params; batch {c.batch_size} x {c.seq_len} tokens, "
        f"{c.grad_accum} microbatch(es); steps {start} -> {c.steps}"
    )
    notes = shd.unsharded_dims(s.boxed, s.mesh)
    if notes:
        log(
            "replicated (not divisible by the mesh): "
            + "; ".join(notes[:8])
            + (" ..." if len(notes) > 8 else "")
        )
    if start >= c.steps:
        log(f"nothing to do: checkpoint step {start} >= steps={c.steps}")
        ckpt.close()
        return TrainResult(start, start, {}, ckpt.directory, [], state["params"])

    if c.tensorboard:
        metrics_lib.require_tensorboardx()  # fail before compiling, not after
    validate = Validation(s, data, log) if c.eval_every else None
    t_compile = time.perf_counter()
    step_fn = compile_step(s)
    flops = metrics_lib.compiled_flops(step_fn)
    peak, peak_src = metrics_lib.peak_tflops_per_device(c.peak_tflops)
    log(
        f"compiled train step in {time.perf_counter() - t_compile:.1f}s; "
        f"{'%.3g' % flops if flops else 'unknown'} FLOPs/step/device; peak {peak:.3g} TFLOP/s/device ({peak_src})"
    )

    mlog = metrics_lib.MetricsLog(run_dir.metrics_file(workdir), resume_step=start) if _is_main() else None
    tblog = (
        metrics_lib.TensorBoardLog(run_dir.tensorboard_dir(workdir), resume_step=start)
        if c.tensorboard and _is_main()
        else None
    )
    val_losses: dict[int, float] = {}
    bar = metrics_lib.Progress(c.steps, start, enabled=c.progress and _is_main())
    losses: dict[int, float] = {}
    tokens_per_step = c.batch_size * c.seq_len
    try:
        for step in range(start + 1, c.steps + 1):
            t0 = time.perf_counter()
            batch = global_batch(s, data.next_rows(), data.rows)
            state, m = step_fn(state, batch)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            if not bool(m["finite"]):
                ckpt.wait()
                check_finite(m, step, last_good=ckpt.latest_step(), directory=ckpt.directory)
            loss = float(m["loss"])
            losses[step] = loss
            tok_s = tokens_per_step / dt
            bar.update(step, loss, tok_s)
            val_loss = None
            if validate and (step % c.eval_every == 0 or step == c.steps):
                val_loss = val_losses[step] = validate(state["params"])
                msg = f"step {step}: val_loss {val_loss:.4f} ({c.eval_batches} batch(es) of split '{c.eval_split}')"
                if bar.enabled:
                    bar.write(msg)
                else:
                    log(msg)
            if mlog and (step % c.log_every == 0 or step == c.steps or val_loss is not None):
                rec = {
                    "step": step,
                    "loss": loss,
                    "grad_norm": float(m["grad_norm"]),
                    "lr": float(m["lr"]),
                    "tokens": int(m["tokens"]),
                    "step_time_s": dt,
                    "tokens_per_s": tok_s,
                }
                if flops:
                    rec["mfu"] = flops / dt / (peak * 1e12)
                rec.update(metrics_lib.aux_and_load_record(m))
                if val_loss is not None:
                    rec["val_loss"] = val_loss
                mlog.write(rec)
                if tblog:
                    tblog.write(rec)
            if step % c.save_every == 0 or step == c.steps:
                ckpt.save(step, state, data.get_state(), meta, force=True)
    finally:
        bar.close()
        if mlog:
            mlog.close()
        if tblog:
            tblog.close()
        ckpt.close()
    ordered = [losses[k] for k in sorted(losses)]
    n = max(1, min(10, len(ordered) // 2))
    log(
        f"trained steps {start + 1}-{c.steps}: loss {ordered[0]:.4f} -> {ordered[-1]:.4f} (mean of first {n}: "
        f"{np.mean(ordered[:n]):.4f}, last {n}: {np.mean(ordered[-n:]):.4f}); checkpoints in {ckpt.directory}"
    )
    samples = []
    if c.num_samples and jax.process_count() > 1:
        log(
            f"(no samples on a {jax.process_count()}-process run: sample from the checkpoint with jaxllm generate)"
        )
    elif c.num_samples:
        samples = generate_samples(s, state["params"], log)
    return TrainResult(start, c.steps, losses, ckpt.directory, samples, state["params"], val_losses)


def generate_samples(s: Setup, params, log) -> list[str]:
    """A few continuations of ``sample_prompt`` (``|``-separated prompts), decoded in one batch."""
    c = s.config
    prompts = [p for p in c.sample_prompt.split("|") if p] or [""]
    prompts = [prompts[i % len(prompts)] for i in range(c.num_samples)]
    sampling = None
    if c.sample_temperature > 0:
        sampling = SamplingConfig(mode="sample", temperature=c.sample_temperature, top_p=c.sample_top_p)
    out = generate_texts(s.model, params, s.tokenizer, prompts, c.sample_tokens, sampling, seed=c.seed)
    for i, text in enumerate(out):
        log(f"--- sample {i + 1} ---\n{text}")
    return out
