"""The built-in arithmetic task: determinism, disjoint splits, correct gold reasoning, the verifier."""

import dataclasses

import pytest

from r1jax.config import ConfigError, TaskConfig, from_dict
from r1jax.data import tasks
from r1jax.data.tasks import Problem, extract_answer, verify

CFG = TaskConfig()


def test_deterministic_and_seeded():
    a = tasks.problems(CFG, "train", 50)
    assert a == tasks.problems(CFG, "train", 50)
    assert tasks.generate(CFG, "train", 17) == a[17]  # random access equals sequential
    b = tasks.problems(dataclasses.replace(CFG, seed=1), "train", 50)
    assert [p.expression for p in a] != [p.expression for p in b]


def test_splits_are_disjoint_and_eval_is_distinct():
    train = {p.expression for p in tasks.problems(CFG, "train", 3000)}
    held_out = tasks.problems(CFG, "eval", CFG.num_eval)
    assert len({p.expression for p in held_out}) == CFG.num_eval
    assert not train & {p.expression for p in held_out}
    # The split is a property of the expression, not of the seed.
    other = tasks.problems(dataclasses.replace(CFG, seed=7), "train", 3000)
    assert not {p.expression for p in other} & {p.expression for p in held_out}


def test_gold_reasoning_matches_python_arithmetic():
    for p in tasks.problems(CFG, "train", 500) + tasks.problems(CFG, "eval", 100):
        assert int(p.answer) == eval(p.expression)  # Python's precedence is the reference
        for step in p.steps:
            assert eval(step) == int(p.answer)  # every line is an equal expression
        assert len(p.steps) == sum(p.expression.count(op) for op in "+-*") + 1  # one operation a line


def test_gold_completion_format():
    p = Problem(id="x", steps=tasks.reduce_steps([3, "+", 4, "*", 5, "-", 2]))
    assert p.question == "3+4*5-2=?"
    assert p.gold_completion() == "<think>\n3+4*5-2\n=3+20-2\n=23-2\n=21\n</think>\n\n<answer>21</answer>"
    assert p.sft_messages()[-1] == {"role": "assistant", "content": p.gold_completion()}
    assert verify(p, p.gold_completion())
    # The sampler's completion starts after the generation prompt's "<think>\n".
    assert verify(p, p.gold_completion().removeprefix("<think>\n") + "<｜end▁of▁sentence｜>")


def test_difficulty_knobs():
    sums = TaskConfig(ops="+", min_operands=4, max_operands=5, max_operand=20)
    for p in tasks.problems(sums, "train", 200):
        assert set(p.expression) <= set("0123456789+")
        nums = [int(x) for x in p.expression.split("+")]
        assert 4 <= len(nums) <= 5 and max(nums) <= 20


@pytest.mark.parametrize("completion, ok", [
    ("x\n</think>\n\n<answer>21</answer>", True),
    ("<answer>21</answer>", True),
    ("<answer> +21 </answer>", True),
    ("</think>\n\nThe answer is \\boxed{21}.", True),
    ("</think>\n\n21", True),
    ("</think>\n\n21<｜end▁of▁sentence｜>garbage", True),
    ("<answer>7</answer> then <answer>21</answer>", True),  # the last answer counts
    ("</think>\n\n<answer>20</answer>", False),
    ("</think>\n\n<answer>21.0</answer>", False),  # integers only, strictly
    ("</think>\n\n<answer>2 1</answer>", False),
    ("</think>\n\n<answer></answer>", False),
    ("</think>\n\nThe answer is 21", False),
    ("no tags at all 21", False),  # malformed: no final answer to read
    ("<answer>21", False),
    ("", False),
    ("\\boxed{21", False),
])
def test_verify(completion, ok):
    assert verify("21", completion) is ok


def test_extract_answer_and_text_answers():
    assert extract_answer("</think>\n\n\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("thinking without end") is None
    assert verify("Paris", "</think><answer>  Paris </answer>")
    assert not verify("Paris", "</think><answer>paris</answer>")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^task\.ops:"):
        from_dict(TaskConfig, {"ops": "/"}, "task")
    with pytest.raises(ConfigError, match=r"^task\.max_operands:"):
        from_dict(TaskConfig, {"min_operands": 4, "max_operands": 3}, "task")
    with pytest.raises(ConfigError, match=r"^split:"):
        tasks.generate(CFG, "test", 0)
    tiny = TaskConfig(min_operands=2, max_operands=2, max_operand=9, ops="+")  # 100 expressions
    with pytest.raises(ConfigError, match="num_eval: only"):
        tasks.problems(tiny, "eval", 20)


def test_answer_noise_mislabels_only_that_share_of_train_gold_answers():
    noisy_cfg = dataclasses.replace(CFG, answer_noise=0.3)
    clean = [tasks.generate(CFG, "train", i) for i in range(2000)]
    noisy = [tasks.generate(noisy_cfg, "train", i) for i in range(2000)]
    assert [p.steps for p in clean] == [p.steps for p in noisy]  # same problems, only the labels change
    wrong = [p for p in noisy if not verify(p, p.gold_completion())]
    assert abs(len(wrong) / 2000 - 0.3) < 0.03  # binomial sd ≈ 0.01
    for p in wrong:  # the reasoning is still right; only the tagged answer is off, by 1 to 3
        assert p.gold_completion().split("</think>")[0].rstrip().endswith("=" + p.answer)
        assert 1 <= abs(int(extract_answer(p.gold_completion())) - int(p.answer)) <= 3
    assert all(verify(p, p.gold_completion()) for p in tasks.problems(noisy_cfg, "eval", 50))
    with pytest.raises(ConfigError, match=r"^task\.answer_noise:"):
        from_dict(TaskConfig, {"answer_noise": 1.0}, "task")
