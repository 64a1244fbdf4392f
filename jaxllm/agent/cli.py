"""``jaxllm agent synth|eval|sft|rl|run``: the agent subcommands of the ``jaxllm`` command line.

Imported by ``jaxllm.cli`` (it lists this module in ``PLUGIN_MODULES``); registers ``agent``.

    jaxllm agent synth --out train.jsonl --n 1000 --seed 0 [--hops 1 2 3] [--obfuscate-prob 0.3]
                       [--wiki-seed W] [--worlds N] [--exclude other.jsonl] [--wiki JSON]
                       [--system-prompt TEXT]
    jaxllm agent eval gold.jsonl [preds.jsonl] [--k 1 3]
    jaxllm agent sft --data train.jsonl --workdir W [--config configs/agent_tiny.json] [--steps N]
                     [--lr LR] [--batch-size B] [--seed S] [--strip-think] [--init WORKDIR]
                     [--wiki-seed W] [--token-budget T] [--set field=value ...]
    jaxllm agent rl --init SFT_WORKDIR [--init-step N] --data train.jsonl --workdir W [--steps N] [--lr LR]
                    [--group G] [--questions-per-step Q] [--eps-low 0.2] [--eps-high 0.28] [--seed S]
                    [--keep-limit-hits]
    jaxllm agent run --workdir W (--data questions.jsonl | --question TEXT) [--out preds.jsonl]
                     [--temperature T] [--batch-size B] [--seed S] [--step N] [--wiki-seed W]
    jaxllm agent run --checkpoint HF_DIR (--data questions.jsonl | --question TEXT) [--out ...]
                     [--max-turns 4] [--turn-tokens 128] [--token-budget 1536] [--wiki JSON]
                     [--wiki-seed W] [--rollout scan|segmented] [--temperature T] ...

``synth`` and ``eval`` delegate to the modules' own ``main`` (``jaxllm.agent.synth.main``,
``jaxllm.agent.evaluate.main``) unless ``--wiki``/``--system-prompt`` are given (then the records
also carry the ``wiki`` config so that ``sft`` trains for that world). ``sft``/``rl``/``run`` call
``jaxllm.agent.train``. ``run --checkpoint`` runs a Hugging Face model folder (any registered
model_type, its ``tokenizer.json``; the Qwen3 chat template and Tongyi's system prompt when the
tokenizer is a chat model's, see ``train.load_hf_agent``) with the rollout limits and wiki given
as flags, through the scan loop by default. Bad input (missing files, malformed JSONL, invalid values, a workdir
without a checkpoint) prints one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import Counter

from jaxllm.cli import register_command
from jaxllm.errors import CheckpointError, ConfigError
from jaxllm.run_dir import load_trained, require_run

__all__ = ["add_arguments", "run"]


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--wiki must be a JSON object of WikiConfig fields ({e.msg})") from None
    if not isinstance(v, dict):
        raise ValueError("--wiki must be a JSON object of WikiConfig fields")
    return v


# ------------------------------------------------------------------------------------ synth/eval


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--n", type=int, required=True, help="number of questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the wiki and the sampler")
    p.add_argument("--hops", type=int, nargs="+", default=None, help="hop counts to draw (default 1 2 3)")
    p.add_argument("--obfuscate-prob", type=float, default=None, help="default 0.3")
    p.add_argument("--wiki-seed", type=int, default=None, help="seed of the world (default: --seed)")
    p.add_argument("--exclude", default=None, help="JSONL whose questions must not be drawn")
    p.add_argument(
        "--wiki",
        default=None,
        help='WikiConfig fields as JSON, e.g. \'{"search_top_k": 1, "n_people": 200}\'',
    )
    p.add_argument("--system-prompt", default=None, help="system prompt of the trajectories")
    p.add_argument(
        "--worlds",
        type=int,
        default=None,
        help="spread the questions over this many worlds, seeds W, W+1, ... (default 1)",
    )


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
    if args.worlds is not None:
        argv += ["--worlds", str(args.worlds)]
    return argv


def _synth_custom(args) -> int:
    """synth with a custom wiki config / system prompt (records carry ``wiki``)."""
    from jaxllm.agent import synth  # noqa: PLC0415 (loads jax: CLI --help stays fast)
    from jaxllm.agent.wiki import WikiConfig  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    wiki = _json_object(args.wiki) if args.wiki else {}
    if "seed" in wiki:
        raise ValueError("--wiki must not hold 'seed'; use --wiki-seed")
    wiki_seed = args.seed if args.wiki_seed is None else args.wiki_seed
    try:
        WikiConfig(seed=wiki_seed, **wiki)
    except TypeError as e:
        raise ValueError(f"--wiki: {e}") from None
    exclude = {r["question"] for r in synth.read_jsonl(args.exclude)} if args.exclude else set()
    records = synth.synthesize_worlds(
        args.n,
        args.worlds or 1,
        seed=args.seed,
        wiki_seed=wiki_seed,
        wiki_fields=wiki,
        hops=tuple(args.hops or (1, 2, 3)),
        obfuscate_prob=0.3 if args.obfuscate_prob is None else args.obfuscate_prob,
        system_prompt=args.system_prompt,
        exclude=exclude,
    )
    for r in records:
        r["wiki"] = {"seed": r["wiki_seed"], **wiki}
    synth.write_jsonl(records, args.out)
    print(json.dumps({"out": args.out, "n": len(records), "seed": args.seed, "wiki_seed": wiki_seed}))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("gold", help="JSONL of {question, answer[, prediction(s)]}")
    p.add_argument("pred", nargs="?", help="JSONL of {question, prediction(s)}, joined with GOLD by question")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="k values for pass@k")


def _eval_argv(args) -> list[str]:
    return [args.gold] + ([args.pred] if args.pred else []) + ["--k", *map(str, args.k)]


def _delegate(module: str, to_argv):
    def go(args) -> int:
        return importlib.import_module(module).main(to_argv(args))

    return go


def _synth(args) -> int:
    if args.wiki is not None or args.system_prompt is not None:
        return _synth_custom(args)
    return _delegate("jaxllm.agent.synth", _synth_argv)(args)


# ------------------------------------------------------------------------------------ sft/rl/run


def _common_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL of synthesized records")
    p.add_argument("--workdir", required=True, help="output workdir (checkpoint, metrics, configs)")
    p.add_argument("--steps", type=int, default=None, help="optimizer updates")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any RunConfig override (repeatable), e.g. --set weight_decay=0",
    )


def _overrides(args, extra=()) -> list[str]:
    out = list(extra)
    for flag, field in (
        ("steps", "steps"),
        ("lr", "lr"),
        ("warmup_steps", "warmup_steps"),
        ("seed", "seed"),
        ("batch_size", "batch_size"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            out.append(f"{field}={v}")
    return out + list(args.set)


def _sft_args(p: argparse.ArgumentParser) -> None:
    _common_train_args(p)
    p.add_argument("--config", default="configs/agent_tiny.json", help="RunConfig JSON (model, seq_len, ...)")
    p.add_argument("--batch-size", type=int, default=None, help="packed rows per step")
    p.add_argument("--strip-think", action="store_true", help="train on the bare actions (no <think>)")
    p.add_argument(
        "--init",
        default=None,
        help="start from the params of this agent workdir (fresh optimizer); its agent settings must match",
    )
    p.add_argument("--wiki", default=None, help="WikiConfig fields as JSON (default: the records' own)")
    p.add_argument(
        "--wiki-seed",
        type=int,
        default=None,
        help="the world the agent acts in (default: the records'; required when they "
        "come from several worlds, e.g. synth --worlds N)",
    )
    p.add_argument("--max-turns", type=int, default=4, help="rollout limit stored with the agent")
    p.add_argument("--turn-tokens", type=int, default=128, help="rollout limit stored with the agent")
    p.add_argument("--token-budget", type=int, default=1536, help="rollout limit stored with the agent")


def _sft(args) -> int:
    from jaxllm.agent import train  # noqa: PLC0415 (loads jax: CLI --help stays fast)
    from jaxllm.train.config import load_config  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    config = load_config(args.config, _overrides(args, ["log_every=50"]))
    records = train.read_records(args.data, need_trajectory=True)
    settings = train.settings_from_records(
        records,
        _json_object(args.wiki) if args.wiki else None,
        world=args.wiki_seed,
        max_turns=args.max_turns,
        turn_tokens=args.turn_tokens,
        token_budget=args.token_budget,
    )
    if args.init is not None:
        base = train.load_settings(args.init)
        if base != settings:
            raise ValueError(
                f"--init {args.init!r} was trained with other agent settings ({base}) than these ({settings})"
            )
    out = train.train_sft(
        config, args.workdir, records, settings, strip=args.strip_think, init_workdir=args.init
    )
    print(json.dumps(out))
    return 0


def _rl_args(p: argparse.ArgumentParser) -> None:
    _common_train_args(p)
    p.add_argument("--init", required=True, help="workdir to start from (an `agent sft` or `agent rl` run)")
    p.add_argument(
        "--init-step",
        type=int,
        default=None,
        help="checkpoint step of --init to start from (default: the latest)",
    )
    p.add_argument("--group", type=int, default=8, help="rollouts per question (G)")
    p.add_argument("--questions-per-step", type=int, default=8, help="questions per update")
    p.add_argument("--eps-low", type=float, default=0.2, help="ratio clip below: 1 - eps_low")
    p.add_argument("--eps-high", type=float, default=0.28, help="ratio clip above: 1 + eps_high")
    p.add_argument("--rollout", choices=("scan", "segmented"), default="scan")
    p.add_argument(
        "--keep-limit-hits",
        action="store_true",
        help="keep trajectories that hit a turn/token limit in the loss as reward-0 "
        "negatives (an ablation; the report drops them)",
    )


def _rl(args) -> int:

    from jaxllm.agent import train  # noqa: PLC0415 (loads jax: CLI --help stays fast)
    from jaxllm.train.config import load_config  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    try:
        path = require_run(args.init)
    except ConfigError as e:
        raise ValueError(f"--init: {e}") from None
    defaults = ["lr=1e-4", "warmup_steps=0", "min_lr_ratio=1.0", "weight_decay=0.0", "log_every=1"]
    config = load_config(path, _overrides(args, defaults))
    records = train.read_records(args.data)
    out = train.train_rl(
        config,
        args.workdir,
        args.init,
        records,
        init_step=args.init_step,
        group=args.group,
        questions_per_step=args.questions_per_step,
        eps_low=args.eps_low,
        eps_high=args.eps_high,
        impl=args.rollout,
        drop_statuses=() if args.keep_limit_hits else train.DROP_STATUSES,
    )
    print(json.dumps(out))
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    agent = p.add_mutually_exclusive_group(required=True)
    agent.add_argument("--workdir", help="a trained agent workdir (`agent sft` / `agent rl`)")
    agent.add_argument(
        "--checkpoint",
        help="a Hugging Face model folder (config.json, safetensors, tokenizer.json) of any "
        "registered model_type; the Qwen3 chat format and Tongyi's system prompt when its "
        "tokenizer is a chat model's",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL of {question[, answer]}")
    src.add_argument("--question", help="one question")
    p.add_argument(
        "--out",
        default=None,
        help="write {question, answer, prediction, status, turns, trajectory} JSONL here",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--rollout",
        choices=("scan", "segmented"),
        default=None,
        help="scan (default): one compiled loop (byte tokenizer or byte-level BPE); segmented: any tokenizer",
    )
    p.add_argument(
        "--wiki-seed",
        type=int,
        default=None,
        help="act in this world instead of the one the agent was trained for (same "
        "wiki config otherwise): tests whether it reads or remembers; with --checkpoint, the world (default 0)",
    )
    # A checkpoint has no agent workdir: its limits and world come from flags (AgentSettings' defaults).
    p.add_argument("--wiki", default=None, help="--checkpoint: WikiConfig fields as JSON")
    p.add_argument("--max-turns", type=int, default=None, help="--checkpoint: assistant turns (default 4)")
    p.add_argument(
        "--turn-tokens", type=int, default=None, help="--checkpoint: tokens per turn (default 128)"
    )
    p.add_argument(
        "--token-budget", type=int, default=None, help="--checkpoint: tokens per episode (default 1536)"
    )


def _run(args) -> int:
    import dataclasses  # noqa: PLC0415 (CLI --help stays light: dataclasses loads inspect)

    from jaxllm.agent import evaluate, synth, train  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.question is not None:
        if not args.question.strip():
            raise ValueError("--question is empty")
        records = [{"question": args.question}]
    else:
        records = list(synth.read_jsonl(args.data)) if _exists(args.data) else None
        if not records:
            raise ValueError(f"{args.data}: no records")
        for i, r in enumerate(records, 1):
            if not isinstance(r, dict) or not isinstance(r.get("question"), str):
                raise ValueError(f"{args.data}:{i}: missing 'question'")
    if args.limit is not None:
        records = records[: args.limit]
    if args.checkpoint is not None:
        model, params, tok, settings, fmt, impl = _load_checkpoint_agent(args, records)
    else:
        given = [
            f for f in ("wiki", "max_turns", "turn_tokens", "token_budget") if getattr(args, f) is not None
        ]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag} applies to --checkpoint; a workdir keeps its own in agent.json")
        settings = train.load_settings(args.workdir)
        if args.wiki_seed is not None:
            settings = dataclasses.replace(settings, wiki={**settings.wiki, "seed": args.wiki_seed})
        train.check_world(records, settings, "questions")
        model, params, tok = load_trained(args.workdir, args.step)
        fmt, impl = None, args.rollout or "scan"
    sampling = None
    if args.temperature > 0:
        from jaxllm.ops.sampling import SamplingConfig  # noqa: PLC0415 (loads jax: CLI --help stays fast)

        sampling = SamplingConfig(mode="sample", temperature=args.temperature)
    preds = train.run_questions(
        model,
        params,
        tok,
        settings,
        [r["question"] for r in records],
        batch_size=args.batch_size,
        sampling=sampling,
        seed=args.seed,
        impl=impl,
        chat_format=fmt,
    )
    out = []
    for r, p in zip(records, preds):
        rec = {"question": r["question"]}
        if "answer" in r:
            rec["answer"] = r["answer"]
        rec.update({k: p[k] for k in ("prediction", "status", "turns", "trajectory")})
        out.append(rec)
    if args.out:
        synth.write_jsonl(out, args.out)
    summary = {"n": len(out), "status": dict(Counter(p["status"] for p in out))}
    golds = [r for r in out if "answer" in r]
    if golds:
        rewards = train.exact_match_rewards([r["prediction"] for r in golds], [r["answer"] for r in golds])
        k = int(rewards.sum())
        lo, hi = evaluate.wilson_interval(k, len(golds))
        summary.update({"em": k / len(golds), "em_ci95": [lo, hi], "scored": len(golds)})
    if args.question is not None:
        summary["prediction"] = out[0]["prediction"]
    if args.out:
        summary["out"] = args.out
    print(json.dumps(summary))
    return 0


def _load_checkpoint_agent(args, records):
    """``run --checkpoint``: (model, params, tokenizer, settings, chat format, rollout impl)."""
    from jaxllm.agent import train  # noqa: PLC0415 (loads jax: CLI --help stays fast)

    if args.step is not None:
        raise ValueError("--step applies to --workdir; a Hugging Face checkpoint has one set of weights")
    wiki = _json_object(args.wiki) if args.wiki else {}
    if "seed" in wiki:
        raise ValueError("--wiki must not hold 'seed'; use --wiki-seed")
    wiki["seed"] = 0 if args.wiki_seed is None else args.wiki_seed
    train.check_world(records, train.AgentSettings("", wiki), "questions")  # before any weights
    model, params, tok, settings, fmt = train.load_hf_agent(
        args.checkpoint,
        wiki=wiki,
        max_turns=args.max_turns,
        turn_tokens=args.turn_tokens,
        token_budget=args.token_budget,
    )
    return model, params, tok, settings, fmt, args.rollout or "scan"


def _exists(path: str) -> bool:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return True


_SUB = {
    "synth": ("synthesize k-hop questions with demonstration trajectories (JSONL)", _synth_args, _synth),
    "eval": (
        "exact match, F1 and pass@k over JSONL predictions",
        _eval_args,
        _delegate("jaxllm.agent.evaluate", _eval_argv),
    ),
    "sft": ("supervised fine-tuning on synthesized trajectories (assistant tokens only)", _sft_args, _sft),
    "rl": (
        "on-policy agentic RL (groups, 0/1 EM reward, leave-one-out advantage, clip-higher)",
        _rl_args,
        _rl,
    ),
    "run": (
        "run a trained agent on questions in the simulated wiki; predictions + trajectories",
        _run_args,
        _run,
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="agent_command", required=True, metavar="{" + ",".join(_SUB) + "}")
    for name, (help_, add, _) in _SUB.items():
        add(sub.add_parser(name, help=help_, description=help_))


def run(args) -> int:
    _, _, fn = _SUB[args.agent_command]
    try:
        return fn(args)
    except (
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        KeyError,
        RuntimeError,
        CheckpointError,
        json.JSONDecodeError,
    ) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        msg = " ".join(msg.split()) if msg.count("\n") else msg
        print(f"error: agent {args.agent_command}: {msg}", file=sys.stderr)
        return 2


register_command("agent", "DeepResearch agent: synth, eval, sft, rl, run", add_arguments, run)
