"""The `code` reward end to end on the built-in code task (`task:code:*`): rows from the data
pipeline carry their test cases in a `tests` column, the reward gets them as TRL passes columns,
and runs each completion's program in the sandbox: correct programs score 1, wrong ones 0, and
hostile ones 0 (or their honest score) without touching the host."""

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from r1jax.config import DataConfig, RewardSpec
from r1jax.data import code_task
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.rl import rewards, sandbox

WEAK = sandbox.isolation_problem() is not None
FAST = {"cpu_seconds": 2, "wall_seconds": 4, "allow_weak_isolation": WEAK}


def _batch(n: int, split: str = "eval"):
    cfg = DataConfig(kind="prompts", sources=(f"task:code:{split}",), seq_len=192, batch_size=n, shuffle=False)
    return next(make_prompt_iterator(cfg))


def _score(batch, programs: list[str]) -> list:
    """Score one completion a prompt, through the same call the GRPO loop makes."""
    texts = [f"<think>\nok\n</think>\n\n```python\n{p}\n```" for p in programs]
    prompts, completions, fields = rewards.rollout_inputs(batch, 1, texts, [[0]] * len(texts), [False] * len(texts),
                                                          ["<think>\n"] * len(texts))
    rs = rewards.reward_set((RewardSpec("code", kwargs=FAST),))
    total, per = rs(prompts, completions, **fields)
    return total


def test_the_code_task_is_deterministic_and_its_splits_disjoint():
    assert code_task.record("train", 5) == code_task.record("train", 5)
    programs = {s: {code_task.record(s, i)["solution"] for i in range(code_task.num_rows(s))} for s in ("train", "eval")}
    assert len(programs["eval"]) == code_task.num_rows("eval") >= 15  # each held-out program once
    assert len(programs["train"]) >= 150 and not programs["train"] & programs["eval"]
    row = code_task.record("eval", 0)
    assert len(row["tests"]) == 3 and all(set(t) == {"input", "output"} for t in row["tests"])


def test_gold_programs_score_one_and_wrong_ones_zero():
    batch = _batch(6)
    assert [len(c["tests"]) for c in batch["columns"]] == [3] * 6
    gold = [c["solution"] for c in batch["columns"]]
    assert _score(batch, gold) == [1.0] * 6
    wrong = [g.replace("print(", "print(1 + ", 1) if "int(" in g else "print('nope')" for g in gold]
    assert _score(batch, wrong) == [0.0] * 6
    # half right: a program that passes some cases gets the fraction (or 0 with all_or_nothing)
    row = code_task.record("eval", 0)
    first = row["tests"][0]
    cheat = f"s = input()\nprint({first['output']!r} if s == {first['input']!r} else 'x')"
    got = rewards.code(["p"], [f"```python\n{cheat}\n```"], tests=[row["tests"]], **FAST)
    assert got == [pytest.approx(1 / 3)]
    assert rewards.code(["p"], [f"```python\n{cheat}\n```"], tests=[row["tests"]], all_or_nothing=True, **FAST) == [0.0]
    # no code block: 0; a row without tests cannot be scored: None
    assert rewards.code(["p", "p"], ["no code", "```python\nprint(1)\n```"], tests=[row["tests"], []], **FAST) == [0.0, None]


@pytest.mark.skipif(WEAK, reason=f"no namespaces here: {sandbox.isolation_problem()}")
def test_hostile_programs_score_zero_and_leave_the_host_alone():
    batch = _batch(5)
    token = f"r1jaxcodetask{uuid.uuid4().hex[:10]}"
    host_file = Path("/tmp") / f"{token}.txt"  # /tmp exists in the sandbox too: its own, private one
    gold = [c["solution"] for c in batch["columns"]]
    hostile = [
        "while True:\n    pass",  # runs to the CPU limit
        f"open({str(host_file)!r}, 'w').write('pwned')\n" + gold[1],  # writes outside, then answers
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",  # tries to kill its parent
        "print('x' * 50_000_000)",  # floods its output
        "import os\nwhile True:\n    os.fork()",  # fork bomb
    ]
    t0 = time.perf_counter()
    got = _score(batch, hostile)
    elapsed = time.perf_counter() - t0
    assert got[0] == 0.0 and got[2] == 0.0 and got[3] == 0.0 and got[4] == 0.0
    assert got[1] == 1.0  # the program itself is right (its honest score); its write never reached the host
    assert not host_file.exists()
    assert elapsed < 3 * 3 * FAST["wall_seconds"]  # 15 runs, 4 at a time, each bounded by the wall limit
    assert os.getpid() > 0 and Path(f"/proc/{os.getpid()}").exists()  # we are alive


def test_code_reward_reads_tests_given_as_json_text():
    row = code_task.record("train", 1)
    src = f"```python\n{row['solution']}\n```"
    assert rewards.code(["p"], [src], tests=[json.dumps(row["tests"])], **FAST) == [1.0]
    assert rewards.code(["p"], [[{"role": "assistant", "content": src}]], tests=[row["tests"]], **FAST) == [1.0]
