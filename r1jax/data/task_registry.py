"""The built-in verifiable tasks by name (`task.name`; docs/tasks.md): how each makes problems and
verifies a completion against its `answer` column. Rows of a task carry the task's name in a
`task` column, so the `accuracy` reward and eval judge each row with its own task's verifier."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from r1jax.config import TaskConfig, check_names
from r1jax.config.tasks import TaskName
from r1jax.data import task_countdown, task_running_sum, task_sort_words, tasks
from r1jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    generate: Callable  # (TaskConfig, split, index) -> problem (tasks.Problem or tasks.Worked)
    problems: Callable  # (TaskConfig, split, n) -> the first n problems, distinct on the held-out split
    verify: Callable  # (gold: the answer column, completion) -> bool


TASKS: dict[str, Task] = {
    "arithmetic": Task(tasks.generate, tasks.problems, tasks.verify),
    "countdown": Task(task_countdown.generate, task_countdown.problems, task_countdown.verify),
    # An integer answer: the arithmetic task's check applies.
    "running_sum": Task(task_running_sum.generate, task_running_sum.problems, tasks.verify),
    "sort_words": Task(task_sort_words.generate, task_sort_words.problems, task_sort_words.verify),
}
check_names(TASKS, TaskName, "task.name")


def get(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task.name: one of {list(TASKS)}, got {name!r}")
    return TASKS[name]


def problems(cfg: TaskConfig, split: str, n: int) -> list:
    return get(cfg.name).problems(cfg, split, n)


def generate(cfg: TaskConfig, split: str, index: int):
    return get(cfg.name).generate(cfg, split, index)


def verify_answer(gold: str, completion: str, task: str | None = None) -> bool:
    """The built-in `answer_match`: a row of a built-in task (`task` names one) by its task's
    verifier, any other row by its final answer equal to the gold one (integers as integers)."""
    return TASKS[task].verify(gold, completion) if _is_task(task) else tasks.verify(gold, completion)


def judged_by_task(task) -> bool:
    """Whether a row's `task` value makes its task's verifier judge it rather than the generic
    answer check (the arithmetic task's answers are plain integers: the generic check is its own)."""
    return _is_task(task) and task != "arithmetic"


def _is_task(task) -> bool:
    return isinstance(task, str) and task in TASKS
