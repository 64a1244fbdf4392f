"""The SFT -> RL experiment of docs/agent.md ("SFT and RL"), as a sequence of `jaxllm agent`
commands. The question: can on-policy RL on question/answer pairs alone teach what the
demonstrations barely show?

1. SFT demonstrations on many small worlds (seeds 1..--worlds): 1- and 2-hop questions, plus a
   few (--n-sft-3hop) 3-hop ones. Names differ per world, so the model can only fit them by
   copying names from the question and the observations (one world's names get memorised).
2. RL questions (no demonstrations used) and held-out questions on world 0, which is in no SFT
   demonstration: 1-2 hop and 3-hop, disjoint; plus held-out 3-hop questions on world 1000.
3. SFT a tiny Kimi Linear model (`configs/agent_tiny.json`, rows of 1280 tokens: a 3-hop
   demonstration is ~1,100 bytes), then on-policy RL from it on the world-0 RL questions.
4. Evaluate both models on the held-out sets (greedy; 3-hop world 0 also at T = 1).

Prints the commands, their wall times and a markdown table (exact match with Wilson 95%
intervals); writes results.json and rl_reward.png in --out.

    python tools/agent_sft_rl.py --out /tmp/agent_sft_rl

Each step is skipped when its output already exists (rerun to resume; --force to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

WIKI = (
    '{"search_top_k": 1, "n_distractors": 1, "visit_top_k": 1, "max_queries": 1, "max_urls": 1, '
    '"n_people": 30, "n_orgs": 10, "n_cities": 12, "n_countries": 4, "n_universities": 4}'
)
SYSTEM = "Answer with the tools."
UNSEEN_WORLD = 1000
#: evaluation name -> (question file, label, extra `agent run` arguments)
EVALS = {
    "h12": ("heldout.jsonl", "world 0, 1-2 hop, greedy", []),
    "h3": ("heldout_3hop.jsonl", "world 0, 3 hop, greedy", []),
    "h3_t1": ("heldout_3hop.jsonl", "world 0, 3 hop, T = 1", ["--temperature", "1", "--seed", "0"]),
    "unseen3": (
        "unseen_3hop.jsonl",
        f"world {UNSEEN_WORLD}, 3 hop, greedy",
        ["--wiki-seed", str(UNSEEN_WORLD)],
    ),
}
STAGES = {"sft": "SFT", "rl": "SFT + RL"}


def jaxllm_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "jaxllm")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-c", "import sys; from jaxllm.cli import main; sys.exit(main())"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/agent_sft_rl")
    ap.add_argument("--worlds", type=int, default=60, help="SFT worlds (seeds 1..N)")
    ap.add_argument("--n-sft", type=int, default=4800, help="1-2 hop SFT demonstrations")
    ap.add_argument("--n-sft-3hop", type=int, default=72, help="3-hop SFT demonstrations")
    ap.add_argument("--sft-steps", type=int, default=1500)
    ap.add_argument("--rl-steps", type=int, default=50)
    ap.add_argument("--rl-lr", type=float, default=2e-4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--questions-per-step", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    o = args.out
    os.makedirs(o, exist_ok=True)
    J = jaxllm_cmd()
    synth = ["agent", "synth", "--obfuscate-prob", "0", "--wiki", WIKI, "--system-prompt", SYSTEM]

    def evaluations(stage):
        run = ["agent", "run", "--workdir", f"{o}/{stage}", "--batch-size", "50"]
        return [
            (
                f"eval {stage} ({label})",
                f"{o}/pred_{stage}_{name}.jsonl",
                run + ["--data", f"{o}/{data}", "--out", f"{o}/pred_{stage}_{name}.jsonl", *extra],
            )
            for name, (data, label, extra) in EVALS.items()
        ]

    steps = [
        (
            "synth sft 1-2 hop",
            f"{o}/sft_12.jsonl",
            synth
            + [
                "--out",
                f"{o}/sft_12.jsonl",
                "--n",
                str(args.n_sft),
                "--seed",
                "1",
                "--worlds",
                str(args.worlds),
                "--hops",
                "1",
                "2",
            ],
        ),
        (
            "synth sft 3 hop",
            f"{o}/sft_3.jsonl",
            synth
            + [
                "--out",
                f"{o}/sft_3.jsonl",
                "--n",
                str(args.n_sft_3hop),
                "--seed",
                "101",
                "--wiki-seed",
                "1",
                "--worlds",
                str(args.worlds),
                "--hops",
                "3",
            ],
        ),
        (
            "synth rl 1-2 hop",
            f"{o}/train.jsonl",
            synth + ["--out", f"{o}/train.jsonl", "--n", "220", "--seed", "0", "--hops", "1", "2"],
        ),
        (
            "synth rl 3 hop",
            f"{o}/train_3hop.jsonl",
            synth + ["--out", f"{o}/train_3hop.jsonl", "--n", "130", "--seed", "0", "--hops", "3"],
        ),
        (
            "synth held-out 1-2 hop",
            f"{o}/heldout.jsonl",
            synth
            + [
                "--out",
                f"{o}/heldout.jsonl",
                "--n",
                "200",
                "--seed",
                "1",
                "--wiki-seed",
                "0",
                "--exclude",
                f"{o}/train.jsonl",
                "--hops",
                "1",
                "2",
            ],
        ),
        (
            "synth held-out 3 hop",
            f"{o}/heldout_3hop.jsonl",
            synth
            + [
                "--out",
                f"{o}/heldout_3hop.jsonl",
                "--n",
                "130",
                "--seed",
                "1",
                "--wiki-seed",
                "0",
                "--exclude",
                f"{o}/train_3hop.jsonl",
                "--hops",
                "3",
            ],
        ),
        (
            "synth unseen world 3 hop",
            f"{o}/unseen_3hop.jsonl",
            synth
            + ["--out", f"{o}/unseen_3hop.jsonl", "--n", "150", "--seed", str(UNSEEN_WORLD), "--hops", "3"],
        ),
        ("join sft data", f"{o}/sft_mix.jsonl", ("cat", [f"{o}/sft_12.jsonl", f"{o}/sft_3.jsonl"])),
        ("join rl data", f"{o}/rl_mix.jsonl", ("cat", [f"{o}/train.jsonl", f"{o}/train_3hop.jsonl"])),
        (
            "sft",
            f"{o}/sft/checkpoints",
            [
                "agent",
                "sft",
                "--data",
                f"{o}/sft_mix.jsonl",
                "--wiki-seed",
                "0",
                "--workdir",
                f"{o}/sft",
                "--config",
                "configs/agent_tiny.json",
                "--steps",
                str(args.sft_steps),
                "--strip-think",
                "--seed",
                str(args.seed),
                "--set",
                "seq_len=1280",
                "--set",
                "save_every=250",
                "--set",
                "keep_checkpoints=20",
                "--token-budget",
                "2048",
            ],
        ),
        *evaluations("sft"),
        (
            "rl",
            f"{o}/rl/checkpoints",
            [
                "agent",
                "rl",
                "--init",
                f"{o}/sft",
                "--data",
                f"{o}/rl_mix.jsonl",
                "--workdir",
                f"{o}/rl",
                "--steps",
                str(args.rl_steps),
                "--lr",
                repr(args.rl_lr),
                "--group",
                str(args.group),
                "--questions-per-step",
                str(args.questions_per_step),
                "--seed",
                str(args.seed),
            ],
        ),
        *evaluations("rl"),
    ]
    times_path = os.path.join(o, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for name, output, cmd in steps:
        if os.path.exists(output) and not args.force:
            print(f"[skip] {name}: {output} exists", flush=True)
            continue
        if cmd[0] == "cat":
            with open(output, "w") as f:
                for part in cmd[1]:
                    f.write(open(part).read())
            continue
        line = "jaxllm " + " ".join(shlex.quote(c) for c in cmd)
        print(f"[run] {name}: {line}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(J + cmd)
        if p.returncode:
            print(f"[fail] {name}: exit {p.returncode}", flush=True)
            return p.returncode
        times[name] = {"seconds": time.perf_counter() - t0, "command": line}
        json.dump(times, open(times_path, "w"), indent=1)
    summarize(o, times)
    return 0


def summarize(o: str, times: dict) -> dict:
    from jaxllm.agent import evaluate, train  # noqa: PLC0415 (the driver stays jax-free; its stages run as subprocesses)

    def em(path):
        recs = [json.loads(x) for x in open(path) if x.strip()]
        r = train.exact_match_rewards([x["prediction"] for x in recs], [x["answer"] for x in recs])
        k, n = int(r.sum()), len(recs)
        lo, hi = evaluate.wilson_interval(k, n)
        answered = sum(x["status"] == "answered" for x in recs) / n
        return {"em": k / n, "k": k, "n": n, "ci95": [lo, hi], "answered": answered}

    res = {}
    for stage in STAGES:
        for name in EVALS:
            p = f"{o}/pred_{stage}_{name}.jsonl"
            if os.path.exists(p):
                res[f"{stage}_{name}"] = em(p)
    rl_metrics = f"{o}/rl/metrics.jsonl"
    if os.path.exists(rl_metrics):
        m = [json.loads(x) for x in open(rl_metrics) if x.strip()]
        res["rl_reward"] = [x["reward"] for x in m]
        try:
            import matplotlib  # noqa: PLC0415 (matplotlib optional here: no plot without it)

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)
            import numpy as np  # noqa: PLC0415 (the driver stays jax-free; numpy only for the plot)

            r = np.array(res["rl_reward"])
            w = min(10, len(r))
            roll = np.convolve(r, np.ones(w) / w, mode="valid")
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.plot(np.arange(1, len(r) + 1), r, ".", alpha=0.35, label="batch mean reward")
            ax.plot(np.arange(w, len(r) + 1), roll, "-", label=f"rolling mean ({w} steps)")
            ax.set_xlabel("RL step")
            ax.set_ylabel("exact-match reward (T=1 rollouts)")
            ax.set_ylim(0, 1)
            ax.legend(loc="lower right")
            ax.set_title("agentic RL on the simulated wiki (tiny Kimi Linear, CPU)")
            fig.tight_layout()
            fig.savefig(f"{o}/rl_reward.png", dpi=110)
        except ImportError:
            pass
    res["times"] = times
    json.dump(res, open(f"{o}/results.json", "w"), indent=1)
    print("\n| held-out set | stage | EM | 95% CI (Wilson) | answered |")
    print("|---|---|---|---|---|")
    for name, (_, label, _) in EVALS.items():
        for stage, stage_name in STAGES.items():
            r = res.get(f"{stage}_{name}")
            if r:
                print(
                    f"| {label} | {stage_name} | {r['em']:.3f} ({r['k']}/{r['n']}) | "
                    f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['answered']:.3f} |"
                )
    for name, t in times.items():
        print(f"- {name}: {t['seconds']:.0f} s: `{t['command']}`")
    return res


if __name__ == "__main__":
    raise SystemExit(main())
