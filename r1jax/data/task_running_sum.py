"""Multi-digit running sums: a column of numbers of `digits` digits, summed one at a time.

    prompt:  add 412 305 78 129
    <think>
    412
    +305: 5+2=7 0+1=1 3+4=7 =717
    +78: 8+7=15 7+1+1=9 7=7 =795
    +129: 9+5=14 2+9+1=12 1+7+1=9 =924
    </think>

    <answer>924</answer>

Every line adds one term to the running total, working the columns from the units up as on paper:
each column is the term's digit, the total's digit and the carry (`+1`) when the column before
reached ten, then its sum; the new total is the last column's sum followed by the other columns'
last digits. Each step is a one-digit sum, the size of step a small model learns (the arithmetic
task's), while the chain grows with the column and carries across digits. `chain: lines` writes
each new total in one go instead (`+78=795`). Verified as the arithmetic task is (the final answer
equals the gold integer); `answer_noise` applies as there.
"""

from __future__ import annotations

from r1jax.config import TaskConfig
from r1jax.data.tasks import Worked, distinct_problems, draw_in_split, noisy_answer


def _draw(cfg: TaskConfig, rng) -> tuple[int, ...]:
    c = cfg.running_sum
    n = int(rng.integers(c.min_terms, c.max_terms + 1))
    low = 10 ** (c.digits - 1) if c.digits > 1 else 0
    return tuple(int(x) for x in rng.integers(low, 10 ** c.digits, size=n))


def column_sums(total: int, term: int) -> str:
    """`term` added to `total` column by column from the units: `8+7=15 7+1+1=9 7=7 =795`."""
    a, b = str(term)[::-1], str(total)[::-1]
    columns, carry = [], 0
    for i in range(max(len(a), len(b))):
        digits = [int(x[i]) for x in (a, b) if i < len(x)] + [1] * carry
        s = sum(digits)
        columns.append("+".join(map(str, digits)) + f"={s}")
        carry = s // 10
    return " ".join(columns) + f" ={total + term}"


def running_chain(terms, how: str = "columns") -> list[str]:
    """The first term, then one line per further term: `+term: <columns> =total` (or `+term=total`)."""
    lines, total = [str(terms[0])], terms[0]
    for t in terms[1:]:
        lines.append(f"+{t}: {column_sums(total, t)}" if how == "columns" else f"+{t}={total + t}")
        total += t
    return lines


def generate(cfg: TaskConfig, split: str, index: int) -> Worked:
    terms = draw_in_split(cfg, split, index, lambda rng: _draw(cfg, rng), lambda t: " ".join(map(str, t)))
    total = str(sum(terms))
    noisy = noisy_answer(cfg, index, total) if split == "train" else None
    key = " ".join(map(str, terms))
    return Worked(id=f"running_sum/{split}/{index}", key=key, question=f"add {key}",
                  chain=tuple(running_chain(terms, cfg.running_sum.chain)), answer=noisy or total, gold=total)


def problems(cfg: TaskConfig, split: str, n: int) -> list[Worked]:
    return distinct_problems(cfg, split, n, generate, "running_sum")
