"""pass@k against brute-force enumeration of k-subsets; maj@k and aggregation on hand-built cases."""

import itertools
import json
import math

import pytest

from r1jax.errors import ConfigError, DataError
from r1jax.eval import evaluate, format_table, maj_at_k, majority_vote, pass_at_k, results_table, write_jsonl


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_fraction_correct_and_large_n_is_stable():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # C(1000, 500) overflows float; the product form does not.
    expected = 1 - math.comb(990, 500) / math.comb(1000, 500)
    assert pass_at_k(1000, 10, 500) == pytest.approx(expected, rel=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 600, 500) == 1.0


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ConfigError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(DataError, match="c=5"):
        pass_at_k(4, 5, 1)


def test_majority_vote_and_tie_rule():
    assert majority_vote(["3", "4", "4", None, "3", "4"]) == 1  # "4" ×3 wins; first occurrence index 1
    assert majority_vote(["7", "5", "5", "7"]) == 0  # tie 2–2: "7" appeared first
    assert majority_vote(["5", "7", "7", "5"]) == 0  # same counts, other order: "5" first
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "x"]) == 1  # unanswered samples never vote


def test_maj_at_k_uses_first_k_samples():
    answers = ["1", "2", "2", "1", "1"]
    correct = [True, False, False, True, True]
    assert maj_at_k(answers, correct, 3) == 0.0  # "2" wins among the first three
    assert maj_at_k(answers, correct, 5) == 1.0  # "1" wins overall
    assert maj_at_k(answers, correct, 1) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ConfigError, match="k=3"):
        maj_at_k(["1", "2"], [True, False], 3)


def _extract(completion: str):
    return completion.split("=")[-1].strip() if "=" in completion else None


def _verify(problem, completion):
    return _extract(completion) == problem["answer"]


def test_evaluate_aggregates_over_problems(tmp_path):
    problems = [{"answer": "4"}, {"answer": "9"}, {"answer": "1"}]
    completions = [
        ["2+2=4", "2+2=5", "2+2=4", "no idea"],  # c=2
        ["3*3=6", "3*3=6", "3*3=9", "3*3=8"],  # c=1, majority "6" wrong
        ["x", "y", "z", "w"],  # c=0, no answers
    ]
    summary, records = evaluate(problems, completions, _verify, _extract, ks=(1, 2), maj_ks=(4,),
                                ids=["a", "b", "c"])
    assert [r["correct"] for r in records] == [2, 1, 0]
    assert records[0]["id"] == "a" and records[0]["majority_answer"] == "4"
    assert records[2]["majority_answer"] is None
    assert summary["num_problems"] == 3 and summary["samples"] == 4
    assert summary["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert summary["pass@2"] == pytest.approx((brute_pass_at_k([1, 0, 1, 0], 2) + brute_pass_at_k([0, 0, 1, 0], 2)) / 3)
    assert summary["maj@4"] == pytest.approx(1 / 3)

    rows = results_table({"toy": summary, "toy_again": summary})
    assert [r["task"] for r in rows] == ["toy", "toy_again"]
    out = write_jsonl(rows, tmp_path / "eval" / "results.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    text = format_table(rows)
    assert text.splitlines()[0].split() == ["task", "num_problems", "samples", "pass@1", "pass@2", "maj@4"]
    assert "0.250" in text and len(text.splitlines()) == 4


def test_evaluate_names_bad_input():
    with pytest.raises(DataError, match="2 problems but 1"):
        evaluate([{}, {}], [["a"]], _verify)
    with pytest.raises(ConfigError, match="problem 0: .*k=3"):
        evaluate([{"answer": "1"}], [["=1", "=2"]], _verify, ks=(3,))
    with pytest.raises(ConfigError, match="extract_answer"):
        evaluate([{"answer": "1"}], [["=1"]], _verify, maj_ks=(1,))
    with pytest.raises(DataError, match="problem 1: .*no completions"):
        evaluate([{"answer": "1"}, {"answer": "2"}], [["=1"], []], _verify)
