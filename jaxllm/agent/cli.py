"""``jaxllm agent synth|eval``: the agent subcommands of the ``jaxllm`` command line.

Imported by ``jaxllm.cli`` (it lists this module in ``PLUGIN_MODULES``); registers ``agent``.

    jaxllm agent synth --out train.jsonl --n 1000 --seed 0 [--hops 1 2 3] [--obfuscate-prob 0.3]
                       [--wiki-seed W] [--exclude other.jsonl]
    jaxllm agent eval gold.jsonl [preds.jsonl] [--k 1 3]

Both delegate to the modules' own ``main`` (``jaxllm.agent.synth.main``,
``jaxllm.agent.evaluate.main``), so ``python -m jaxllm.agent.synth ...`` and ``jaxllm agent synth
...`` behave the same. Bad input (missing files, malformed JSONL, invalid values) prints one
``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxllm.cli import register_command

__all__ = ["add_arguments", "run"]


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--n", type=int, required=True, help="number of questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the wiki and the sampler")
    p.add_argument("--hops", type=int, nargs="+", default=None, help="hop counts to draw (default 1 2 3)")
    p.add_argument("--obfuscate-prob", type=float, default=None, help="default 0.3")
    p.add_argument("--wiki-seed", type=int, default=None, help="seed of the world (default: --seed)")
    p.add_argument("--exclude", default=None, help="JSONL whose questions must not be drawn")


def _synth_argv(args) -> list[str]:
    argv = ["--out", args.out, "--n", str(args.n), "--seed", str(args.seed)]
    if args.hops is not None:
        argv += ["--hops", *map(str, args.hops)]
    if args.obfuscate_prob is not None:
        argv += ["--obfuscate-prob", repr(args.obfuscate_prob)]
    if args.wiki_seed is not None:
        argv += ["--wiki-seed", str(args.wiki_seed)]
    if args.exclude is not None:
        argv += ["--exclude", args.exclude]
    return argv


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("gold", help="JSONL of {question, answer[, prediction(s)]}")
    p.add_argument("pred", nargs="?", help="JSONL of {question, prediction(s)}, joined with GOLD by question")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="k values for pass@k")


def _eval_argv(args) -> list[str]:
    return [args.gold] + ([args.pred] if args.pred else []) + ["--k", *map(str, args.k)]


_SUB = {
    "synth": ("synthesize k-hop questions with demonstration trajectories (JSONL)", _synth_args,
              _synth_argv, "jaxllm.agent.synth"),
    "eval": ("exact match, F1 and pass@k over JSONL predictions", _eval_args, _eval_argv,
             "jaxllm.agent.evaluate"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="agent_command", required=True, metavar="{" + ",".join(_SUB) + "}")
    for name, (help_, add, _, _) in _SUB.items():
        add(sub.add_parser(name, help=help_, description=help_))


def run(args) -> int:
    import importlib

    _, _, to_argv, module = _SUB[args.agent_command]
    main = importlib.import_module(module).main
    try:
        return main(to_argv(args))
    except (ValueError, FileNotFoundError, IsADirectoryError, KeyError, RuntimeError,
            json.JSONDecodeError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"error: agent {args.agent_command}: {msg}", file=sys.stderr)
        return 2


register_command("agent", "DeepResearch agent: synth (data synthesis), eval (EM/F1/pass@k)",
                 add_arguments, run)
