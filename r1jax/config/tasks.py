"""The built-in verifiable tasks' configs (r1jax/data/task_registry.py; docs/tasks.md): which task
`task:train` / `task:eval` produce (`name`), the split and size settings every task shares, the
arithmetic task's own settings (top level, as before there were several tasks) and one section for
each other task."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from r1jax.config.loader import need

# The built-in tasks (r1jax/data/task_registry.py TASKS is checked against these names at import).
TaskName = Literal["arithmetic", "countdown", "running_sum", "sort_words"]
TASK_NAMES = typing.get_args(TaskName)


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
    """TinyZero's Countdown: reach `target` from the given numbers with + - * /, each number at most once."""

    min_numbers: int = 3
    max_numbers: int = 3  # at most 4: the worked chain and the verifier's tests search exhaustively
    max_number: int = 20  # numbers are drawn from 1..max_number
    max_target: int = 100  # targets are 1..max_target
    # "checked": a chain line that leaves two numbers lists what their last combination gives, so a
    # dead end's `no` is worked out on the page; "silent" writes the `no` alone, which the demo's 0.74M
    # model could not decide and answered with a made-up last step instead (docs/tasks.md).
    chain: Literal["checked", "silent"] = "checked"

    def __post_init__(self):
        need(2 <= self.min_numbers, "min_numbers", f"must be >= 2, got {self.min_numbers}")
        need(self.min_numbers <= self.max_numbers <= 4, "max_numbers",
             f"must be in [min_numbers={self.min_numbers}, 4], got {self.max_numbers}")
        need(self.max_number >= 2, "max_number", f"must be >= 2, got {self.max_number}")
        need(self.max_target >= 1, "max_target", f"must be >= 1, got {self.max_target}")


@dataclasses.dataclass(frozen=True)
class RunningSumConfig:
    """A column of multi-digit numbers summed one at a time, the chain keeping the running total."""

    min_terms: int = 3
    max_terms: int = 4
    digits: int = 2  # every term has exactly this many digits
    # How a chain line adds a term: "columns" works digit by digit from the units, each column's sum
    # (with its carry) written before the new total; "lines" writes the new total in one go
    # (`+78=795`), which the demo's 0.74M model did not learn in 1000 SFT steps (docs/tasks.md).
    chain: Literal["columns", "lines"] = "columns"

    def __post_init__(self):
        need(self.min_terms >= 2, "min_terms", f"must be >= 2, got {self.min_terms}")
        need(self.max_terms >= self.min_terms, "max_terms",
             f"must be >= min_terms={self.min_terms}, got {self.max_terms}")
        need(1 <= self.digits <= 9, "digits", f"must be in [1, 9], got {self.digits}")


@dataclasses.dataclass(frozen=True)
class SortWordsConfig:
    """Put a few short lowercase words in alphabetical order (a non-numeric task, exact match)."""

    min_words: int = 3
    max_words: int = 4
    word_length: int = 3  # words are drawn letter by letter from `alphabet`

    alphabet: str = "abcdefgh"

    def __post_init__(self):
        need(self.min_words >= 2, "min_words", f"must be >= 2, got {self.min_words}")
        need(self.max_words >= self.min_words, "max_words",
             f"must be >= min_words={self.min_words}, got {self.max_words}")
        need(self.word_length >= 1, "word_length", f"must be >= 1, got {self.word_length}")
        need(len(set(self.alphabet)) >= 2 and self.alphabet.isalpha() and self.alphabet.islower(), "alphabet",
             f"must be at least two distinct lowercase letters, got {self.alphabet!r}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The built-in verifiable task the `task:train` / `task:eval` sources produce: `name` picks it
    (arithmetic by default: integer expressions like `3+4*5-2=?`, r1jax/data/tasks.py)."""

    name: TaskName = "arithmetic"
    # ---- the arithmetic task
    min_operands: int = 2
    max_operands: int = 3
    max_operand: int = 9  # operands are drawn from 0..max_operand
    ops: str = "+-*"
    # ---- the other tasks: each reads its own section only
    countdown: CountdownConfig = dataclasses.field(default_factory=CountdownConfig)
    running_sum: RunningSumConfig = dataclasses.field(default_factory=RunningSumConfig)
    sort_words: SortWordsConfig = dataclasses.field(default_factory=SortWordsConfig)
    # ---- every task
    # Share of all problems that belong to the held-out split (chosen by a hash of the problem's text,
    # so the two splits are disjoint whatever the seed).
    heldout_fraction: float = 0.1
    seed: int = 0
    num_train: int = 20000  # rows of the `task:train` source
    num_eval: int = 200  # rows of the `task:eval` source (distinct problems)
    # Share of train problems whose gold completion tags a wrong answer (the worked result off by 1..3),
    # like hastily written cold-start data: SFT imitates the slips, and RL, rewarded only for correct
    # answers, has to learn to report what the reasoning derived. Held-out problems are never noisy.
    # Arithmetic and running_sum tag an integer off by 1..3; Countdown an expression with one operator
    # slipped so it misses the target (a bare-number answer off by 1..3). sort_words takes none.
    answer_noise: float = 0.0

    def __post_init__(self):
        need(self.min_operands >= 2, "min_operands", f"must be >= 2, got {self.min_operands}")
        need(self.max_operands >= self.min_operands, "max_operands",
             f"must be >= min_operands={self.min_operands}, got {self.max_operands}")
        need(self.max_operand >= 1, "max_operand", f"must be >= 1, got {self.max_operand}")
        need(bool(self.ops) and set(self.ops) <= set("+-*"), "ops",
             f"must be a non-empty string of '+', '-', '*', got {self.ops!r}")
        need(0.0 < self.heldout_fraction < 1.0, "heldout_fraction",
             f"must be in (0, 1), got {self.heldout_fraction}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(self.num_train >= 1, "num_train", f"must be >= 1, got {self.num_train}")
        need(self.num_eval >= 1, "num_eval", f"must be >= 1, got {self.num_eval}")
        need(0.0 <= self.answer_noise < 1.0, "answer_noise", f"must be in [0, 1), got {self.answer_noise}")
        need(self.answer_noise == 0.0 or self.name in ("arithmetic", "running_sum", "countdown"), "answer_noise",
             f"only arithmetic, running_sum and countdown take noise; task {self.name!r} needs 0")
