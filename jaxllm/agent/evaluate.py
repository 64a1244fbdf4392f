"""Answer scoring: exact match and token F1 with SQuAD-style normalisation, the unbiased pass@k
estimator, and evaluation over JSONL of ``{question, answer, ...}`` records.

Prediction records carry either ``prediction`` (one string) or ``predictions`` (a list: several
samples for the same question, for pass@k). A gold ``answer`` may be a string or a list of
acceptable strings (the best match counts). These are offline metrics on synthetic tasks; they are
not the LLM-judge scores of the Tongyi report.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import string
from typing import Iterable, Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "pass_at_k",
    "mean_ci",
    "wilson_interval",
    "score_record",
    "evaluate_records",
    "evaluate_jsonl",
    "load_jsonl",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(gold) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    if isinstance(gold, (list, tuple)) and gold and all(isinstance(g, str) for g in gold):
        return list(gold)
    raise ValueError(f"gold answer must be a string or a non-empty list of strings, got {gold!r}")


def exact_match(prediction: str, gold) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _golds(gold)))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, gold) -> float:
    """Token-overlap F1 after normalisation; the best over gold answers."""
    return max(_f1(prediction, g) for g in _golds(gold))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k) for n samples, c correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise ValueError("pass_at_k: n, c, k must be ints")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # product form, numerically stable: prod_{i=n-c+1}^{n} (1 - k/i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of a normal-approximation confidence interval (z * s / sqrt(n))."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, z * math.sqrt(var / n)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        raise ValueError("wilson_interval: n must be > 0")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _predictions(record: dict, i: int) -> list[str]:
    if "predictions" in record:
        preds = record["predictions"]
        if not isinstance(preds, list) or not preds:
            raise ValueError(f"record {i}: 'predictions' must be a non-empty list")
    elif "prediction" in record:
        preds = [record["prediction"]]
    else:
        raise ValueError(f"record {i}: needs 'prediction' or 'predictions'")
    return ["" if p is None else p for p in preds]


def score_record(record: dict, i: int = 0) -> dict:
    """EM and F1 of each prediction of one record (a None prediction, e.g. no answer, is "")."""
    if "answer" not in record:
        raise ValueError(f"record {i}: missing 'answer'")
    preds = _predictions(record, i)
    for p in preds:
        if not isinstance(p, str):
            raise ValueError(f"record {i}: predictions must be strings, got {type(p).__name__}")
    return {
        "em": [exact_match(p, record["answer"]) for p in preds],
        "f1": [f1_score(p, record["answer"]) for p in preds],
    }


def evaluate_records(records: Iterable[dict], ks: Sequence[int] = (1,)) -> dict:
    """Aggregate metrics over records.

    ``em``/``f1``: mean over questions of the mean over that question's samples (avg@n), with
    95% CI half-widths ``em_ci``/``f1_ci``; ``pass@k`` for each k no larger than every record's
    sample count. ``n`` is the number of questions.
    """
    ems, f1s, per_q = [], [], []
    for i, r in enumerate(records):
        s = score_record(r, i)
        ems.append(sum(s["em"]) / len(s["em"]))
        f1s.append(sum(s["f1"]) / len(s["f1"]))
        per_q.append((len(s["em"]), int(sum(s["em"]))))
    if not per_q:
        raise ValueError("evaluate_records: no records")
    out = {"n": len(per_q)}
    out["em"], out["em_ci"] = mean_ci(ems)
    out["f1"], out["f1_ci"] = mean_ci(f1s)
    min_n = min(n for n, _ in per_q)
    for k in ks:
        if k > min_n:
            raise ValueError(
                f"evaluate_records: pass@{k} needs at least {k} predictions per question; some have {min_n}"
            )
        vals = [pass_at_k(n, c, k) for n, c in per_q]
        out[f"pass@{k}"], out[f"pass@{k}_ci"] = mean_ci(vals)
    return out


def load_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{ln}: not valid JSON ({e.msg})") from None
    return out


def evaluate_jsonl(gold_path: str, pred_path: str | None = None, ks: Sequence[int] = (1,)) -> dict:
    """Evaluate a JSONL of ``{question, answer, prediction(s)}``; or, with ``pred_path``, join a
    gold JSONL ``{question, answer}`` with a predictions JSONL ``{question, prediction(s)}`` by
    question text (every gold question must have predictions)."""
    gold = load_jsonl(gold_path)
    if pred_path is None:
        return evaluate_records(gold, ks)
    preds: dict[str, dict] = {}
    for i, r in enumerate(load_jsonl(pred_path)):
        if "question" not in r:
            raise ValueError(f"{pred_path}: record {i} has no 'question'")
        preds[r["question"]] = r
    merged = []
    for i, g in enumerate(gold):
        for key in ("question", "answer"):
            if key not in g:
                raise ValueError(f"{gold_path}: record {i} has no {key!r}")
        p = preds.get(g["question"])
        if p is None:
            raise ValueError(f"{pred_path}: no prediction for question {g['question'][:80]!r}")
        merged.append({**p, "answer": g["answer"]})
    return evaluate_records(merged, ks)


def main(argv=None) -> int:
    """``python -m jaxllm.agent.evaluate GOLD [PRED] --k 1 3``: print metrics as one JSON line."""
    ap = argparse.ArgumentParser(prog="jaxllm.agent.evaluate", description=main.__doc__)
    ap.add_argument("gold", help="JSONL of {question, answer[, prediction(s)]}")
    ap.add_argument(
        "pred", nargs="?", help="JSONL of {question, prediction(s)}, joined with GOLD by question"
    )
    ap.add_argument("--k", type=int, nargs="+", default=[1], help="k values for pass@k")
    args = ap.parse_args(argv)
    print(json.dumps(evaluate_jsonl(args.gold, args.pred, ks=tuple(args.k))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
