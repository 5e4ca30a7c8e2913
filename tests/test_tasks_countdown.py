"""The built-in Countdown task: deterministic problems with disjoint splits, every problem solvable
(checked by an exhaustive search written here over exact fractions), gold chains verify, and the
verifier rejects wrong, malformed and number-breaking answers; its parser agrees with Python's."""

import dataclasses
import itertools
import random
import re
from fractions import Fraction

import pytest

from r1jax.config import TaskConfig, from_dict
from r1jax.data import task_countdown as cd
from r1jax.errors import ConfigError

CFG = TaskConfig(name="countdown")


def reachable(numbers) -> set:
    """Every value an expression over a sub-multiset of `numbers` (each at most once) can take, with
    + - * / over exact fractions (any intermediate sign): the reference the task is checked against."""
    values = set()

    def combine(items):
        for x in items:
            values.add(x)
        for i, j in itertools.combinations(range(len(items)), 2):
            a, b = items[i], items[j]
            rest = [x for k, x in enumerate(items) if k not in (i, j)]
            results = {a + b, a - b, b - a, a * b}
            results |= {a / b} if b else set()
            results |= {b / a} if a else set()
            for r in results:
                combine(rest + [r])

    combine([Fraction(n) for n in numbers])
    return values


def test_problems_are_deterministic_and_random_access():
    a = cd.problems(CFG, "train", 40)
    assert a == cd.problems(CFG, "train", 40)
    assert cd.generate(CFG, "train", 17) == a[17]
    assert a != cd.problems(dataclasses.replace(CFG, seed=1), "train", 40)


def test_splits_are_disjoint_and_heldout_is_distinct():
    train = {p.key for p in cd.problems(CFG, "train", 3000)}
    held = cd.problems(CFG, "eval", CFG.num_eval)
    keys = [p.key for p in held]
    assert len(set(keys)) == len(keys) == CFG.num_eval
    assert not train & set(keys)


def test_every_problem_is_solvable_and_its_gold_chain_verifies():
    for p in cd.problems(CFG, "train", 150) + cd.problems(CFG, "eval", 50):
        numbers, target = cd.parse_spec(p.gold)
        assert 3 == len(numbers) and all(1 <= n <= 20 for n in numbers) and 1 <= target <= 100
        assert Fraction(target) in reachable(numbers), p.gold
        assert cd.verify(p.gold, p.gold_completion()), p
        assert p.chain[0] == p.gold and p.question == f"reach {target} with {' '.join(map(str, numbers))}"
        # The chain's last line reaches the target; dead ends are marked and come before it.
        assert p.chain[-1].split(" [")[0].endswith(f"={target}") or str(target) in p.chain[0].split(" -> ")[0].split()
        assert not any(line.endswith(" no") for line in p.chain[-1:])


def test_four_numbers():
    cfg = from_dict(TaskConfig, {"name": "countdown", "countdown": {"min_numbers": 4, "max_numbers": 4}}, "task")
    for p in cd.problems(cfg, "train", 20):
        numbers, target = cd.parse_spec(p.gold)
        assert len(numbers) == 4 and Fraction(target) in reachable(numbers)
        assert cd.verify(p.gold, p.gold_completion())


_LINE = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)(?: \[([\d ]+)\])?(?:: ([\d ]+))?( no)?$")


def _last_values(x: int, y: int) -> list[int]:
    """What combining two whole numbers gives under the task's rule (larger first, + - * /, only
    positive whole results), computed here with Fractions."""
    a, b = Fraction(max(x, y)), Fraction(min(x, y))
    return [int(v) for v in (a + b, a - b, a * b, a / b) if v > 0 and v.denominator == 1]


@pytest.mark.parametrize("numbers", [3, 4])
def test_checked_chain_works_every_step_out_on_the_page(numbers):
    """Every line's step is right arithmetic; a line leaving two numbers lists what their last
    combination gives, in order, up to the target; a `no` line's list misses the target, and the
    line on the path that finds it is followed by that combination."""
    cfg = from_dict(TaskConfig, {"name": "countdown", "countdown": {
        "min_numbers": numbers, "max_numbers": numbers, "max_number": 10, "max_target": 30}}, "task")
    listed = dead = 0
    for p in cd.problems(cfg, "train", 200):
        given, target = cd.parse_spec(p.gold)
        for k, line in enumerate(p.chain[1:], 1):
            m = _LINE.match(line)
            assert m, line
            a, op, b, out = int(m[1]), m[2], int(m[3]), int(m[4])
            assert Fraction(out) == {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op], line
            left = [int(v) for v in m[5].split()] if m[5] else []
            if len(left) != 2 or target in left:
                assert m[6] is None, line  # nothing to list: more than two left, or the target is there
                continue
            values = [int(v) for v in m[6].split()]
            want = _last_values(*left)
            if m[7]:  # a dead end: every last combination listed, none the target
                dead += 1
                assert values == want and target not in values, (p.gold, line)
            else:  # the path: listed up to the target, then that combination is the next line
                assert values == want[:want.index(target) + 1], (p.gold, line)
                nxt = _LINE.match(p.chain[k + 1])
                assert int(nxt[4]) == target and sorted([int(nxt[1]), int(nxt[3])]) == sorted(left)
            listed += 1
        assert cd.verify(p.gold, p.gold_completion())
    # Three numbers: every first move leaves two; four: only the path's second move does (deeper dead
    # ends stay silent), so no dead end lists values.
    if numbers == 3:
        assert listed > 300 and dead > 150
    else:
        assert listed > 100 and dead == 0


def test_silent_chain_marks_dead_ends_alone_and_the_name_is_checked():
    silent = from_dict(TaskConfig, {"name": "countdown", "countdown": {"chain": "silent"}}, "task")
    checked = cd.problems(CFG, "train", 50)
    for p, q in zip(cd.problems(silent, "train", 50), checked):
        assert p.gold == q.gold and p.answer == q.answer  # the same problems and search, written shorter
        assert not any(":" in line for line in p.chain)
        assert [line.split(":")[0] + (" no" if line.endswith(" no") else "") for line in q.chain] == list(p.chain)
    with pytest.raises(ConfigError, match=r"task\.countdown\.chain: must be one of \['checked', 'silent'\], got 'quiet'"):
        from_dict(TaskConfig, {"name": "countdown", "countdown": {"chain": "quiet"}}, "task")
    with pytest.raises(ValueError, match="countdown chain must be 'checked' or 'silent', got 'x'"):
        cd.worked_chain([1, 2, 3], 6, "x")


def test_search_agrees_with_the_exhaustive_reference():
    """Where the chain's search (positive integer steps) finds an expression, it is right; where the
    reference finds no value equal to the target, neither does the search."""
    rng = random.Random(0)
    found = 0
    for _ in range(300):
        numbers = [rng.randint(1, 12) for _ in range(3)]
        target = rng.randint(1, 60)
        out = cd.worked_chain(numbers, target)
        if Fraction(target) not in reachable(numbers):
            assert out is None
        elif out is not None:
            found += 1
            value, used = cd.evaluate_expression(out[1])
            assert value == target and cd.uses_given(used, numbers)
    assert found > 50  # 79 of the 300 random pairs


def _tagged(expr: str) -> str:
    return f"<think>\nx\n</think>\n\n<answer>{expr}</answer>"


@pytest.mark.parametrize("answer,ok", [
    ("7*3+5-2", True),
    ("(7-5)*(3*2)*2", False),  # 2 used twice
    ("7*3+5-2+0", False),  # 0 not given
    ("7*3+5", False),  # 26: the wrong value
    ("(5+7)*2", True),  # a subset suffices: each number at most once
    ("24", False),  # 24 is not a given number
    ("7*3+5-2=24", False),  # an equation, not an expression
    ("7*3+(5-2", False),  # unbalanced
    ("7*3++5-2", False),  # malformed
    ("-2+7*3+5", False),  # no unary minus: only given numbers
    ("__import__('os')", False),
    ("7/0+24", False),  # division by zero
    ("", False),
])
def test_verifier_judges_answers(answer, ok):
    assert cd.verify("3 5 7 2 -> 24", _tagged(answer)) is ok


def test_verifier_needs_an_answer_and_a_well_formed_gold():
    assert not cd.verify("3 5 7 2 -> 24", "<think>\n7*3+5-2")  # no final answer
    assert cd.verify("3 5 7 2 -> 24", "<think>\nx\n</think>\n7*3 + 5 - 2")  # after </think>, spaces allowed
    assert cd.verify("6 4 -> 1", _tagged("(6-4)/2")) is False  # 2 not given
    assert cd.verify("6 4 2 -> 1", _tagged("(6-4)/2")) is True
    assert cd.verify("3 4 -> 1", _tagged("4/3*3/4")) is False  # 3 and 4 twice
    with pytest.raises(ValueError, match="3 5 7 2 -> 24"):
        cd.verify("24", _tagged("24"))


def test_parser_agrees_with_python_on_random_expressions():
    """Python's own parser and precedence, over Fractions, as the reference (test-only eval)."""
    rng = random.Random(1)

    def expr(depth):
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(0, 30))
        e = f"{expr(depth - 1)}{rng.choice('+-*/')}{expr(depth - 1)}"
        return f"({e})" if rng.random() < 0.4 else e

    checked = 0
    for _ in range(400):
        text = expr(3)
        try:
            want = eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", text), {"Fraction": Fraction})
        except ZeroDivisionError:
            assert cd.evaluate_expression(text) is None
            continue
        value, used = cd.evaluate_expression(text)
        assert value == want and used == [int(x) for x in re.findall(r"\d+", text)]
        checked += 1
    assert checked > 300


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^task\.countdown\.max_numbers:"):
        from_dict(TaskConfig, {"name": "countdown", "countdown": {"max_numbers": 5}}, "task")
    with pytest.raises(ConfigError, match=r"^task\.answer_noise:.*sort_words"):
        from_dict(TaskConfig, {"name": "sort_words", "answer_noise": 0.5}, "task")


def test_noise_slips_one_operator_of_the_tagged_expression_and_misses_the_target():
    """With answer_noise, about that share of the train rows tag a wrong answer: the chain's expression
    with one operator changed, evaluated here with Python over exact fractions to miss the target, or
    a bare-number answer off by 1..3; questions, chains and gold are the clean rows', and held-out rows
    are never noisy."""
    small = {"countdown": {"max_number": 10, "max_target": 30}}
    clean_cfg = from_dict(TaskConfig, {"name": "countdown", **small}, "task")
    noisy_cfg = from_dict(TaskConfig, {"name": "countdown", "answer_noise": 0.5, **small}, "task")
    clean = [cd.generate(clean_cfg, "train", i) for i in range(600)]
    rows = [cd.generate(noisy_cfg, "train", i) for i in range(600)]
    assert [(p.question, p.chain, p.gold) for p in rows] == [(p.question, p.chain, p.gold) for p in clean]
    changed = [(p, c) for p, c in zip(rows, clean) if p.answer != c.answer]
    assert 0.4 < len(changed) / len(rows) < 0.6, len(changed)
    bare = [(p, c) for p, c in changed if c.answer.isdigit()]
    assert 10 < len(bare) < len(changed) - 100  # both kinds occur
    for p, c in changed:
        numbers, target = cd.parse_spec(p.gold)
        value = eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", p.answer), {"Fraction": Fraction})
        assert value != target and not cd.verify(p.gold, p.gold_completion())
        assert cd.verify(c.gold, c.gold_completion())
        if c.answer.isdigit():
            assert 1 <= abs(int(p.answer) - int(c.answer)) <= 3 and int(p.answer) >= 0
        else:
            diff = [(a, b) for a, b in zip(p.answer, c.answer) if a != b]
            assert len(p.answer) == len(c.answer) and len(diff) == 1 and set(diff[0]) <= set("+-*/")
    assert all(cd.verify(p.gold, p.gold_completion()) for p in cd.problems(noisy_cfg, "eval", 100))
