"""``jaxllm`` command line: ``jaxllm train|generate|autodeco-train|plot ...``.

Subcommands live in one table, ``COMMANDS``; another module adds its own with
``register_command(name, help, add_arguments, run)``. Modules listed in ``PLUGIN_MODULES``
are imported before parsing: ``jaxllm agent ...`` only needs a ``jaxllm/agent/cli.py`` that calls
``register_command("agent", ...)`` at import time.
User errors (bad config, missing data, bad checkpoint, NaN loss) print one
``error: ...`` line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, NamedTuple

from jaxllm.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    NonFiniteLossError,
    TokenIdError,
)
from jaxllm.run_dir import load_heads, load_trained


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}

# Modules that register more subcommands when imported (missing ones are skipped).
PLUGIN_MODULES = ("jaxllm.agent.cli",)


def register_command(name: str, help: str, add_arguments, run) -> None:
    COMMANDS[name] = Command(help, add_arguments, run)


# --------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config JSON (fields of jaxllm.train.RunConfig)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and run_config.json go here")
    p.add_argument("--steps", type=int, help="total optimizer steps (same as steps=N)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host TPU pod slices, GPU clusters)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="field=value", help="config overrides, e.g. lr=1e-3 mesh_fsdp=4"
    )


def _maybe_distributed(args) -> None:
    """``jax.distributed.initialize()`` for --distributed / JAXLLM_DISTRIBUTED=1.

    Cloud TPU, SLURM, Open MPI and Kubernetes are detected by JAX itself. Elsewhere set
    ``JAX_COORDINATOR_ADDRESS`` (read by JAX) and ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
    (read here: JAX takes those two only as arguments).
    """
    if getattr(args, "distributed", False) or os.environ.get("JAXLLM_DISTRIBUTED") == "1":
        import jax  # noqa: PLC0415 (loads jax: CLI --help stays fast)

        kwargs = {}
        for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            text = os.environ.get(var, "").strip()
            if text:
                if not text.isdigit():
                    raise SystemExit(f"error: {var}={text!r} is not allowed; allowed: a non-negative integer")
                kwargs[name] = int(text)
        jax.distributed.initialize(**kwargs)


def _train(args) -> int:
    _maybe_distributed(args)
    from jaxllm.train import load_config, train  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
    config = load_config(args.config, overrides)
    train(config, args.workdir)
    return 0


# --------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (run_config.json + checkpoints)")
    src.add_argument(
        "--checkpoint",
        help="a Hugging Face model folder (config.json, safetensors, tokenizer.json): a plain model or "
        "an AutoDeco checkpoint, merged or head-only. A row ends at the tokenizer's stop ids (eos, "
        "<|im_end|>)",
    )
    p.add_argument(
        "--base",
        help="with a head-only AutoDeco --checkpoint: the base model folder (default: the config's "
        "base_model_name_or_path when it is a local folder); its tokenizer is used when the "
        "checkpoint has none",
    )
    p.add_argument(
        "--prompt", default=None, help="text to continue (default 'def '); its text streams as it comes"
    )
    p.add_argument(
        "--prompts-file",
        default=None,
        help='several prompts decoded in one batch: one per line (a .jsonl file: {"prompt": ...} per '
        "line); prints one JSON line per prompt",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--step", type=int, help="with --workdir: checkpoint step (default: latest)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy (default 0; with --autodeco/--fixed-mean it multiplies the heads' T, default 1)",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="with --autodeco/--fixed-mean: multiplies the heads' P"
    )
    p.add_argument("--seed", type=int, default=0)
    heads = p.add_mutually_exclusive_group()
    heads.add_argument(
        "--autodeco",
        action="store_true",
        help="per-token T and top-p from the AutoDeco heads: those of `jaxllm autodeco-train` "
        "(<workdir>/autodeco) or of an AutoDeco --checkpoint",
    )
    heads.add_argument(
        "--fixed-mean",
        action="store_true",
        help="with --workdir: the mean T and top-p of its heads as fixed values (the 'MeanShift' baseline)",
    )


def _read_prompts(args) -> list[str]:
    """--prompt, or every prompt of --prompts-file (one per line; a .jsonl file: {"prompt": ...} per line)."""
    if args.prompts_file is None:
        return ["def " if args.prompt is None else args.prompt]
    if args.prompt is not None:
        raise ConfigError("give --prompt or --prompts-file, not both")
    with open(args.prompts_file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if args.prompts_file.endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{args.prompts_file}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ConfigError(
                    f'{args.prompts_file}:{i}: each line must be an object with a "prompt" string'
                )
            prompts.append(rec["prompt"])
    else:
        prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"{args.prompts_file}: no prompts")
    return prompts


def _print_generations(args, model, params, tokenizer, sampling, heads=None) -> int:
    """One prompt: its text streamed as the tokens come. Several: one JSON line per prompt."""
    from jaxllm.generation import generate_texts  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    prompts = _read_prompts(args)
    kw = dict(heads=heads, seed=args.seed)
    if len(prompts) == 1 and args.prompts_file is None:
        print(prompts[0], end="", flush=True)
        generate_texts(
            model,
            params,
            tokenizer,
            prompts,
            args.max_new_tokens,
            sampling,
            stream_to=lambda piece: print(piece, end="", flush=True),
            **kw,
        )
        print()
        return 0
    texts = generate_texts(model, params, tokenizer, prompts, args.max_new_tokens, sampling, **kw)
    for p, t in zip(prompts, texts):
        print(json.dumps({"prompt": p, "completion": t[len(p) :]}, ensure_ascii=False))
    return 0


def _generate_hf(args) -> int:
    """`generate --checkpoint DIR`: a Hugging Face folder, plain or AutoDeco."""
    from jaxllm.generation import load_hf_for_generation, sampling_config  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    if args.fixed_mean or args.step is not None:
        flag = "--fixed-mean (it reads the mean T/P of autodeco-train)" if args.fixed_mean else "--step"
        raise ConfigError(f"{flag} needs --workdir, not --checkpoint")
    model, params, tokenizer, heads = load_hf_for_generation(
        args.checkpoint, args.base, autodeco=args.autodeco
    )
    if args.autodeco:
        t = 1.0 if args.temperature is None else args.temperature
        sampling = sampling_config("autodeco", temperature=t, top_p=args.top_p)
    else:
        t = 0.0 if args.temperature is None else args.temperature
        sampling = sampling_config("sample", temperature=t, top_p=args.top_p) if t > 0 else None
    return _print_generations(args, model, params, tokenizer, sampling, heads)


def _generate(args) -> int:
    if args.checkpoint is not None:
        return _generate_hf(args)
    if args.base is not None:
        raise ConfigError("--base needs --checkpoint (a head-only AutoDeco folder)")
    from jaxllm.generation import sampling_config  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    model, params, tokenizer = load_trained(args.workdir, step=args.step)
    if args.autodeco or args.fixed_mean:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        heads_module, heads_vars, info = load_heads(args.workdir, hidden_size=hidden)
        t = 1.0 if args.temperature is None else args.temperature
        sampling = sampling_config(
            "autodeco" if args.autodeco else "fixed_mean", info, temperature=t, top_p=args.top_p
        )
        return _print_generations(args, model, params, tokenizer, sampling, (heads_module, heads_vars))
    t = 0.0 if args.temperature is None else args.temperature
    sampling = sampling_config("sample", temperature=t, top_p=args.top_p) if t > 0 else None
    return _print_generations(args, model, params, tokenizer, sampling)


# --------------------------------------------------------------------------- plot
def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdirs", nargs="+", help="training workdirs or metrics.jsonl files")
    p.add_argument("--out", default="loss.png", help="output PNG path")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")


def _plot(args) -> int:
    from jaxllm.plot import plot_loss  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    path = plot_loss(args.workdirs, args.out, smooth=args.smooth)
    print(path)
    return 0


register_command("train", "train a model (see docs/training.md)", _train_args, _train)
register_command(
    "generate",
    "generate text from a trained workdir or a Hugging Face folder (plain or AutoDeco)",
    _generate_args,
    _generate,
)


# --------------------------------------------------------------------------- autodeco-train
def _autodeco_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a trained workdir; heads go to <workdir>/autodeco")
    p.add_argument("--steps", type=int, default=200, help="head optimizer steps")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate (official recipe: 5e-6 on pretrained heads)",
    )
    p.add_argument("--batch-size", type=int, help="rows per step (default: the run's batch_size)")
    p.add_argument("--base-step", type=int, help="base checkpoint step (default: latest)")
    p.add_argument(
        "--eval-batches", type=int, default=4, help="batches for the eval loss and the mean T / top-p"
    )
    p.add_argument("--variant", default="hf", help="loss conventions: hf or megatron")
    p.add_argument("--seed", type=int, default=0)


def _autodeco_train(args) -> int:
    from jaxllm.train.autodeco_run import train_heads  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    train_heads(
        args.workdir,
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        base_step=args.base_step,
        eval_batches=args.eval_batches,
        variant=args.variant,
        seed=args.seed,
    )
    return 0


register_command(
    "autodeco-train",
    "train AutoDeco heads on a trained workdir's frozen model (docs/autodeco.md)",
    _autodeco_train_args,
    _autodeco_train,
)
register_command("plot", "plot loss curves from metrics.jsonl as PNG", _plot_args, _plot)


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):  # the plugin exists but lacks a dependency
                print(f"warning: `jaxllm` subcommands from {name} are unavailable: {e}", file=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ConfigError, DatasetError, TokenIdError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only known user errors are caught below
        errors = _user_errors()
        if isinstance(e, errors):
            print(f"error: {e}", file=sys.stderr)
            return 3 if isinstance(e, NonFiniteLossError) else 2
        raise


if __name__ == "__main__":
    # Run the imported module's main: plugins register into `jaxllm.cli`, not into `__main__`.
    from jaxllm.cli import main as _main

    sys.exit(_main())
