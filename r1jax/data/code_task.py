"""The built-in code task: small stdin → stdout programs, judged by running them on test cases.

A problem is one of a few kinds of program (add a constant to each number, count the words, ...)
with a constant `k`; its rows carry the test cases in a `tests` column, each
`{"input": stdin, "output": expected stdout}`, which the `code` reward (rl/rewards.py) runs in the
sandbox. Like the arithmetic task, a problem is a pure function of (split, index): the held-out
split is the (kind, k) pairs whose hash falls in the first tenth of the range, so train and
held-out problems never share a program. Selected as `task:code:train` / `task:code:eval`.

Each row also carries a gold completion in the R1 format (a short reasoning, then the program in a
```python block), so the same source serves SFT and GRPO.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

SPLITS = ("train", "eval")
NUM_TRAIN = 2000  # rows of task:code:train (programs repeat with new test cases); eval: each held-out program once
_HELDOUT_BUCKETS = 10  # one bucket in ten is held out
_CASES = 3


@dataclasses.dataclass(frozen=True)
class Kind:
    """A family of programs: the statement and the gold program, both with `{k}` filled in, and how
    to make one test case (stdin, expected stdout) from a random generator."""

    name: str
    statement: str
    program: str
    case: object  # (random.Random, k) -> (stdin, stdout)


def _numbers(rng: random.Random, n: int | None = None) -> list[int]:
    return [rng.randint(-50, 50) for _ in range(n or rng.randint(1, 6))]


KINDS = (
    Kind("add_k", "Read one line of space-separated integers and print each plus {k}, space-separated.",
         "print(*[int(x) + {k} for x in input().split()])",
         lambda r, k: (" ".join(map(str, xs := _numbers(r))), " ".join(str(x + k) for x in xs))),
    Kind("times_k", "Read one line of space-separated integers and print their sum times {k}.",
         "print(sum(int(x) for x in input().split()) * {k})",
         lambda r, k: (" ".join(map(str, xs := _numbers(r))), str(sum(xs) * k))),
    Kind("above_k", "Read one line of space-separated integers and print how many are greater than {k}.",
         "print(sum(int(x) > {k} for x in input().split()))",
         lambda r, k: (" ".join(map(str, xs := _numbers(r))), str(sum(x > k for x in xs)))),
    Kind("repeat_k", "Read one word and print it {k} times with no spaces.",
         "print(input().strip() * {k})",
         lambda r, k: (w := "".join(r.choice("abcxyz") for _ in range(r.randint(1, 4))), w * k)),
    Kind("mod_k", "Read one integer and print its remainder modulo {k} (Python's %).",
         "print(int(input()) % {k})",
         lambda r, k: (str(x := r.randint(-99, 99)), str(x % k))),
)
K_VALUES = range(2, 42)


def _key(kind: Kind, k: int) -> str:
    return f"{kind.name}:{k}"


def _split_of(kind: Kind, k: int) -> str:
    return "eval" if zlib.crc32(_key(kind, k).encode()) % _HELDOUT_BUCKETS == 0 else "train"


# Every (kind, k) program of each split, in a fixed order.
_PROGRAMS = {s: [(kind, k) for kind in KINDS for k in K_VALUES if _split_of(kind, k) == s] for s in SPLITS}


def num_rows(split: str) -> int:
    return NUM_TRAIN if split == "train" else len(_PROGRAMS["eval"])


def record(split: str, i: int) -> dict:
    """Row `i` of a split: id, prompt, tests, the gold solution and completion, sft messages, and an
    empty `answer` (code is judged by its tests, not by a gold answer)."""
    if split not in SPLITS:
        raise ValueError(f"code task split: one of {SPLITS}, got {split!r}")
    programs = _PROGRAMS[split]
    kind, k = programs[i % len(programs)]
    rng = random.Random(zlib.crc32(f"{split}:{i}".encode()))
    tests = [dict(zip(("input", "output"), kind.case(rng, k))) for _ in range(_CASES)]
    prompt = kind.statement.format(k=k) + " Use stdin and stdout; answer with a ```python block."
    solution = kind.program.format(k=k)
    completion = f"<think>\nA one-line program does it.\n</think>\n\n```python\n{solution}\n```"
    return {"id": f"code:{split}:{i}", "prompt": prompt, "answer": "", "tests": tests, "solution": solution,
            "completion": completion,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
