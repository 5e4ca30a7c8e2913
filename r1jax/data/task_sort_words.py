"""Sorting words, a non-numeric task: put a few short lowercase words in alphabetical order.

    prompt:  sort hbc adf egg
    <think>
    hbc adf egg
    adf | hbc egg
    adf egg | hbc
    </think>

    <answer>adf egg hbc</answer>

The chain is selection sort: each line moves the smallest word left of `|`. Verified by exact match:
the answer's words, split on whitespace, are the sorted words in order.
"""

from __future__ import annotations

from r1jax.config import TaskConfig
from r1jax.data.tasks import Worked, distinct_problems, draw_in_split, extract_answer


def _draw(cfg: TaskConfig, rng) -> tuple[str, ...]:
    c = cfg.sort_words
    n = int(rng.integers(c.min_words, c.max_words + 1))
    letters = rng.choice(list(c.alphabet), size=(n, c.word_length))
    return tuple("".join(row) for row in letters)


def selection_chain(words) -> list[str]:
    """The words, then one line per word placed: sorted part | the rest (in the order left)."""
    lines, done, rest = [" ".join(words)], [], list(words)
    while len(rest) > 1:
        rest.remove(smallest := min(rest))
        done.append(smallest)
        lines.append(" ".join(done) + " | " + " ".join(rest))
    return lines


def generate(cfg: TaskConfig, split: str, index: int) -> Worked:
    words = draw_in_split(cfg, split, index, lambda rng: _draw(cfg, rng), " ".join)
    key = " ".join(words)
    answer = " ".join(sorted(words))
    return Worked(id=f"sort_words/{split}/{index}", key=key, question=f"sort {key}",
                  chain=tuple(selection_chain(words)), answer=answer, gold=answer)


def problems(cfg: TaskConfig, split: str, n: int) -> list[Worked]:
    return distinct_problems(cfg, split, n, generate, "sort_words")


def verify(gold: str, completion: str) -> bool:
    """The final answer's words are exactly the gold words, in order."""
    answer = extract_answer(completion)
    return answer is not None and answer.split() == str(gold).split()
