"""pass@1 of greedy vs plain sampling vs AutoDeco vs fixed-mean on a small embedded task.

The task ("stdlib lines") fits what the default job learns (Python's standard library sources):
complete one line of Python after a prompt. A sample passes when the generated text reaches a
newline within ``max_new_tokens`` and the completed line is valid Python of the prompted kind:

* ``import`` / ``from`` prompts: the line parses and every imported top-level module is in
  ``sys.stdlib_module_names`` (so ``import foo_bar`` fails);
* ``def`` / ``class`` prompts: the line ends with ``:`` and parses with an indented ``pass`` body;
* ``return`` / ``if`` / assignment prompts: the line parses inside a function body.

pass@1 for a sampling mode is the fraction of passing samples, ``n`` per prompt, averaged over
prompts; greedy decoding is deterministic, so it is the fraction of prompts whose greedy line passes.

    python -m jaxllm.train.autodeco_eval --workdir runs/tiny --samples 200

needs ``<workdir>/autodeco`` from ``jaxllm autodeco-train``. Prints one JSON line per mode, then a
markdown table.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import textwrap
import time

import numpy as np

from jaxllm import generation, run_dir
from jaxllm.run_dir import load_trained

# (prompt, kind). The prompt follows the BOS token, like `jaxllm generate`.
PROMPTS = (
    ("import ", "import"),
    ("from ", "import"),
    ("import os\nimport ", "import"),
    ("def ", "def"),
    ("class ", "def"),
    ("    def ", "def"),
    ("def f(x):\n    return ", "stmt"),
    ("    if ", "stmt"),
)


def line_passes(prompt: str, continuation: str, kind: str) -> bool:
    """Whether ``continuation`` completes the last line of ``prompt`` as valid Python of ``kind``."""
    if "\n" not in continuation:
        return False
    line = prompt.rsplit("\n", 1)[-1] + continuation.split("\n", 1)[0]
    body = textwrap.dedent(line)
    if not body.strip():
        return False
    try:
        if kind == "import":
            tree = ast.parse(body)
            names = []
            for node in tree.body:
                if isinstance(node, ast.Import):
                    names += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.append(node.module)
                else:
                    return False
            return bool(names) and all(n.split(".")[0] in sys.stdlib_module_names for n in names)
        if kind == "def":
            if not body.rstrip().endswith(":"):
                return False
            ast.parse(body + "\n    pass")
            return True
        if kind == "stmt":
            src = "def _f():\n    " + body.strip()
            if src.rstrip().endswith(":"):
                src += "\n        pass"
            ast.parse(src)
            return True
    except (SyntaxError, ValueError):
        return False
    raise ValueError(f"unknown kind {kind!r}")


def evaluate(
    workdir: str, *, samples: int = 200, max_new_tokens: int = 48, seed: int = 0, modes=None, log=print
) -> list[dict]:
    model, params, tok = load_trained(workdir)
    heads_module, heads_vars, info = run_dir.load_heads(workdir, hidden_size=model.config.hidden_size)
    heads = (heads_module, heads_vars)
    all_modes = {
        "greedy": None,
        "sample T=1 p=1": generation.sampling_config("sample", temperature=1.0, top_p=1.0),
        "autodeco": generation.sampling_config("autodeco"),
        "fixed-mean": generation.sampling_config("fixed_mean", info),
        "sample T=0.8 p=0.95 (train default)": generation.sampling_config(
            "sample", temperature=0.8, top_p=0.95
        ),
    }
    modes = modes or list(all_modes)
    rows = []
    for name in modes:
        cfg = all_modes[name]
        t0 = time.perf_counter()
        n = 1 if cfg is None else samples
        per_prompt = []
        for i, (prompt, kind) in enumerate(PROMPTS):
            ids = generation.sample_ids(
                model, params, tok, prompt, n, max_new_tokens, cfg, heads=heads, seed=seed + 1000 * i
            )
            ok = [line_passes(prompt, tok.decode(r), kind) for r in ids]
            per_prompt.append(float(np.mean(ok)))
        p = float(np.mean(per_prompt))
        # Standard error of the mean over prompts of per-prompt binomial means (n draws each).
        se = math.sqrt(sum(q * (1 - q) / n for q in per_prompt)) / len(per_prompt) if n > 1 else None
        row = {
            "mode": name,
            "pass_at_1": round(p, 4),
            "stderr": None if se is None else round(se, 4),
            "samples_per_prompt": n,
            "prompts": len(PROMPTS),
            "per_prompt": [round(q, 3) for q in per_prompt],
            "time_s": round(time.perf_counter() - t0, 1),
        }
        if cfg is not None:
            row["sampling"] = {k: v for k, v in vars(cfg).items() if v is not None}
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--samples", type=int, default=200, help="samples per prompt for the sampling modes")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = evaluate(args.workdir, samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print("| mode | pass@1 | ± 1 s.e. | samples / prompt |\n|---|---|---|---|")
    for r in rows:
        se = "—" if r["stderr"] is None else f"{r['stderr']:.3f}"
        print(f"| {r['mode']} | {r['pass_at_1']:.3f} | {se} | {r['samples_per_prompt']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
