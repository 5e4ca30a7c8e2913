"""Rewards in TRL's call convention, checked against TRL 1.16's own GRPOTrainer code: the keywords
its `_calculate_rewards` passes a reward function, its combination of several functions (weighted
nansum, NaN only where every function returned None), rewards split across processes, and a GRPO
run through the CLI on a user's jsonl rewarded by functions written for TRL."""

import json
import sys
import threading
import types

import numpy as np
import pytest

from r1jax.config import DataConfig, RewardSpec
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.rl import rewards

G = 2
ROWS = [  # a conversational prompt-only dataset (TRL's format) with two extra columns
    {"prompt": [{"role": "user", "content": "What is 3+4?"}], "solution": "7", "level": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2*5?"}],
     "solution": "10", "level": 2},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "solution": "any colour", "level": 3},
]
TEXTS = ["</think>\n\n<answer>7</answer>", "</think> 8", "</think> \\boxed{10}", "no", "red", "blue"]

CALLS = []
RECORDING, NONE_ON_SHORT = "tests.test_rewards_trl:recording_reward", "tests.test_rewards_trl:none_on_short"


def _calls() -> list:
    """The calls recorded by the module the reward specs import (pytest may import this file under
    another name, with its own CALLS)."""
    return sys.modules[rewards.resolve(RECORDING).__module__].CALLS


def recording_reward(prompts, completions, completion_ids, **kwargs):
    """Records what it is given; 1 for odd levels, None (cannot score) for the others."""
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return [1.0 if level % 2 else None for level in kwargs["level"]]


def none_on_short(completions, **kwargs):
    """Written for TRL: conversational completions; None when the text is under 4 characters."""
    return [None if len(c[0]["content"]) < 4 else len(c[0]["content"]) / 10 for c in completions]


def _batch(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    cfg = DataConfig(kind="prompts", sources=(str(path),), seq_len=64, batch_size=3, shuffle=False,
                     answer_field=None)
    return next(make_prompt_iterator(cfg))


def _trl_rewards(funcs, inputs, prompts, completions, completion_ids):
    """TRL's `GRPOTrainer._calculate_rewards`, unbound, on a stand-in trainer holding what it reads."""
    from accelerate import PartialState
    from trl import GRPOTrainer

    PartialState(cpu=True)  # TRL logs through accelerate (it warns about rows no function scored)
    fake = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device="cpu", is_main_process=True), args=types.SimpleNamespace(report_to=[]),
        state=types.SimpleNamespace(global_step=0), reward_funcs=funcs, reward_processing_classes=[None] * len(funcs),
        reward_func_names=[f.__name__ for f in funcs], _log_completion_extra=lambda *a: None,
        _log_metric=lambda *a: None, environments=None)
    return GRPOTrainer._calculate_rewards(fake, inputs, prompts, completions, completion_ids).numpy()


def _trl_combine(per_func, weights):
    """The two lines of TRL 1.16's `_generate_and_score_completions` that combine the functions."""
    import torch

    per_func = torch.as_tensor(per_func, dtype=torch.float32)
    rewards_ = (per_func * torch.tensor(weights, dtype=torch.float32).unsqueeze(0)).nansum(dim=1)
    rewards_[torch.isnan(per_func).all(dim=1)] = torch.nan
    return rewards_.numpy()


def test_reward_functions_get_what_trls_grpo_trainer_gives_them(tmp_path):
    batch = _batch(tmp_path)
    ids = [[5 + i] * (i + 1) for i in range(len(TEXTS))]
    prompts, completions, fields = rewards.rollout_inputs(batch, G, TEXTS, ids, [False] * 6, ["rendered"] * 6)
    calls = _calls()
    calls.clear()
    rs = rewards.reward_set((RewardSpec(RECORDING, weight=2.0), RewardSpec(NONE_ON_SHORT, weight=0.5)))
    ours = rs.scores(prompts, completions, **fields, **rewards.context(3, 10))
    (got,) = calls

    inputs = [dict(r) for r in ROWS for _ in range(G)]
    trl_prompts = [r["prompt"] for r in inputs]
    trl_completions = [[{"role": "assistant", "content": t}] for t in TEXTS]
    calls.clear()
    theirs = _trl_rewards([rewards.resolve(RECORDING), rewards.resolve(NONE_ON_SHORT)], inputs, trl_prompts,
                          trl_completions, ids)
    (want,) = calls

    trl_only = {"trainer_state", "log_extra", "log_metric"}
    assert trl_only <= set(want) and trl_only <= set(got)
    assert set(got) - set(want) == {"completion_lengths", "truncated", "prompt_texts"}  # r1jax's additions
    for key in set(want) - trl_only:
        assert got[key] == want[key], key
    assert got["trainer_state"].global_step == 3 and got["trainer_state"].max_steps == 10
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # level 2 (rows 2, 3) cannot be scored by the first, texts under 4 characters (3, 4) by the second:
    # row 3 by neither, so only it is invalid, and the others are the weighted sums of what is there
    np.testing.assert_array_equal(np.isnan(ours), [[0, 0], [0, 0], [1, 0], [1, 1], [0, 1], [0, 0]])
    total = rs.combine(ours)
    np.testing.assert_allclose(total, [2 + 0.5 * len(TEXTS[0]) / 10, 2 + 0.5 * 1.0, 0.5 * 1.9, np.nan, 2.0, 2 + 0.5 * 0.4])
    np.testing.assert_allclose(total, _trl_combine(theirs, [2.0, 0.5]), rtol=1e-6)


def test_several_functions_combine_as_trl_combines_them():
    rng = np.random.default_rng(0)
    per_func = rng.normal(size=(40, 3))
    per_func[rng.random((40, 3)) < 0.4] = np.nan
    per_func[:3] = np.nan  # rows no function could score
    weights = [1.0, 0.5, -2.0]
    rs = rewards.RewardSet(tuple(RewardSpec("format", weight=w) for w in weights))
    ours = rs.combine(per_func)
    theirs = _trl_combine(per_func, weights)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.isnan(ours).sum() >= 3
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    total, per = rs([""] * 2, ["a", "b"], prompt_texts=["", ""])  # __call__ keeps its (total, per) shape
    assert total == [0.0, 0.0] and list(per) == ["format"]  # one label for the three (same function)


def test_rewards_are_split_across_processes_and_gathered_once(tmp_path):
    """Three fake processes in threads, an all-gather by barrier: each scores only its block of the
    rows (every row scored exactly once in all), and each gets every row's scores, equal to one
    process scoring them all."""
    n, count = 10, 3
    prompts = [f"p{i}" for i in range(n)]
    completions = [f"c{i}" * (i % 4) for i in range(n)]
    fields = {"level": list(range(n)), "completion_ids": [[1]] * n}
    rs = rewards.RewardSet((RewardSpec(RECORDING), RewardSpec("tests.test_rewards_trl:none_on_short_text", weight=3.0)))
    CALLS = _calls()
    CALLS.clear()
    whole = rs.scores(prompts, completions, **fields)
    assert len(CALLS) == 1
    CALLS.clear()

    blocks, barrier, results = [None] * count, threading.Barrier(count), [None] * count

    def process(p):
        def gather(x):
            blocks[p] = x
            barrier.wait()
            return np.stack(blocks)
        results[p] = rewards.score_split(rs, prompts, completions, fields, {}, process_index=p,
                                         process_count=count, gather=gather)

    threads = [threading.Thread(target=process, args=(p,)) for p in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(c["level"]) for c in CALLS) == [3, 3, 4]
    assert sorted(lv for c in CALLS for lv in c["level"]) == list(range(n))
    for got in results:
        np.testing.assert_array_equal(got, whole)
    assert [len(rewards.process_rows(n, count, p)) for p in range(count)] == [3, 3, 4]


def none_on_short_text(completions, **kwargs):
    return [None if len(c) < 4 else float(len(c)) for c in completions]


def test_standard_prompts_give_string_completions_and_bad_columns_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "solution": 4}) + "\n")
    cfg = DataConfig(kind="prompts", sources=(str(path),), seq_len=32, batch_size=1, prompt_field="question",
                     answer_field="solution")
    batch = next(make_prompt_iterator(cfg))
    prompts, completions, fields = rewards.rollout_inputs(batch, 2, ["a", "b"], [[1], [2]], [False, True], ["r", "r"])
    assert prompts == ["2+2?", "2+2?"] and completions == ["a", "b"]
    # the gold answer under its column name, as TRL passes it, and as `answer` for the built-in accuracy
    assert fields["solution"] == [4, 4] and fields["answer"] == ["4", "4"] and "question" not in fields
    assert fields["truncated"] == [False, True] and fields["completion_lengths"] == [1, 1]
    with pytest.raises(rewards.RewardError, match="column 'truncated' has the name of a reward argument"):
        rewards.column_keywords([{"truncated": 1}])
    with pytest.raises(rewards.RewardError, match="`tests` must be a list"):
        rewards.code(["p"], ["```python\nprint(1)\n```"], tests=[7], allow_weak_isolation=True)


def level_reward(completions, level, **kwargs):
    """Written for TRL: reads the `level` column; cannot score (None) the even levels."""
    return [None if lv % 2 == 0 else min(len(c[0]["content"]), 20) / 20 for c, lv in zip(completions, level)]


def _user_jsonl(path):
    """GSM8K-like rows a user brings: a conversational prompt in `question`, the gold in `solution`."""
    rows = [{"question": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"What is {a}+{b}?"}],
             "solution": str(a + b), "level": i % 3} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2),
                                                                                  (7, 1), (4, 4), (9, 0), (3, 3)])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


CLI = ["configs/train/tiny_grpo.yaml", "steps=3", "eval_prompts=null", "progress=false", "samples_every=1",
       "num_generations=4", "max_new_tokens=8", "prompts.batch_size=2", "prompts.seq_len=48",
       "checkpoint.async_save=false", "prompts.prompt_field=question", "prompts.answer_field=solution",
       "rewards=[{name: 'trl.rewards:accuracy_reward'}, {name: 'tests.test_rewards_trl:level_reward', weight: 0.5}]"]


@pytest.mark.slow  # 35 s of CPU, 80 s on a loaded 2-core machine
def test_grpo_cli_on_a_users_jsonl_with_rewards_written_for_trl(tmp_path):
    """The must-show of issue 16: `r1jax train` GRPO from a jsonl of question/solution rows with a
    conversational prompt, rewarded by TRL's own accuracy_reward (reads `solution`) and a TRL-style
    function returning None on some rows, trains 3 steps."""
    from r1jax import cli
    from r1jax.train.metrics import read_metrics

    data = _user_jsonl(tmp_path / "user.jsonl")
    out = tmp_path / "run"
    assert cli.main(["train", *CLI, f"out_dir={out}", f"prompts.sources=[{data}]"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["loss"]) and {"reward/accuracy_reward", "reward/level_reward"} <= set(r)
    samples = [json.loads(line) for line in (out / "samples" / "step_000003.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    for s in samples:
        acc, lvl = s["rewards"]["accuracy_reward"], s["rewards"]["level_reward"]
        assert acc in (0.0, 1.0)  # every gold answer parses
        # a None from one function leaves the row scored by the other (TRL's nansum)
        assert s["reward"] == pytest.approx(acc + (0.0 if lvl is None else 0.5 * lvl))
    assert any(s["rewards"]["level_reward"] is None for s in samples)


def test_a_question_column_fails_before_compiling_naming_the_key(tmp_path, capsys):
    """Today's first-run failure: a GSM8K-style `question` column and the default prompt_field. The
    error comes before any model compiles and names the file, the row, the column and the key."""
    import time

    from r1jax import cli

    data = _user_jsonl(tmp_path / "user.jsonl")
    args = [a for a in CLI if not a.startswith("prompts.prompt_field")]
    t0 = time.perf_counter()
    assert cli.main(["train", *args, f"out_dir={tmp_path / 'run'}", f"prompts.sources=[{data}]"]) == 2
    assert time.perf_counter() - t0 < 20
    err = capsys.readouterr().err
    assert f"{data}:1: missing column 'prompt' (columns: level, question, solution); set prompts.prompt_field" in err


SCRIPT = """
import json, sys
import jax
import numpy as np
from r1jax.config import RewardSpec
from r1jax.parallel.mesh import initialize_distributed
from r1jax.rl import rewards
from r1jax.rl.grpo_loop import _allgather

initialize_distributed()
n = 9
prompts, completions = [f"p{i}" for i in range(n)], [f"c{i}" * (i % 4) for i in range(n)]
fields = {"level": list(range(n)), "completion_ids": [[1]] * n}
rs = rewards.RewardSet((RewardSpec("tests.test_rewards_trl:recording_reward"),
                        RewardSpec("tests.test_rewards_trl:none_on_short_text", weight=3.0)))
got = rewards.score_split(rs, prompts, completions, fields, {}, process_index=jax.process_index(),
                          process_count=jax.process_count(), gather=_allgather)
calls = sys.modules["tests.test_rewards_trl"].CALLS
print("RESULT", json.dumps({"levels": [c["level"] for c in calls], "scores": np.nan_to_num(got, nan=-1).tolist()}))
"""


def test_two_real_processes_each_score_their_rows_and_gather_all(tmp_path):
    """launch/local.sh: two JAX processes on loopback, the real all-gather (gloo)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([str(root / "launch/local.sh"), "-n", "2", "--cpu-devices", "1", "--", sys.executable, "-c",
                           SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        if "RESULT" in line:
            results[line.split("]")[0].strip("[ ")] = json.loads(line.split("RESULT", 1)[1])
    assert set(results) == {"0", "1"}, proc.stdout[-3000:]
    assert results["0"]["levels"] == [[0, 1, 2, 3]] and results["1"]["levels"] == [[4, 5, 6, 7, 8]]
    n = 9
    rs = rewards.RewardSet((RewardSpec(RECORDING), RewardSpec("tests.test_rewards_trl:none_on_short_text", weight=3.0)))
    whole = rs.scores([f"p{i}" for i in range(n)], [f"c{i}" * (i % 4) for i in range(n)], level=list(range(n)),
                      completion_ids=[[1]] * n)
    for r in results.values():
        np.testing.assert_array_equal(r["scores"], np.nan_to_num(whole, nan=-1))
