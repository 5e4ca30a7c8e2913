"""pass@k and maj@k on verifiable problems (R1 report §3: pass@1 over k samples, cons@64).

- pass@k, unbiased (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):
  with n samples of which c are correct, pass@k = 1 − C(n−c, k) / C(n, k), the probability that a
  random k-subset holds at least one correct sample. pass@1 = c / n.
- maj@k (self-consistency, also "cons@k"): the most frequent extracted answer among the first k
  samples is the model's answer; the problem counts as solved if that answer is correct.

A problem is scored from its completions by two callbacks: `verify(problem, completion) -> bool` and
`extract_answer(completion) -> str | None` (None = no answer; such samples never vote).
"""

from __future__ import annotations

import json
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from r1jax import paths
from r1jax.errors import ConfigError, DataError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c,k)/C(n,k).

    Evaluated as 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms the (huge) binomials.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ConfigError(f"pass_at_k: {name} must be an int, got {v!r}")
    if not 0 <= c <= n:
        raise DataError(f"pass_at_k: correct count c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ConfigError(f"pass_at_k: k={k} must be in [1, n={n}] (n samples per problem)")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Ties: among answers with the highest count, the one that appears first in sample order wins
    (deterministic, and independent of how answers sort); the returned index is that first occurrence.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 if the majority answer of the first k samples is correct, else 0.0.

    answers[i] is extract_answer(completion i), correct[i] is verify(problem, completion i); the vote
    winner's correctness is that of its first occurrence (equal answers verify alike)."""
    if len(answers) != len(correct):
        raise DataError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= len(answers):
        raise ConfigError(f"maj_at_k: k={k!r} must be an int in [1, n={len(answers)}]")
    winner = majority_vote(answers[:k])
    return float(winner is not None and bool(correct[winner]))


def score_problem(problem, completions: Sequence[str], verify: Callable, extract_answer: Callable | None = None,
                  ks: Sequence[int] = (1,), maj_ks: Sequence[int] = ()) -> dict:
    """One problem's record: n, correct count, pass@k for each k, maj@k for each k (needs extract_answer)."""
    n = len(completions)
    if n == 0:
        raise DataError("score_problem: a problem has no completions")
    correct = [bool(verify(problem, c)) for c in completions]
    rec = {"n": n, "correct": sum(correct)}
    for k in ks:
        rec[f"pass@{k}"] = pass_at_k(n, rec["correct"], k)
    if maj_ks:
        if extract_answer is None:
            raise ConfigError("maj_ks: maj@k needs an extract_answer callback")
        answers = [extract_answer(c) for c in completions]
        winner = majority_vote(answers)
        rec["majority_answer"] = None if winner is None else answers[winner]
        for k in maj_ks:
            rec[f"maj@{k}"] = maj_at_k(answers, correct, k)
    return rec


def evaluate(problems: Sequence, completions: Sequence[Sequence[str]], verify: Callable,
             extract_answer: Callable | None = None, ks: Sequence[int] = (1,), maj_ks: Sequence[int] = (),
             ids: Sequence | None = None) -> tuple[dict, list[dict]]:
    """Score every problem; -> (summary {num_problems, samples (min n), metric: mean over problems},
    per-problem records). completions[i] are the n_i completions of problems[i]; every k must be ≤ n_i."""
    if len(problems) != len(completions):
        raise DataError(f"evaluate: {len(problems)} problems but {len(completions)} completion lists")
    if not problems:
        raise DataError("evaluate: no problems")
    records = []
    for i, (problem, comps) in enumerate(zip(problems, completions)):
        try:
            rec = score_problem(problem, comps, verify, extract_answer, ks, maj_ks)
        except (ConfigError, DataError) as e:
            raise type(e)(f"problem {i}: {e}") from None
        records.append({"id": ids[i] if ids is not None else i, **rec})
    metrics = [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in maj_ks]
    summary = {"num_problems": len(records), "samples": min(r["n"] for r in records)}
    summary.update({m: sum(r[m] for r in records) / len(records) for m in metrics})
    return summary, records


def results_table(summaries: dict[str, dict]) -> list[dict]:
    """{task name: summary from `evaluate`} -> rows [{"task": name, **summary}] in insertion order."""
    return [{"task": name, **summary} for name, summary in summaries.items()]


def write_jsonl(rows: Iterable[dict], path):
    path = paths.as_path(path)  # local or gs://
    paths.makedirs(path.parent)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def format_table(rows: Sequence[dict], digits: int = 3) -> str:
    """Plain-text table; columns are the union of row keys in first-seen order, floats rounded."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    show = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[show(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
