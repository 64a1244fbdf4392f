"""The SFT -> RL experiment of docs/agent.md ("SFT and RL"), as a sequence of `jaxllm agent`
commands: synthesize disjoint train / held-out questions on one small simulated wiki, SFT a tiny
Kimi Linear model on the demonstrations, evaluate it on the held-out questions, run on-policy RL
from the SFT checkpoint, evaluate again. Prints the commands, their wall times and a markdown
table (exact match with Wilson 95% intervals); writes results.json and rl_reward.png in --out.

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

WIKI = ('{"search_top_k": 1, "n_distractors": 1, "visit_top_k": 1, "max_queries": 1, "max_urls": 1, '
        '"n_people": 30, "n_orgs": 10, "n_cities": 12, "n_countries": 4, "n_universities": 4}')
SYSTEM = "Answer with the tools."


def jaxllm_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "jaxllm")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-c", "import sys; from jaxllm.cli import main; sys.exit(main())"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/agent_sft_rl")
    ap.add_argument("--n-train", type=int, default=220)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--rl-lr", type=float, default=1e-4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--questions-per-step", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    o = args.out
    os.makedirs(o, exist_ok=True)
    J = jaxllm_cmd()

    def evaluations(stage):
        """Held-out evaluation of one stage's model, greedy and at temperature 1."""
        run = ["agent", "run", "--workdir", f"{o}/{stage}", "--data", f"{o}/heldout.jsonl", "--batch-size", "50"]
        return [(f"eval {stage} (greedy)", f"{o}/pred_{stage}_greedy.jsonl",
                 run + ["--out", f"{o}/pred_{stage}_greedy.jsonl"]),
                (f"eval {stage} (T=1)", f"{o}/pred_{stage}_t1.jsonl",
                 run + ["--out", f"{o}/pred_{stage}_t1.jsonl", "--temperature", "1", "--seed", "0"])]

    steps = [
        ("synth train", f"{o}/train.jsonl",
         ["agent", "synth", "--out", f"{o}/train.jsonl", "--n", str(args.n_train), "--seed", "0",
          "--hops", "1", "2", "--obfuscate-prob", "0", "--wiki", WIKI, "--system-prompt", SYSTEM]),
        ("synth held-out", f"{o}/heldout.jsonl",
         ["agent", "synth", "--out", f"{o}/heldout.jsonl", "--n", str(args.n_heldout), "--seed", "1",
          "--wiki-seed", "0", "--exclude", f"{o}/train.jsonl", "--hops", "1", "2",
          "--obfuscate-prob", "0", "--wiki", WIKI, "--system-prompt", SYSTEM]),
        ("sft", f"{o}/sft/checkpoints",
         ["agent", "sft", "--data", f"{o}/train.jsonl", "--workdir", f"{o}/sft", "--config",
          "configs/agent_tiny.json", "--steps", str(args.sft_steps), "--strip-think",
          "--seed", str(args.seed)]),
        *evaluations("sft"),
        ("rl", f"{o}/rl/checkpoints",
         ["agent", "rl", "--init", f"{o}/sft", "--data", f"{o}/train.jsonl", "--workdir", f"{o}/rl",
          "--steps", str(args.rl_steps), "--lr", repr(args.rl_lr), "--group", str(args.group),
          "--questions-per-step", str(args.questions_per_step), "--seed", str(args.seed)]),
        *evaluations("rl"),
    ]
    times_path = os.path.join(o, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for name, output, cmd in steps:
        line = "jaxllm " + " ".join(shlex.quote(c) for c in cmd)
        if os.path.exists(output) and not args.force:
            print(f"[skip] {name}: {output} exists", flush=True)
            continue
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
    from jaxllm.agent import evaluate, train

    def em(path):
        recs = [json.loads(x) for x in open(path) if x.strip()]
        r = train.exact_match_rewards([x["prediction"] for x in recs], [x["answer"] for x in recs])
        k, n = int(r.sum()), len(recs)
        lo, hi = evaluate.wilson_interval(k, n)
        answered = sum(x["status"] == "answered" for x in recs) / n
        by_hops = {}
        held = {json.loads(x)["question"]: json.loads(x)["hops"] for x in open(f"{o}/heldout.jsonl")}
        for x, ri in zip(recs, r):
            by_hops.setdefault(held[x["question"]], []).append(float(ri))
        return {"em": k / n, "k": k, "n": n, "ci95": [lo, hi], "answered": answered,
                "em_by_hops": {h: sum(v) / len(v) for h, v in sorted(by_hops.items())}}

    res = {}
    for stage in ("sft", "rl"):
        for mode in ("greedy", "t1"):
            p = f"{o}/pred_{stage}_{mode}.jsonl"
            if os.path.exists(p):
                res[f"{stage}_{mode}"] = em(p)
    rl_metrics = f"{o}/rl/metrics.jsonl"
    if os.path.exists(rl_metrics):
        m = [json.loads(x) for x in open(rl_metrics) if x.strip()]
        res["rl_reward"] = [x["reward"] for x in m]
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import numpy as np
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
    print("\n| stage | decoding | held-out EM | 95% CI (Wilson) | answered | EM 1-hop / 2-hop |")
    print("|---|---|---|---|---|---|")
    for stage in ("sft", "rl"):
        for mode, label in (("greedy", "greedy"), ("t1", "T = 1")):
            r = res.get(f"{stage}_{mode}")
            if r:
                hops = " / ".join(f"{v:.3f}" for v in r["em_by_hops"].values())
                print(f"| {stage.upper()} | {label} | {r['em']:.3f} ({r['k']}/{r['n']}) | "
                      f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['answered']:.3f} | {hops} |")
    for name, t in times.items():
        print(f"- {name}: {t['seconds']:.0f} s: `{t['command']}`")
    return res


if __name__ == "__main__":
    raise SystemExit(main())
