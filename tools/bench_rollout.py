#!/usr/bin/env python
"""Rollout throughput of the three ReAct loops, measured in the same run on the same episodes:

* ``scan_jnp``:  ``rollout.scan_rollout(env="jnp")``, one compiled ``lax.scan`` over turns with the
  simulated wiki's environment step in jnp (no host callback for canonical search/visit/answer
  turns; anything else goes to the host through ``io_callback``);
* ``scan_host``: the same compiled loop with ``env="host"``: every turn is judged on the host
  through one ``io_callback`` per turn;
* ``segmented``: ``rollout.segmented_rollout``, the Python loop (one jitted call per decoded token
  or appended chunk).

Model: random init of ``--config`` (vocab raised to the byte tokenizer's 259 when smaller).
Episodes (``--mode``):

* ``replay`` (default): ``--batch`` questions synthesized on the simulated wiki
  (``synth.synthesize``), each replaying its demonstration: every assistant turn is forced
  (``forced_turns``), so the turns are real search/visit/answer calls and the environment does
  real work; the model still runs on every token (a forced token costs the same decode step as a
  sampled one).
* ``free``: only ``<think>\\n`` is forced; the random model writes the rest (greedy), its turns
  are not canonical calls, so both scan variants go through the host for every turn.

Baseline (``--baseline REV``, default the last commit before the inference engine): the same
scan and segmented loops as they were at REV, one batch-1 cache per row under ``jax.vmap``, loaded
from git (``scan_jnp_per_row``, ``segmented_per_row``); ``speedup_*_vs_per_row`` compares them
with today's loops on the same episodes (``--baseline none`` skips them).

``--generate``: also one line per batch size (1, 8, 64) of ``jaxllm.complete`` on ragged prompts
(8-128 tokens, 32 new tokens, no stops), tokens/s of the batch against the same prompts decoded
one at a time (batch 1) in the same run.

Timing: one untimed warm-up call per loop (compilation; reported as ``first_s``), then ``--reps``
timed calls interleaved (scan_jnp, scan_host, segmented, scan_jnp, ...) so machine noise hits all
alike; ``seconds`` is the median. Tokens per call: ``model_tokens`` = assistant-turn tokens (decoded
one at a time by the model, sampled or forced), ``all_tokens`` = every token of the rows (prompt,
turns, observations and chat framing: all of them go through the model). Rates are tokens /
median seconds. The three loops must give identical rows (``identical``). Prints one JSON line.

    python tools/bench_rollout.py --config configs/tiny.json --batch 8 --max-turns 4 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxllm  # noqa: E402
from jaxllm.agent import rollout, synth  # noqa: E402
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig  # noqa: E402
from jaxllm.data.tokenizers import ByteTokenizer  # noqa: E402
from jaxllm.models import KimiLinear  # noqa: E402
from jaxllm.models.config import KimiLinearConfig  # noqa: E402

LOOPS = ("scan_jnp", "scan_host", "segmented")
PER_ROW = ("scan_jnp_per_row", "segmented_per_row")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASELINE = "c1b2420"  # the last commit whose rollouts kept one cache per row


def rollout_at(rev: str):
    """`jaxllm.agent.rollout` as it was at git revision `rev` (a module object)."""
    try:
        src = subprocess.run(
            ["git", "-C", ROOT, "show", f"{rev}:jaxllm/agent/rollout.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--baseline {rev}: cannot read jaxllm/agent/rollout.py from git ({e})") from None
    spec = importlib.util.spec_from_loader(f"rollout_at_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(src, f"{rev}:jaxllm/agent/rollout.py", "exec"), module.__dict__)
    return module


def bench_generate(model, params, reps: int, seed: int) -> list[dict]:
    """tokens/s of one ragged batch vs the same prompts one at a time."""
    rng = np.random.default_rng(seed)
    rows, n_new = [], 32
    for batch in (1, 8, 64):
        prompts = [rng.integers(3, 259, int(n)).tolist() for n in rng.integers(8, 129, batch)]
        pad = dict(pad_to=128)  # one bucket for every call: compile once
        together = lambda: jaxllm.complete(model, params, prompts, n_new, **pad).tokens.block_until_ready()  # noqa: E731

        def alone():
            for p in prompts:
                jaxllm.complete(model, params, [p], n_new, **pad).tokens.block_until_ready()

        together(), alone()  # compile
        t_batch, t_alone = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            together()
            t_batch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            alone()
            t_alone.append(time.perf_counter() - t0)
        sec, sec1 = float(np.median(t_batch)), float(np.median(t_alone))
        tokens = batch * n_new
        rows.append(
            dict(
                bench="generate",
                batch=batch,
                new_tokens=tokens,
                prompt_tokens=sum(len(p) for p in prompts),
                seconds=round(sec, 3),
                new_tok_s=round(tokens / sec, 1),
                one_at_a_time_s=round(sec1, 3),
                speedup_vs_one_at_a_time=round(sec1 / sec, 2),
            )
        )
    return rows


def episodes(args, tok):
    """(questions, forced_turns) for the batch."""
    wiki = SimulatedWiki(WikiConfig(seed=args.seed))
    if args.mode == "free":
        recs = synth.synthesize(args.batch, seed=args.seed, wiki=wiki)
        return wiki, [r["question"] for r in recs], [["<think>\n"] for _ in recs]
    recs, n = [], args.batch
    while len(recs) < args.batch:  # demonstrations whose turns fit the per-turn cap
        recs = [
            r
            for r in synth.synthesize(n, seed=args.seed, wiki=wiki)
            if all(
                len(tok.encode(m["content"])) <= args.turn_tokens
                for m in r["trajectory"]
                if m["role"] == "assistant"
            )
        ][: args.batch]
        n *= 2
    forced = [[m["content"] for m in r["trajectory"] if m["role"] == "assistant"] for r in recs]
    return wiki, [r["question"] for r in recs], forced


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.json")
    ap.add_argument("--kda-impl", default=None, help="override the config's kda_impl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=512)
    ap.add_argument("--token-budget", type=int, default=6144)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--mode", default="replay", choices=["replay", "free"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the per-row-cache loops, or 'none'")
    ap.add_argument("--generate", action="store_true", help="also time jaxllm.complete at batch 1/8/64")
    args = ap.parse_args(argv)

    tok = ByteTokenizer()
    overrides = {} if args.kda_impl is None else {"kda_impl": args.kda_impl}
    config = KimiLinearConfig.from_file(args.config, **overrides)
    if config.vocab_size < tok.vocab_size:
        config = dataclasses.replace(config, vocab_size=tok.vocab_size)
    model = KimiLinear(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), jnp.zeros((1, 4), jnp.int32))
    wiki, questions, forced = episodes(args, tok)
    executor = synth.wiki_executor(wiki)
    cfg = rollout.RolloutConfig(
        max_turns=args.max_turns,
        turn_tokens=args.turn_tokens,
        token_budget=args.token_budget,
        chunk=args.chunk,
    )
    common = dict(config=cfg, forced_turns=forced)
    calls = {
        "scan_jnp": lambda: rollout.scan_rollout(
            model, params, tok, executor, questions, env="jnp", **common
        ),
        "scan_host": lambda: rollout.scan_rollout(
            model, params, tok, executor, questions, env="host", **common
        ),
        "segmented": lambda: rollout.segmented_rollout(model, params, tok, executor, questions, **common),
    }
    names = LOOPS
    if args.baseline != "none":
        old = rollout_at(args.baseline)
        old_cfg = old.RolloutConfig(**dataclasses.asdict(cfg))
        old_common = dict(config=old_cfg, forced_turns=forced)
        calls["scan_jnp_per_row"] = lambda: old.scan_rollout(
            model, params, tok, executor, questions, env="jnp", **old_common
        )
        calls["segmented_per_row"] = lambda: old.segmented_rollout(
            model, params, tok, executor, questions, **old_common
        )
        names = LOOPS + PER_ROW
    first, results, times = {}, {}, {k: [] for k in names}
    for k in names:
        t0 = time.perf_counter()
        results[k] = calls[k]()
        first[k] = time.perf_counter() - t0
    for _ in range(args.reps):
        for k in names:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    ref = results["segmented"]
    identical = all(
        np.array_equal(results[k].tokens, ref.tokens)
        and np.array_equal(results[k].kind, ref.kind)
        and np.array_equal(results[k].status, ref.status)
        and results[k].messages == ref.messages
        for k in names
    )
    model_tokens = int(ref.assistant_mask.sum())
    all_tokens = int(ref.lengths.sum())
    loops = {}
    for k in names:
        sec = float(np.median(times[k]))
        loops[k] = dict(
            seconds=round(sec, 3),
            first_s=round(first[k], 2),
            model_tok_s=round(model_tokens / sec, 1),
            all_tok_s=round(all_tokens / sec, 1),
            host_callbacks=results[k].host_callbacks,
        )

    def ratio(a, b):  # how many times faster loop a is than loop b (all rates share the tokens)
        return round(loops[b]["seconds"] / loops[a]["seconds"], 3)

    row = dict(
        bench="rollout",
        config=os.path.basename(args.config),
        kda_impl=config.kda_impl,
        device=str(jax.devices()[0].platform),
        cpus=os.cpu_count(),
        machine=platform.machine(),
        jax=jax.__version__,
        mode=args.mode,
        batch=args.batch,
        max_turns=args.max_turns,
        turn_tokens=args.turn_tokens,
        token_budget=args.token_budget,
        reps=args.reps,
        model_tokens=model_tokens,
        all_tokens=all_tokens,
        turns=int(ref.turns.sum()),
        statuses=ref.status_names(),
        loops=loops,
        speedup_scan_jnp_vs_segmented=ratio("scan_jnp", "segmented"),
        speedup_scan_host_vs_segmented=ratio("scan_host", "segmented"),
        speedup_scan_jnp_vs_scan_host=ratio("scan_jnp", "scan_host"),
        identical=bool(identical),
    )
    if args.baseline != "none":
        row["baseline"] = args.baseline
        row["speedup_scan_jnp_vs_per_row"] = ratio("scan_jnp", "scan_jnp_per_row")
        row["speedup_segmented_vs_per_row"] = ratio("segmented", "segmented_per_row")
    print(json.dumps(row), flush=True)
    if args.generate:
        for line in bench_generate(model, params, args.reps, args.seed):
            print(json.dumps(line), flush=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
