"""Rule-based rewards on hand-built completions, and the weighted reward set."""

import re

import pytest

from r1jax.config import RewardSpec
from r1jax.errors import ConfigError
from r1jax.rl import rewards

PROMPT = "<｜User｜>What is 2+3*4?<｜Assistant｜><think>\n"
GOOD = "3*4=12\n2+12=14\n</think>\n\n<answer>14</answer>"


def test_accuracy_uses_math_verify_on_the_final_answer():
    comps = [GOOD, GOOD.replace("14</answer>", "15</answer>"), "reasoning </think> the answer is \\boxed{14}",
             "</think> <answer>28/2</answer>", "no answer at all"]
    assert rewards.accuracy([PROMPT] * 5, comps, answer=["14"] * 5) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert rewards.accuracy([PROMPT], [GOOD], answer=["\\frac{28}{2}"]) == [1.0]
    assert rewards.accuracy([PROMPT], [GOOD], answer=[None]) == [None]


def test_integer_shortcut_agrees_with_math_verify():
    from math_verify import parse, verify

    values = ["0", "-0", "7", "+7", "007", "-7", "12", "-12", "120", "1000000000000000000001"]
    for gold in values:
        for answer in values + ["7.0", "14/2", "x"]:
            want = verify(parse(f"${gold}$"), parse(f"${answer}$"))
            assert rewards.accuracy([PROMPT], [f"</think> <answer>{answer}</answer>"], answer=[gold]) == [float(want)], (
                gold, answer)


def test_format_requires_each_tag_once_in_order():
    cases = {
        GOOD: 1.0,
        "3*4=12\n</think>\n\n14": 1.0,  # answer without answer tags is allowed
        "3*4=12\n</think>\n\n<answer>14</answer><answer>14</answer>": 0.0,  # repeated answer block
        "3*4=12\n</think>\n<think>again</think>\n<answer>14</answer>": 0.0,  # repeated think
        "3*4=12 <answer>14</answer></think>": 0.0,  # answer inside reasoning
        "no closing tag <answer>14</answer>": 0.0,
        "3*4=12\n</think>\n\n": 0.0,  # empty answer
    }
    got = rewards.format_reward([PROMPT] * len(cases), list(cases), prompt_texts=[PROMPT] * len(cases))
    assert got == list(cases.values())
    # without the generation prompt's <think>, the completion must open it itself
    assert rewards.format_reward(["plain prompt"], [GOOD], prompt_texts=["plain prompt"]) == [0.0]
    assert rewards.format_reward(["plain prompt"], ["<think>\n" + GOOD], prompt_texts=["plain prompt"]) == [1.0]


def test_tag_count_partial_credit():
    assert rewards.tag_count([PROMPT], [GOOD], prompt_texts=[PROMPT]) == [1.0]
    assert rewards.tag_count([PROMPT], ["x</think> 14"], prompt_texts=[PROMPT]) == [0.5]
    assert rewards.tag_count([PROMPT], ["x</think></think><answer>1"], prompt_texts=[PROMPT]) == [0.5]


def test_language_consistency():
    assert rewards.language_consistency([PROMPT], ["two plus three</think>5"], prompt_texts=[PROMPT]) == [1.0]
    got = rewards.language_consistency([PROMPT], ["two 加 三 plus</think>5"], prompt_texts=[PROMPT])[0]
    assert got == pytest.approx(0.5)
    assert rewards.language_consistency([PROMPT], ["三 加 二</think>5"], prompt_texts=[PROMPT], language="cjk") == [1.0]
    with pytest.raises(ConfigError, match="language"):
        rewards.language_consistency([PROMPT], ["x"], prompt_texts=[PROMPT], language="klingon")


def test_overlong_penalty_is_dapos_soft_rule():
    got = rewards.overlong_penalty(["p"] * 5, ["c"] * 5, completion_lengths=[10, 80, 90, 100, 101],
                                   max_length=100, cache_length=20)
    assert got == [0.0, 0.0, pytest.approx(-0.5), pytest.approx(-1.0), -1.0]


def test_reward_set_weights_skips_and_names_failures():
    specs = (RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=0.5))
    rs = rewards.reward_set(specs)
    total, per = rs([PROMPT] * 3, [GOOD, "bad", GOOD], answer=["14", "14", None], prompt_texts=[PROMPT] * 3,
                    completion_lengths=[5, 5, 5], truncated=[False] * 3)
    assert total == [1.5, 0.0, 0.5]  # TRL: one None leaves the other functions' weighted sum
    assert per["accuracy"] == [1.0, 0.0, None] and per["format"] == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="unknown reward 'acuracy'"):
        rewards.reward_set((RewardSpec(name="acuracy"),))
    with pytest.raises(ConfigError, match="cannot import 'no_such_module:f'"):
        rewards.reward_set((RewardSpec(name="no_such_module:f"),))
    for malformed in (":f", "..x:f", "x.:f", "x:f.g"):  # importlib would raise ValueError/TypeError
        with pytest.raises(ConfigError, match=f"rewards: '{re.escape(malformed)}' is not a dotted path"):
            rewards.reward_set((RewardSpec(name=malformed),))
    boom = rewards.reward_set((RewardSpec(name="tests.test_rewards:exploding_reward"),))
    with pytest.raises(rewards.RewardError, match="reward 'tests.test_rewards:exploding_reward' raised ZeroDivisionError"):
        boom([PROMPT], [GOOD], answer=["14"], completion_lengths=[3], truncated=[False])


def exploding_reward(prompts, completions, **_):
    return [1 / 0 for _ in completions]


def test_rejection_sampling_judges_the_format_after_r1s_generation_prompt():
    """The generation prompt opens `<think>`; rejection's filter passes the rendered prompt along."""
    from r1jax.config import RejectionConfig
    from r1jax.rl.rejection import _keep

    cfg = RejectionConfig(require_format=True, min_tokens=1)
    assert _keep(PROMPT, GOOD, "14", 20, True, cfg) is None
    assert _keep(PROMPT, "<think>\n" + GOOD, "14", 20, True, cfg) == "format"  # a second <think>


def test_grpo_config_names_reward_clashes_before_anything_runs():
    from r1jax import config

    base = ["prompts.answer_field=null"]
    with pytest.raises(ConfigError, match=r"^prompts\.answer_field: is null, but the accuracy reward needs"):
        config.load_stage("configs/train/tiny_grpo.yaml", base)
    with pytest.raises(ConfigError, match=r"^rewards: two reward functions are named 'f' in the metrics"):
        config.load_stage("configs/train/tiny_grpo.yaml", ["rewards=[{name: 'a.b:f'}, {name: 'c:f'}]"])
    cfg = config.load_stage("configs/train/tiny_grpo.yaml", ["rewards=[{name: 'a.b:f'}, {name: 'c:f', label: g}]"])
    assert [r.metric_name for r in cfg.rewards] == ["f", "g"]
