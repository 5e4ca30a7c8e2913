"""Multi-digit running sums: a column of numbers of `digits` digits, summed one at a time.

    prompt:  add 412 305 78 129
    <think>
    412
    +305=717
    +78=795
    +129=924
    </think>

    <answer>924</answer>

Every line adds one term to the running total, so the chain is as long as the column and each
step carries across digits: harder than the arithmetic task's single-digit steps. Verified as the
arithmetic task is (the final answer equals the gold integer); `answer_noise` applies as there.
"""

from __future__ import annotations

from r1jax.config import TaskConfig
from r1jax.data.tasks import Worked, distinct_problems, draw_in_split, noisy_answer


def _draw(cfg: TaskConfig, rng) -> tuple[int, ...]:
    c = cfg.running_sum
    n = int(rng.integers(c.min_terms, c.max_terms + 1))
    low = 10 ** (c.digits - 1) if c.digits > 1 else 0
    return tuple(int(x) for x in rng.integers(low, 10 ** c.digits, size=n))


def running_chain(terms) -> list[str]:
    """The first term, then `+term=total` a line."""
    lines, total = [str(terms[0])], terms[0]
    for t in terms[1:]:
        total += t
        lines.append(f"+{t}={total}")
    return lines


def generate(cfg: TaskConfig, split: str, index: int) -> Worked:
    terms = draw_in_split(cfg, split, index, lambda rng: _draw(cfg, rng), lambda t: " ".join(map(str, t)))
    total = str(sum(terms))
    noisy = noisy_answer(cfg, index, total) if split == "train" else None
    key = " ".join(map(str, terms))
    return Worked(id=f"running_sum/{split}/{index}", key=key, question=f"add {key}",
                  chain=tuple(running_chain(terms)), answer=noisy or total, gold=total)


def problems(cfg: TaskConfig, split: str, n: int) -> list[Worked]:
    return distinct_problems(cfg, split, n, generate, "running_sum")
