"""The built-in tasks selected by name: running sums and word sorting against numpy/Python
references, every task's rows (the `task` column, gold chains that verify), the `accuracy` reward
and eval judging each row with its own task's verifier, and a clear error for a bad name."""

import dataclasses

import numpy as np
import pytest

from r1jax.config import DataConfig, PipelineConfig, TaskConfig, from_dict
from r1jax.data import task_registry, task_running_sum, task_sort_words, tasks
from r1jax.data.sources import open_source
from r1jax.errors import ConfigError
from r1jax.rl import rewards


def _tagged(answer: str) -> str:
    return f"<think>\nx\n</think>\n\n<answer>{answer}</answer>"


@pytest.mark.parametrize("name", ["running_sum", "sort_words"])
def test_deterministic_disjoint_and_distinct(name):
    cfg = TaskConfig(name=name)
    a = task_registry.problems(cfg, "train", 50)
    assert a == task_registry.problems(cfg, "train", 50)
    assert task_registry.generate(cfg, "train", 17) == a[17]
    assert a != task_registry.problems(dataclasses.replace(cfg, seed=1), "train", 50)
    train = {p.key for p in task_registry.problems(cfg, "train", 3000)}
    held = [p.key for p in task_registry.problems(cfg, "eval", cfg.num_eval)]
    assert len(set(held)) == len(held) == cfg.num_eval and not train & set(held)


def test_running_sums_against_numpy():
    cfg = from_dict(TaskConfig, {"name": "running_sum", "running_sum": {"min_terms": 3, "max_terms": 6,
                                                                        "digits": 4}}, "task")
    for p in task_running_sum.problems(cfg, "train", 200):
        terms = np.array(p.question.removeprefix("add ").split(), np.int64)
        assert 3 <= len(terms) <= 6 and terms.min() >= 1000 and terms.max() <= 9999
        assert int(p.answer) == int(p.gold) == int(terms.sum())
        totals = [int(line.split("=")[-1]) for line in p.chain[1:]]
        assert totals == np.cumsum(terms)[1:].tolist()
        assert tasks.verify(p.gold, p.gold_completion())
        assert not tasks.verify(p.gold, _tagged(str(int(terms.sum()) + 1)))


@pytest.mark.parametrize("digits", [1, 2, 4])
def test_running_sum_columns_are_paper_addition(digits):
    """Each chain line's columns, read back, are the decimal digits of the term and the running total
    (numpy integer division) plus the carry out of the column before, summed; the line's total is
    what they make. `chain: lines` keeps the one-go lines."""
    cfg = from_dict(TaskConfig, {"name": "running_sum", "running_sum": {"min_terms": 2, "max_terms": 5,
                                                                        "digits": digits}}, "task")
    carried = 0
    for p in task_running_sum.problems(cfg, "train", 300):
        terms = np.array(p.question.removeprefix("add ").split(), np.int64)
        totals = np.cumsum(terms)
        assert p.chain[0] == str(terms[0]) and len(p.chain) == len(terms)
        for line, term, before, after in zip(p.chain[1:], terms[1:], totals[:-1], totals[1:]):
            head, work = line.split(": ")
            *columns, result = work.split(" ")
            assert head == f"+{term}" and result == f"={after}"
            width = max(len(str(term)), len(str(before)))
            assert len(columns) == width
            carry = 0
            for i, col in enumerate(columns):
                lhs, s = col.split("=")
                want = [d for d, n in ((term // 10 ** i % 10, term), (before // 10 ** i % 10, before))
                        if i < len(str(int(n)))]  # a number's digits, 0 written as one
                assert [int(x) for x in lhs.split("+")] == want + [1] * carry and int(s) == sum(want) + carry
                carry = int(s) // 10
                carried += carry
        lines = task_running_sum.generate(dataclasses.replace(
            cfg, running_sum=dataclasses.replace(cfg.running_sum, chain="lines")), "train", 0).chain
        assert all(line.count("=") == 1 and ":" not in line for line in lines[1:])
    assert carried > 100  # carries were exercised


def test_running_sum_chain_name_is_checked():
    with pytest.raises(ConfigError, match=r"task.running_sum.chain: must be one of \['columns', 'lines'\], got 'digits'"):
        from_dict(TaskConfig, {"name": "running_sum", "running_sum": {"chain": "digits"}}, "task")


def test_running_sum_noise_changes_only_the_tagged_answer():
    noisy = TaskConfig(name="running_sum", answer_noise=0.5)
    clean = [task_running_sum.generate(TaskConfig(name="running_sum"), "train", i) for i in range(400)]
    rows = [task_running_sum.generate(noisy, "train", i) for i in range(400)]
    assert [p.chain for p in rows] == [p.chain for p in clean] and all(p.gold == c.gold for p, c in zip(rows, clean))
    off = [abs(int(p.answer) - int(p.gold)) for p in rows if p.answer != p.gold]
    assert 150 < len(off) < 250 and set(off) <= {1, 2, 3}
    assert all(p.answer == p.gold for p in task_running_sum.problems(noisy, "eval", 50))


def test_sorted_words_against_python_sorted():
    cfg = TaskConfig(name="sort_words")
    for p in task_sort_words.problems(cfg, "train", 200):
        words = p.question.removeprefix("sort ").split()
        assert p.answer == " ".join(sorted(words)) == p.gold and p.chain[0] == " ".join(words)
        assert p.chain[-1].replace(" | ", " ") == p.answer  # the selection sort ends sorted
        assert task_sort_words.verify(p.gold, p.gold_completion())


def test_sort_words_verifier_is_exact():
    gold = "abc bad cab"
    assert task_sort_words.verify(gold, _tagged(" abc  bad cab "))
    for wrong in ("bad abc cab", "abc bad", "abc bad cab cab", "abc,bad,cab", "Abc bad cab"):
        assert not task_sort_words.verify(gold, _tagged(wrong)), wrong
    assert not task_sort_words.verify(gold, "<think>\nabc bad cab")


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "running_sum", "sort_words"])
def test_task_sources_by_name(name):
    data = from_dict(DataConfig, {"kind": "prompts", "sources": ["task:eval"], "task": {"name": name, "num_eval": 20}})
    src = open_source("task:eval", task=data.task)[0]
    assert len(src) == 20
    for i in range(len(src)):
        r = src[i].record
        assert r["task"] == name and r["messages"][-1]["content"] == r["completion"]
        assert task_registry.verify_answer(r["answer"], r["completion"], r["task"])
        assert rewards.accuracy([r["prompt"]], [r["completion"]], answer=[r["answer"]], task=[r["task"]]) == [1.0]
        assert rewards.accuracy([r["prompt"]], [_tagged("x y")], answer=[r["answer"]], task=[r["task"]]) == [0.0]


def test_task_train_is_arithmetic_by_default():
    r = open_source("task:train", task=DataConfig().task)[0][0].record
    assert r["task"] == "arithmetic" and r["prompt"].endswith("=?")
    assert r["prompt"] == tasks.generate(TaskConfig(), "train", 0).question


def test_accuracy_uses_the_task_verifier_where_math_verify_would_not():
    # math-verify reads words as symbols of a product, which commutes: the task's exact match must not.
    gold, permuted = "abc bad cab", _tagged("cab bad abc")
    assert rewards.accuracy(["p"], [permuted], answer=[gold], task=["sort_words"]) == [0.0]
    # Countdown: any right expression scores, the spec is no answer to compare with.
    assert rewards.accuracy(["p"], [_tagged("(5+7)*2")], answer=["3 5 7 2 -> 24"], task=["countdown"]) == [1.0]
    assert rewards.accuracy(["p"], [_tagged("5*5")], answer=["3 5 7 2 -> 24"], task=["countdown"]) == [0.0]
    # A `task` column naming no built-in task leaves the generic check in charge.
    assert rewards.accuracy(["p"], [_tagged("7")], answer=["7"], task=["gsm8k"]) == [1.0]
    assert rewards.accuracy(["p"], [_tagged("7")], answer=["7"]) == [1.0]


def test_eval_verifier_reads_the_task_column():
    from r1jax.eval.run import VERIFIERS, resolve_verifier

    assert resolve_verifier("answer_match") is VERIFIERS["answer_match"] is task_registry.verify_answer
    assert task_registry.verify_answer("3 5 7 2 -> 24", _tagged("7*3+5-2"), "countdown")
    assert not task_registry.verify_answer("24", _tagged("7*3+5-2"))  # no task: the plain answer check


def test_bad_task_name_is_named():
    with pytest.raises(ConfigError, match=r"^prompts\.task\.name: must be one of \['arithmetic', 'countdown'"):
        from_dict(DataConfig, {"kind": "prompts", "task": {"name": "countdwn"}}, "prompts")
    with pytest.raises(ConfigError, match=r"^task\.sort_words\.alphabet:"):
        from_dict(TaskConfig, {"name": "sort_words", "sort_words": {"alphabet": "a"}}, "task")
    with pytest.raises(ConfigError, match=r"^task\.running_sum\.max_terms:"):
        from_dict(TaskConfig, {"running_sum": {"min_terms": 4, "max_terms": 3}}, "task")
    with pytest.raises(ConfigError, match=r"task\.name:"):
        task_registry.get("nope")


def test_every_pipeline_config_resolves():
    import glob

    from r1jax.pipeline import load_pipeline, resolve_stage

    files = sorted(glob.glob("configs/pipeline/*.yaml"))
    assert "configs/pipeline/countdown_tiny.yaml" in files
    for path in files:
        cfg = load_pipeline(path)
        stages = [resolve_stage(cfg, i) for i in range(len(cfg.stages))]
        assert stages, path
    cfg = load_pipeline("configs/pipeline/countdown_tiny.yaml")
    rl = resolve_stage(cfg, 1)
    assert rl.eval_every == cfg.curve_every == 10 and rl.eval_prompts == cfg.eval_prompts
    assert rl.prompts.task.name == rl.eval_prompts.task.name == "countdown"
    names = {path: load_pipeline(path).eval_prompts.task.name for path in files if "_tiny" in path}
    for name in ("countdown", "running_sum", "sort_words"):  # each untuned task has its recipe
        assert names[f"configs/pipeline/{name}_tiny.yaml"] == name


def test_curve_every_needs_heldout_prompts():
    stage = {"name": "rl", "kind": "grpo", "config": {"init_from": "x"}}
    with pytest.raises(ConfigError, match=r"^curve_every:"):
        from_dict(PipelineConfig, {"curve_every": 5, "stages": [stage]})


def test_rejection_sampling_keeps_by_the_task_verifier():
    from r1jax.config import RejectionConfig
    from r1jax.rl.rejection import _keep

    cfg = RejectionConfig(init_from="x", min_tokens=1)
    text = "a search\n</think>\n\n<answer>(5+7)*2</answer>"
    prompt = "<｜User｜>reach 24 with 3 5 7 2<｜Assistant｜><think>\n"  # R1's generation prompt
    assert _keep(prompt, text, "3 5 7 2 -> 24", 20, True, cfg, "countdown") is None
    assert _keep(prompt, text.replace("(5+7)*2", "5*5"), "3 5 7 2 -> 24", 20, True, cfg, "countdown") == "incorrect"


def test_arithmetic_rows_are_unchanged():
    """The default task's first rows, as main produced them before the other tasks existed (the demo
    and its recorded numbers depend on them)."""
    src = open_source("task:eval", task=TaskConfig(ops="+-", min_operands=3, max_operands=3, num_eval=200))[0]
    got = [(src[i].record["prompt"], src[i].record["answer"]) for i in range(3)]
    assert got == WANT_ARITHMETIC


WANT_ARITHMETIC = [("6+4+6=?", "16"), ("6+8-8=?", "6"), ("1+3+8=?", "12")]


@pytest.mark.parametrize("name", ["countdown", "sort_words"])
def test_evaluate_model_judges_rows_by_their_task(monkeypatch, name):
    """evaluate_model with a stand-in sampler that answers each prompt with its gold completion (or a
    wrong one): the built-in verifier reads each row's task; a plain answer check would not pass them."""
    import types

    import r1jax.eval.run as ev
    from r1jax.data.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer()
    data = from_dict(DataConfig, {"kind": "prompts", "sources": ["task:eval"], "seq_len": 48, "batch_size": 10,
                                  "shuffle": False, "drop_remainder": False, "task": {"name": name, "num_eval": 10}})
    src = open_source("task:eval", task=data.task)[0]
    gold = {src[i].record["prompt"]: src[i].record["completion"] for i in range(len(src))}
    wrong = {"countdown": "1+1", "sort_words": "a b"}[name]

    def answers(correct):
        """The stand-in sampler hands back the prompts; the stand-in decoder answers each."""
        def texts(tok_, prompts, lengths, finished):
            questions = [next(q for q in gold if q in tok.decode(list(p))) for p in prompts]
            return [gold[q].removeprefix("<think>\n") if correct else _tagged(wrong) for q in questions]

        monkeypatch.setattr(ev.sampler, "sample", lambda params, cfg, rows, **_: types.SimpleNamespace(
            tokens=rows, lengths=[1] * len(rows), finished=[True] * len(rows)))
        monkeypatch.setattr(ev, "completion_texts", texts)

    answers(True)
    summary, _ = ev.evaluate_model(None, None, data, tok)
    assert summary["num_problems"] == 10 and summary["pass@1"] == 1.0
    # A verifier given explicitly is used for every row: the plain answer check fails Countdown
    # expressions (the gold column is no expression) and passes sorted words only when they match.
    summary, _ = ev.evaluate_model(None, None, data, tok, verify=tasks.verify)
    assert summary["pass@1"] == (0.0 if name == "countdown" else 1.0)
    answers(False)
    summary, _ = ev.evaluate_model(None, None, data, tok)
    assert summary["pass@1"] == 0.0
