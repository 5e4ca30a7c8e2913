"""Rule-based rewards for GRPO (R1 uses no neural reward model for reasoning; grpo spec), called
as TRL's GRPOTrainer calls reward functions (docs/data.md "Rewards"), so a function written for TRL
runs unchanged:

    fn(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_extra=...,
       log_metric=..., completion_lengths=..., truncated=..., prompt_texts=...) -> list[float | None]

`prompts` are the prompts as the data gives them (strings, or lists of messages for conversational
data); `completions` strings, or for conversational data one assistant message a completion
(`[{"role": "assistant", "content": text}]`); `completion_ids` the sampled token ids (the stop token
included). Every other column of the row is a keyword (the gold answer also as `answer`). r1jax
adds `completion_lengths`, `truncated` and `prompt_texts` (the prompt as the model saw it, rendered).
None means "cannot be judged". Several functions combine as TRL combines them: the weighted sum of
the values that are not None (`nansum`), None only where every function returned None. Custom
rewards are named `package.module:function` and get their config `kwargs` too.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from r1jax import plugins
from r1jax.data import task_registry
from r1jax.data.examples import RESERVED_COLUMNS, is_conversational
from r1jax.data.tasks import answers_match, extract_answer, is_integer
from r1jax.errors import ConfigError, R1JaxError
from r1jax.rl import sandbox

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"


class RewardError(R1JaxError):
    """A reward function failed; names the function."""


def content(completion) -> str:
    """A completion's text: the string itself, or the content of its assistant message(s)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def _texts(completions, prompt_texts) -> list[str]:
    """The completions' texts, opened with `<think>\\n` where the rendered prompt ended in it (R1's
    generation prompt does, so the completion starts inside the reasoning)."""
    prompt_texts = prompt_texts or [""] * len(completions)
    return [(THINK_OPEN + "\n" + content(c)) if p.rstrip("\n").endswith(THINK_OPEN) else content(c)
            for p, c in zip(prompt_texts, completions)]


def _math_verify(gold: str, answer: str) -> bool | None:
    # Two plain integers need no parser: math-verify takes about a millisecond per pair and a GRPO
    # step scores hundreds (tests/test_rewards.py checks this path against math-verify itself).
    if is_integer(gold) and is_integer(answer):
        return answers_match(gold, answer)
    from math_verify import parse, verify

    # math-verify times out with SIGALRM, which works only on the main thread.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    g = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=timeout)
    if not g:
        return None
    a = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$", parsing_timeout=timeout)
    return bool(a) and verify(g, a, timeout_seconds=timeout)


def accuracy(prompts, completions, *, answer, task=None, **_) -> list[float | None]:
    """1 if the final answer (<answer>, \\boxed{} or the text after </think>) equals the gold `answer`
    by math-verify, 0 otherwise; None when there is no gold answer or it cannot be parsed. Rows of a
    built-in task other than arithmetic (their `task` column; docs/tasks.md) are judged by that
    task's verifier instead (a Countdown expression is evaluated, sorted words matched exactly)."""
    out = []
    task = task if task is not None else [None] * len(answer)
    for completion, gold, name in zip(map(content, completions), answer, task):
        if gold is None or not str(gold).strip():
            out.append(None)
            continue
        if task_registry.judged_by_task(name):
            out.append(float(task_registry.verify_answer(str(gold), completion, name)))
            continue
        answer = extract_answer(completion)
        if answer is None:
            ok = _math_verify(str(gold), "")
            out.append(None if ok is None else 0.0)
            continue
        ok = _math_verify(str(gold), answer)
        out.append(None if ok is None else float(ok))
    return out


_FORMAT = re.compile(r"^<think>\n?(?P<think>.*?)\n?</think>\s*(?P<answer>\S.*?)\s*$", re.DOTALL)


def format_reward(prompts, completions, *, prompt_texts=None, **_) -> list[float]:
    """1 if the text is `<think>…</think>` then a non-empty answer, each think tag exactly once and
    any <answer> tags exactly once each (repeated blocks were a known reward hack), else 0."""
    out = []
    for text in _texts(completions, prompt_texts):
        ok = (text.count(THINK_OPEN) == 1 and text.count(THINK_CLOSE) == 1 and _FORMAT.match(text) is not None
              and text.count(ANSWER_OPEN) == text.count(ANSWER_CLOSE) <= 1)
        if ok and ANSWER_OPEN in text:
            ok = text.index(ANSWER_OPEN) > text.index(THINK_CLOSE) and text.index(ANSWER_OPEN) < text.index(ANSWER_CLOSE)
        out.append(float(ok))
    return out


def tag_count(prompts, completions, *, prompt_texts=None, **_) -> list[float]:
    """Partial credit: 0.25 for each of <think>, </think>, <answer>, </answer> used exactly once."""
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    return [sum(0.25 for t in tags if text.count(t) == 1) for text in _texts(completions, prompt_texts)]


_SCRIPTS = {
    "latin": re.compile(r"^[A-Za-z\u00C0-\u024F]+$"),
    "cjk": re.compile(r"^[\u4E00-\u9FFF\u3400-\u4DBF\u3040-\u30FF\uAC00-\uD7AF]+$"),
    "cyrillic": re.compile(r"^[\u0400-\u04FF]+$"),
}


def language_consistency(prompts, completions, *, language: str = "latin", prompt_texts=None, **_) -> list[float]:
    """Share of the chain-of-thought's words written in the target script (R1 §2.3.2). Digits and
    symbols are not words; a reasoning with no words scores 1."""
    if language not in _SCRIPTS:
        raise ConfigError(f"rewards.language_consistency.language: one of {sorted(_SCRIPTS)}, got {language!r}")
    pattern = _SCRIPTS[language]
    out = []
    for text in _texts(completions, prompt_texts):
        m = re.search(r"<think>(.*?)(</think>|$)", text, re.DOTALL)
        words = [w for w in re.findall(r"[^\W\d_]+", m.group(1) if m else text)]
        out.append(1.0 if not words else sum(bool(pattern.match(w)) for w in words) / len(words))
    return out


def overlong_penalty(prompts, completions, *, completion_lengths, max_length: int, cache_length: int, **_):
    """DAPO soft overlong punishment on token length |y|: 0 if |y| ≤ L_max − L_cache, linear down to
    −1 inside the buffer, −1 past L_max."""
    if not 0 <= cache_length < max_length:
        raise ConfigError(f"rewards.overlong_penalty: need 0 <= cache_length < max_length, got "
                          f"{cache_length}, {max_length}")
    free = max_length - cache_length
    out = []
    for n in completion_lengths:
        if n <= free:
            out.append(0.0)
        elif n <= max_length:
            out.append((free - n) / cache_length)
        else:
            out.append(-1.0)
    return out


_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The last fenced Python block of the answer part."""
    answer_part = completion.split(THINK_CLOSE)[-1]
    blocks = _CODE_BLOCK.findall(answer_part)
    return blocks[-1] if blocks else None


def _cases(tests) -> list:
    """A row's test cases: a list of {input, output}, or that list as JSON text."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError:
            raise RewardError("code: a `tests` value is text but not JSON") from None
    if tests is None:
        return []
    if not isinstance(tests, Sequence) or not all(isinstance(c, Mapping) for c in tests):
        raise RewardError(f"code: `tests` must be a list of {{input, output}} objects, got {type(tests).__name__}")
    return list(tests)


def code(prompts, completions, *, tests, all_or_nothing: bool = False, cpu_seconds: int = 5,
         wall_seconds: float = 10.0, memory_mb: int = 512, disk_mb: int = 64, max_concurrency: int = 4,
         allow_weak_isolation: bool = False, **_) -> list[float | None]:
    """Run each completion's last ```python block against its test cases in the sandbox: each case
    `{"input": stdin, "output": expected stdout}`; reward = fraction passed (or 1 only if all pass).
    Refuses to run where the sandbox cannot isolate the code unless `allow_weak_isolation`."""
    limits = sandbox.SandboxLimits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds,
                                   memory_bytes=memory_mb * 2**20, disk_bytes=disk_mb * 2**20,
                                   allow_weak_isolation=allow_weak_isolation)
    tests = [_cases(t) for t in tests]
    jobs, owners = [], []
    for i, (completion, cases) in enumerate(zip(map(content, completions), tests)):
        src = extract_code(completion)
        if src is None or not cases:
            continue
        for case in cases:
            jobs.append({"code": src, "stdin": case.get("input", "")})
            owners.append((i, case.get("output", "")))
    results = sandbox.run_many(jobs, limits=limits, max_concurrency=max_concurrency)
    passed = [0] * len(completions)
    for (i, expected), res in zip(owners, results):
        passed[i] += int(res.ok and res.stdout.strip() == str(expected).strip())
    out = []
    for i, cases in enumerate(tests):
        if not cases:
            out.append(None)
            continue
        frac = passed[i] / len(cases)
        out.append(float(frac == 1.0) if all_or_nothing else frac)
    return out


REWARDS: dict[str, Callable] = {
    "accuracy": accuracy,
    "format": format_reward,
    "tag_count": tag_count,
    "language_consistency": language_consistency,
    "overlong_penalty": overlong_penalty,
    "code": code,
}


def resolve(name: str) -> Callable:
    """A built-in reward by name, or `package.module:function`."""
    return plugins.resolve_spec(name, REWARDS, "rewards", "reward")


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """The part of TRL's `trainer_state` a reward function shaping by progress reads."""

    global_step: int = 0
    max_steps: int = 0


def _ignore(*_, **__) -> None:
    """TRL's `log_extra` / `log_metric`: accepted so TRL rewards run; r1jax does not log them yet."""


def context(step: int = 0, max_steps: int = 0) -> dict:
    """The keywords TRL passes every reward besides the rows: trainer_state, log_extra, log_metric."""
    return {"trainer_state": TrainerState(step, max_steps), "log_extra": _ignore, "log_metric": _ignore}


def column_keywords(rows: Sequence[Mapping]) -> dict[str, list]:
    """Per-row column dicts -> one list per column (a column a row lacks is None there, as in an
    Arrow table), as TRL's `_calculate_rewards` builds its reward keywords."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    bad = [k for k in names if k in RESERVED_COLUMNS]
    if bad:
        raise RewardError(f"dataset column {bad[0]!r} has the name of a reward argument; rename it")
    return {k: [row.get(k) for row in rows] for k in names}


def rollout_inputs(batch: Mapping, G: int, texts: list[str], completion_ids: list[list[int]],
                   truncated: list[bool], prompt_texts: list[str]) -> tuple[list, list, dict]:
    """A prompt batch (data/pipeline.py) and its G samples a prompt -> the (prompts, completions,
    keywords) of TRL's reward call: the prompts as the data gives them, for conversational prompts
    each completion as one assistant message, every other column repeated G times; the gold answer
    None where empty (the built-in accuracy then returns None)."""
    prompts = [p for p in batch["raw_prompt"] for _ in range(G)]
    completions = ([[{"role": "assistant", "content": t}] for t in texts] if is_conversational(prompts[0])
                   else list(texts))
    fields = column_keywords([c for c in batch["columns"] for _ in range(G)])
    if "answer" in fields:
        fields["answer"] = [a if a else None for a in fields["answer"]]
    fields.update(completion_ids=completion_ids, completion_lengths=[len(c) for c in completion_ids],
                  truncated=list(truncated), prompt_texts=list(prompt_texts))
    return prompts, completions, fields


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """The reward functions of a config, weighted and combined as TRL's GRPOTrainer combines them."""

    specs: tuple  # of r1jax.config.RewardSpec

    @property
    def names(self) -> list[str]:
        return [spec.metric_name for spec in self.specs]

    def scores(self, prompts, completions, **fields) -> np.ndarray:
        """Each function on every row -> [N, F] float64, NaN where a function returned None."""
        n = len(completions)
        out = np.full((n, len(self.specs)), np.nan)
        for j, spec in enumerate(self.specs):
            fn = resolve(spec.name)
            try:
                values = list(fn(prompts=prompts, completions=completions, **{**fields, **dict(spec.kwargs)}))
            except R1JaxError:
                raise
            except Exception as e:  # a user reward: report which one, with its error
                raise RewardError(f"reward {spec.name!r} raised {type(e).__name__}: {e}") from e
            if len(values) != n:
                raise RewardError(f"reward {spec.name!r} returned {len(values)} values for {n} completions")
            out[:, j] = [np.nan if v is None else float(v) for v in values]
        return out

    def combine(self, scores: np.ndarray) -> np.ndarray:
        """[N, F] -> [N]: TRL's `(rewards_per_func * weights).nansum(dim=1)`, NaN where every function
        returned None (TRL's unscorable rows)."""
        weights = np.array([spec.weight for spec in self.specs], np.float64)
        total = np.nansum(scores * weights[None, :], axis=1)
        total[np.isnan(scores).all(axis=1)] = np.nan
        return total

    def per_function(self, scores: np.ndarray) -> dict[str, list]:
        return {name: [None if np.isnan(v) else float(v) for v in scores[:, j]] for j, name in enumerate(self.names)}

    def __call__(self, prompts, completions, **fields):
        """-> total [N] (None where no function could judge), {name: [N] values}."""
        scores = self.scores(prompts, completions, **fields)
        return [None if np.isnan(v) else float(v) for v in self.combine(scores)], self.per_function(scores)


def process_rows(n: int, count: int, index: int) -> range:
    """The rows process `index` of `count` scores: a contiguous block, sizes differing by at most 1."""
    return range(index * n // count, (index + 1) * n // count)


def score_split(reward_set: RewardSet, prompts: list, completions: list, fields: Mapping[str, list],
                context: Mapping, *, process_index: int, process_count: int, gather: Callable) -> np.ndarray:
    """Score this process's block of the rows and gather every block -> the [N, F] scores of all rows.

    Every process holds the whole rollout; each runs the reward functions on its own block only (a
    code reward's sandbox runs are the expensive part), and one all-gather of a [rows, F] float
    array shares the results. `gather(x)` stacks every process's `x` ([count, *x.shape])."""
    n = len(completions)
    if process_count == 1:
        return reward_set.scores(prompts, completions, **fields, **context)
    rows = process_rows(n, process_count, process_index)
    take = lambda xs: [xs[i] for i in rows]  # noqa: E731
    mine = reward_set.scores(take(prompts), take(completions), **{k: take(v) for k, v in fields.items()}, **context)
    block = np.full((-(-n // process_count), len(reward_set.specs)), np.nan)  # equal shapes for the gather
    block[: len(rows)] = mine
    every = np.asarray(gather(block))
    return np.concatenate([every[p, : len(process_rows(n, process_count, p))] for p in range(process_count)])


def reward_set(specs) -> RewardSet:
    for spec in specs:
        resolve(spec.name)  # fail on a bad name before any sampling
        if spec.name == "code":  # and on a sandbox that cannot isolate, unless weak isolation is allowed
            sandbox.require_isolation(bool(dict(spec.kwargs).get("allow_weak_isolation", False)))
    return RewardSet(tuple(specs))
