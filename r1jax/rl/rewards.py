"""Rule-based rewards for GRPO (R1 uses no neural reward model for reasoning; grpo spec).

Every reward function has one signature:

    fn(prompts: list[str], completions: list[str], **fields) -> list[float | None]

`fields` always holds `answers` (gold answer strings or None), `completion_lengths` (tokens) and
`truncated` (bool per completion); datasets may add more (e.g. `tests` for code). None means "cannot
be judged" (an unparseable gold answer): the sample is left out of the update. Custom rewards are
named by dotted path, `mypackage.rewards:my_fn`, and take the same arguments plus their own keyword
options from the config.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Mapping

from r1jax import plugins
from r1jax.data.tasks import answers_match, extract_answer, is_integer
from r1jax.errors import ConfigError, R1JaxError
from r1jax.rl import sandbox

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"


class RewardError(R1JaxError):
    """A reward function failed; names the function."""


def _with_think_prefix(prompt: str, completion: str) -> str:
    """R1's generation prompt ends in `<think>\\n`, so the completion starts inside the reasoning."""
    stripped = prompt.rstrip("\n")
    return (THINK_OPEN + "\n" + completion) if stripped.endswith(THINK_OPEN) else completion


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


def accuracy(prompts, completions, *, answers, **_) -> list[float | None]:
    """1 if the final answer (<answer>, \\boxed{} or the text after </think>) equals the gold answer
    by math-verify, 0 otherwise; None when the gold answer cannot be parsed."""
    out = []
    for completion, gold in zip(completions, answers):
        if gold is None or not str(gold).strip():
            out.append(None)
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


def format_reward(prompts, completions, **_) -> list[float]:
    """1 if the text is `<think>…</think>` then a non-empty answer, each think tag exactly once and
    any <answer> tags exactly once each (repeated blocks were a known reward hack), else 0."""
    out = []
    for prompt, completion in zip(prompts, completions):
        text = _with_think_prefix(prompt, completion)
        ok = (text.count(THINK_OPEN) == 1 and text.count(THINK_CLOSE) == 1 and _FORMAT.match(text) is not None
              and text.count(ANSWER_OPEN) == text.count(ANSWER_CLOSE) <= 1)
        if ok and ANSWER_OPEN in text:
            ok = text.index(ANSWER_OPEN) > text.index(THINK_CLOSE) and text.index(ANSWER_OPEN) < text.index(ANSWER_CLOSE)
        out.append(float(ok))
    return out


def tag_count(prompts, completions, **_) -> list[float]:
    """Partial credit: 0.25 for each of <think>, </think>, <answer>, </answer> used exactly once."""
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    return [sum(0.25 for t in tags if _with_think_prefix(p, c).count(t) == 1) for p, c in zip(prompts, completions)]


_SCRIPTS = {
    "latin": re.compile(r"^[A-Za-z\u00C0-\u024F]+$"),
    "cjk": re.compile(r"^[\u4E00-\u9FFF\u3400-\u4DBF\u3040-\u30FF\uAC00-\uD7AF]+$"),
    "cyrillic": re.compile(r"^[\u0400-\u04FF]+$"),
}


def language_consistency(prompts, completions, *, language: str = "latin", **_) -> list[float]:
    """Share of the chain-of-thought's words written in the target script (R1 §2.3.2). Digits and
    symbols are not words; a reasoning with no words scores 1."""
    if language not in _SCRIPTS:
        raise ConfigError(f"rewards.language_consistency.language: one of {sorted(_SCRIPTS)}, got {language!r}")
    pattern = _SCRIPTS[language]
    out = []
    for prompt, completion in zip(prompts, completions):
        text = _with_think_prefix(prompt, completion)
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


def code(prompts, completions, *, tests, all_or_nothing: bool = False, cpu_seconds: int = 5,
         wall_seconds: float = 10.0, memory_mb: int = 512, disk_mb: int = 64, max_concurrency: int = 4,
         allow_weak_isolation: bool = False, **_) -> list[float | None]:
    """Run each completion's last ```python block against its test cases in the sandbox: each case
    `{"input": stdin, "output": expected stdout}`; reward = fraction passed (or 1 only if all pass).
    Refuses to run where the sandbox cannot isolate the code unless `allow_weak_isolation`."""
    limits = sandbox.SandboxLimits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds,
                                   memory_bytes=memory_mb * 2**20, disk_bytes=disk_mb * 2**20,
                                   allow_weak_isolation=allow_weak_isolation)
    jobs, owners = [], []
    for i, (completion, cases) in enumerate(zip(completions, tests)):
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
class RewardSet:
    """Weighted sum of reward functions; each also reported alone."""

    specs: tuple  # of r1jax.config.RewardSpec

    def __call__(self, prompts: list[str], completions: list[str], **fields):
        """-> total [N] (None where any reward could not judge), {name: [N] values}."""
        per = {}
        total = [0.0] * len(completions)
        for spec in self.specs:
            fn = resolve(spec.name)
            try:
                values = list(fn(prompts, completions, **fields, **dict(spec.kwargs)))
            except R1JaxError:
                raise
            except Exception as e:  # a user reward: report which one, with its error
                raise RewardError(f"reward {spec.name!r} raised {type(e).__name__}: {e}") from e
            if len(values) != len(completions):
                raise RewardError(f"reward {spec.name!r} returned {len(values)} values for {len(completions)} "
                                  "completions")
            key = spec.label or spec.name
            per[key] = values
            for i, v in enumerate(values):
                if v is None or total[i] is None:
                    total[i] = None
                else:
                    total[i] += spec.weight * float(v)
        return total, per


def reward_set(specs) -> RewardSet:
    for spec in specs:
        resolve(spec.name)  # fail on a bad name before any sampling
        if spec.name == "code":  # and on a sandbox that cannot isolate, unless weak isolation is allowed
            sandbox.require_isolation(bool(dict(spec.kwargs).get("allow_weak_isolation", False)))
    return RewardSet(tuple(specs))


def validate_fields(fields: Mapping, n: int) -> None:
    for k, v in fields.items():
        if len(v) != n:
            raise RewardError(f"reward field {k!r} has {len(v)} entries for {n} completions")
