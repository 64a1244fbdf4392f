import itertools
import json
import math

import pytest

from jaxllm.agent import evaluate as E


def test_normalisation_squad_style():
    assert E.normalize_answer("The  Epsom Derby!") == "epsom derby"
    assert E.normalize_answer("an Apple, a day") == "apple day"
    assert E.normalize_answer("Theatre") == "theatre"  # 'the' only as a word


def test_exact_match_and_f1_values():
    assert E.exact_match("the Epsom Derby.", "Epsom Derby") == 1.0
    assert E.exact_match("Epsom", "Epsom Derby") == 0.0
    assert E.exact_match("Derby", ["Epsom Derby", "derby"]) == 1.0
    # precision 1/2, recall 1/3 -> F1 = 2 * (1/2 * 1/3) / (1/2 + 1/3) = 0.4
    assert E.f1_score("red car", "a red big truck") == pytest.approx(0.4)
    assert E.f1_score("", "") == 1.0 and E.f1_score("x", "") == 0.0
    assert E.f1_score("blue", ["red", "blue sky"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="gold answer"):
        E.exact_match("x", [])


def _pass_at_k_brute(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert E.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k)), (n, c, k)
    assert E.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="k <= n"):
        E.pass_at_k(3, 1, 4)


def test_evaluate_records_and_files(tmp_path):
    gold = [{"question": "q1", "answer": "Paris"}, {"question": "q2", "answer": "1871"}]
    preds = [
        {"question": "q2", "predictions": ["1871", "1872", None]},
        {"question": "q1", "predictions": ["paris", "Lyon", "The Paris"]},
    ]
    gp, pp = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    gp.write_text("\n".join(json.dumps(g) for g in gold) + "\n")
    pp.write_text("\n".join(json.dumps(p) for p in preds) + "\n")
    out = E.evaluate_jsonl(str(gp), str(pp), ks=(1, 2, 3))
    assert out["n"] == 2
    assert out["em"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert out["pass@1"] == pytest.approx(out["em"])
    assert out["pass@3"] == 1.0
    assert out["pass@2"] == pytest.approx((1.0 + (1 - 1 / 3)) / 2)
    sd = math.sqrt(((2 / 3 - 0.5) ** 2 + (1 / 3 - 0.5) ** 2) / 1)
    assert out["em_ci"] == pytest.approx(1.96 * sd / math.sqrt(2))
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"question": "q", "answer": "x", "prediction": "x"}) + "\n")
    assert E.evaluate_jsonl(str(single))["em"] == 1.0
    with pytest.raises(ValueError, match="pass@4 needs at least 4"):
        E.evaluate_jsonl(str(gp), str(pp), ks=(4,))
    pp.write_text(json.dumps(preds[0]) + "\n")
    with pytest.raises(ValueError, match="no prediction for question 'q1'"):
        E.evaluate_jsonl(str(gp), str(pp))
    with pytest.raises(ValueError, match="needs 'prediction' or 'predictions'"):
        E.evaluate_records([{"question": "q", "answer": "a"}])


def test_module_entry_point(tmp_path, capsys):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "Paris", "predictions": ["paris", "x"]}) + "\n")
    assert E.main([str(p), "--k", "1", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["em"] == 0.5 and out["pass@2"] == 1.0
