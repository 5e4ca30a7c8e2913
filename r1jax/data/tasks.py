"""The built-in verifiable task: multi-step integer arithmetic, e.g. `3+4*5-2=?` → 21.

Problems are a pure function of (TaskConfig, split, index), so any row can be produced in any order
(grain random access) and every run sees the same data. An expression belongs to the held-out split
when a hash of its text falls in the first `heldout_fraction` of the hash range: train and held-out
are disjoint by construction, for every seed. The gold chain of thought reduces the expression one
operation at a time, multiplications first, in the R1 format:

    <think>
    3+4*5-2
    =3+20-2
    =23-2
    =21
    </think>

    <answer>21</answer>

Each line is the previous one with a single operation on small numbers done, which a tiny model can
partly learn in minutes; the long tail (carries, negative results) leaves room for RL.

The split, noise and distinct-problem machinery here is shared by the other built-in tasks
(task_countdown.py, task_running_sum.py, task_sort_words.py; chosen by name in task_registry.py),
whose problems are `Worked` instances.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

from r1jax.config import TaskConfig
from r1jax.data.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, EOS, THINK_CLOSE, THINK_OPEN
from r1jax.errors import ConfigError

SPLITS = {"train": 0, "eval": 1}
_HASH_BUCKETS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task instance. `steps[0]` is the expression, `steps[-1]` the answer."""

    id: str
    steps: tuple[str, ...]
    # The answer the gold completion tags, when it is a (deliberately) wrong one (TaskConfig.answer_noise).
    noisy_answer: str | None = None

    @property
    def expression(self) -> str:
        return self.steps[0]

    @property
    def answer(self) -> str:
        return self.steps[-1]

    @property
    def question(self) -> str:
        return f"{self.expression}=?"

    @property
    def key(self) -> str:
        """The text that decides the split and makes two problems the same."""
        return self.expression

    @property
    def gold(self) -> str:
        """What the `answer` column holds: what the task's verifier compares with."""
        return self.answer

    def messages(self) -> list[dict]:
        """The prompt as chat messages (one user turn)."""
        return [{"role": "user", "content": self.question}]

    def gold_completion(self) -> str:
        """The assistant turn in R1 format: reasoning inside <think>, then the tagged answer."""
        tagged = self.answer if self.noisy_answer is None else self.noisy_answer
        return r1_completion("\n=".join(self.steps), tagged)

    def sft_messages(self) -> list[dict]:
        return self.messages() + [{"role": "assistant", "content": self.gold_completion()}]


def r1_completion(chain: str, answer: str) -> str:
    """R1's completion format: the reasoning inside <think>, then the tagged answer."""
    return f"{THINK_OPEN}\n{chain}\n{THINK_CLOSE}\n\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


@dataclasses.dataclass(frozen=True)
class Worked:
    """A problem of one of the other built-in tasks: the prompt, the worked chain (lines inside
    <think>), the answer the completion tags, and `gold`, what the `answer` column holds for the
    task's verifier (the answer itself, or for Countdown the numbers and the target)."""

    id: str
    key: str  # decides the split; equal keys are the same problem
    question: str
    chain: tuple[str, ...]
    answer: str
    gold: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    def gold_completion(self) -> str:
        return r1_completion("\n".join(self.chain), self.answer)

    def sft_messages(self) -> list[dict]:
        return self.messages() + [{"role": "assistant", "content": self.gold_completion()}]


# --------------------------------------------------------------------------- generation


def split_of(expression: str, heldout_fraction: float) -> str:
    """'eval' or 'train' from a stable hash of the expression text (crc32, not Python's hash)."""
    bucket = zlib.crc32(expression.encode()) % _HASH_BUCKETS
    return "eval" if bucket < heldout_fraction * _HASH_BUCKETS else "train"


def _draw(cfg: TaskConfig, rng: np.random.Generator) -> list:
    """Random token list [n0, op, n1, op, n2, ...]."""
    n = int(rng.integers(cfg.min_operands, cfg.max_operands + 1))
    nums = rng.integers(0, cfg.max_operand + 1, size=n)
    ops = rng.choice(list(cfg.ops), size=n - 1)
    tokens: list = [int(nums[0])]
    for op, x in zip(ops, nums[1:]):
        tokens += [str(op), int(x)]
    return tokens


def _text(tokens: list) -> str:
    return "".join(str(t) for t in tokens)


def reduce_steps(tokens: list) -> tuple[str, ...]:
    """Evaluate one operation at a time (leftmost `*`, else leftmost `+`/`-`); each state as text."""
    steps = [_text(tokens)]
    tokens = list(tokens)
    while len(tokens) > 1:
        i = tokens.index("*") if "*" in tokens else 1
        a, op, b = tokens[i - 1: i + 2]
        value = a * b if op == "*" else a + b if op == "+" else a - b
        tokens[i - 1: i + 2] = [value]
        steps.append(_text(tokens))
    return tuple(steps)


def noise_stream(cfg: TaskConfig, index: int) -> np.random.Generator | None:
    """The random stream that slips train problem `index`'s answer, or None when it stays clean (a
    share 1 - `answer_noise`). Its own stream, so the problems do not depend on the noise level."""
    rng = np.random.default_rng([cfg.seed, 2, index])
    return rng if rng.random() < cfg.answer_noise else None


def noisy_answer(cfg: TaskConfig, index: int, answer: str) -> str | None:
    """A wrong answer (off by 1..3) for a share `answer_noise` of train problems, else None."""
    rng = noise_stream(cfg, index)
    return None if rng is None else str(int(answer) + int(rng.choice([-3, -2, -1, 1, 2, 3])))


def draw_in_split(cfg: TaskConfig, split: str, index: int, draw, key):
    """The first `draw(rng)` whose `key` falls in `split`, from the stream of (seed, split, index)."""
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    # A split holding a share p of the problems needs 1/p draws on average; after 50/p draws
    # (failure odds e^-50 when the split is not empty) it is taken to be empty.
    attempts = int(50 / min(cfg.heldout_fraction, 1 - cfg.heldout_fraction))
    for _ in range(attempts):
        item = draw(rng)
        if split_of(key(item), cfg.heldout_fraction) == split:
            return item
    raise ConfigError(f"task: no {split} problem of task {cfg.name!r} found in {attempts} draws; "
                      "make the task larger or change heldout_fraction")


def generate(cfg: TaskConfig, split: str, index: int) -> Problem:
    """Problem `index` of `split` (train: drawn with replacement; see `problems` for distinct ones)."""
    tokens = draw_in_split(cfg, split, index, lambda rng: _draw(cfg, rng), _text)
    steps = reduce_steps(tokens)
    return Problem(id=f"arith/{split}/{index}", steps=steps,
                   noisy_answer=noisy_answer(cfg, index, steps[-1]) if split == "train" else None)


def distinct_problems(cfg: TaskConfig, split: str, n: int, generate, prefix: str) -> list:
    """The first `n` problems of a split; the held-out split has no repeats (a fixed eval set)."""
    if split == "train":
        return [generate(cfg, split, i) for i in range(n)]
    out, seen, index = [], set(), 0
    while len(out) < n:
        if index >= n * 50:
            raise ConfigError(f"task.num_eval: only {len(out)} distinct held-out problems of task {cfg.name!r} "
                              f"found for {n} requested; make the task larger or ask for fewer")
        p = generate(cfg, split, index)
        index += 1
        if p.key not in seen:
            seen.add(p.key)
            out.append(dataclasses.replace(p, id=f"{prefix}/{split}/{len(out)}"))
    return out


def problems(cfg: TaskConfig, split: str, n: int) -> list[Problem]:
    """The first `n` arithmetic problems of a split (distinct on the held-out split)."""
    return distinct_problems(cfg, split, n, generate, "arith")


# --------------------------------------------------------------------------- verification

_ANSWER_TAG = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.S)
_INTEGER = re.compile(r"[+-]?\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces matched."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the last <answer>…</answer>, else the last \\boxed{…},
    else the text after the last </think>. None when there is none (malformed completion)."""
    text = completion.split(EOS)[0]
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        found = tagged[-1]
    elif (boxed := _last_boxed(text)) is not None:
        found = boxed
    elif THINK_CLOSE in text:
        found = text.split(THINK_CLOSE)[-1]
    else:
        return None
    found = found.strip()
    return found or None


def is_integer(text: str) -> bool:
    """A plain integer, sign and surrounding whitespace allowed (`+7`, ` 007 `)."""
    return _INTEGER.fullmatch(text.strip()) is not None


def answers_match(gold: str, answer: str) -> bool:
    """Integers compare as integers (`+7` == `7`); anything else as whitespace-normalized text."""
    if is_integer(gold):
        return is_integer(answer) and int(answer) == int(gold)
    gold, answer = gold.strip(), answer.strip()
    return " ".join(gold.split()) == " ".join(answer.split())


def verify(problem: Problem | str, completion: str) -> bool:
    """Whether `completion` (the text generated after the prompt) ends with the right answer.
    `problem` is a Problem or a gold answer string."""
    gold = problem.answer if isinstance(problem, Problem) else str(problem)
    answer = extract_answer(completion)
    return answer is not None and answers_match(gold, answer)
