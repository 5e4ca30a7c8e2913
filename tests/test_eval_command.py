"""`r1jax eval CONFIG`: the results table for a saved model, and named config errors."""

import json

import jax
import pytest

import r1jax
from r1jax import config
from r1jax.cli import main
from r1jax.config import EvalConfig
from r1jax.demo import tiny_config
from r1jax.errors import ConfigError
from r1jax.model.params import init_params


ARGS = ["max_new_tokens=8", "prompts.task.num_eval=7", "num_samples=2", "ks=[1,2]", "maj_ks=[2]",
        "temperature=1.0"]
CONFIG = "configs/eval/task_pass_at_k.yaml"


def test_eval_command_writes_the_table(tmp_path, capsys):
    cfg = tiny_config()
    r1jax.save_pretrained(tmp_path / "m", cfg, init_params(cfg, jax.random.key(0)))
    rc = main(["eval", CONFIG, f"model={tmp_path / 'm'}", f"out_dir={tmp_path / 'e'}",
               *ARGS])
    assert rc == 0
    row = json.loads((tmp_path / "e" / "results.jsonl").read_text())
    assert row["num_problems"] == 7 and row["samples"] == 2
    assert 0 <= row["pass@1"] <= row["pass@2"] <= 1 and "maj@2" in row
    assert len((tmp_path / "e" / "records.jsonl").read_text().splitlines()) == 7
    assert "pass@2" in capsys.readouterr().out
    # Default mesh: every device on `data`. On (data=2, expert=4) of the 8 simulated devices: 14 rows
    # padded to 16, weights loaded into their shards, the same samples (a row's random stream does not
    # depend on the mesh).
    if len(jax.devices()) >= 8:
        rc = main(["eval", CONFIG, f"model={tmp_path / 'm'}", f"out_dir={tmp_path / 'e8'}",
                   *ARGS, "mesh.data=2", "mesh.expert=4"])
        assert rc == 0
        records = lambda d: [json.loads(l)["completions"] for l in (tmp_path / d / "records.jsonl").read_text().splitlines()]  # noqa: E731
        assert records("e8") == records("e")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_eval_mesh_the_model_cannot_split_is_named_before_loading(tmp_path, capsys, monkeypatch):
    cfg = tiny_config()  # 4 attention heads
    r1jax.save_pretrained(tmp_path / "m", cfg, init_params(cfg, jax.random.key(0)))
    monkeypatch.setattr(r1jax, "load_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    rc = main(["eval", CONFIG, f"model={tmp_path / 'm'}", f"out_dir={tmp_path / 'e'}",
               *ARGS, "mesh.data=1", "mesh.tensor=8"])
    assert rc == 2 and "mesh.tensor: num_attention_heads=4" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("override,match", [
    ("ks=[1,8]", r"ks\[1\]: every k must be in \[1, num_samples=4\]"),
    ("temperature=0", r"num_samples: greedy decoding"),
    ("model=", r"model: required"),
    ("verifier=math", r"verifier: unknown verifier 'math'; built-in: answer_match, or a dotted path"),
    ("verifier=:verify", r"verifier: ':verify' is not a dotted path 'package.module:function'"),
    ("verifier=r1jax_no_such_module:verify", r"verifier: cannot import 'r1jax_no_such_module:verify': "
                                             r"No module named 'r1jax_no_such_module'"),
    ("verifier=r1jax.data.tasks:no_such_fn", r"verifier: cannot import .*has no attribute 'no_such_fn'"),
    ("verifier=r1jax.data.tasks:SPLITS", r"verifier: 'r1jax.data.tasks:SPLITS' is not callable"),
])
def test_eval_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        config.load(EvalConfig, CONFIG, [override])


# A user's verifier, in a module of its own: judges by parity of the completion's length (so it
# disagrees with the built-in answer check) and records what it was called with.
VERIFIER_MODULE = """
CALLS = []


def even_length(answer, completion):
    CALLS.append((answer, completion))
    return len(completion) % 2 == 0
"""


def test_eval_uses_a_custom_verifier(tmp_path, capsys, monkeypatch, request):
    import re
    import sys

    (tmp_path / "r1jax_test_verifiers.py").write_text(VERIFIER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("r1jax_test_verifiers", None))
    cfg = tiny_config()
    r1jax.save_pretrained(tmp_path / "m", cfg, init_params(cfg, jax.random.key(0)))
    rc = main(["eval", CONFIG, f"model={tmp_path / 'm'}", f"out_dir={tmp_path / 'e'}", *ARGS,
               "verifier=r1jax_test_verifiers:even_length"])
    assert rc == 0, capsys.readouterr().err
    calls = sys.modules["r1jax_test_verifiers"].CALLS
    records = [json.loads(line) for line in (tmp_path / "e" / "records.jsonl").read_text().splitlines()]
    assert len(calls) == 7 * 2 and all(re.fullmatch(r"-?\d+", gold) for gold, _ in calls)  # gold answers
    assert [c for _, c in calls] == [c for r in records for c in r["completions"]]
    correct = [sum(len(c) % 2 == 0 for c in r["completions"]) for r in records]
    assert [r["correct"] for r in records] == correct
    row = json.loads((tmp_path / "e" / "results.jsonl").read_text())
    assert row["pass@1"] == pytest.approx(sum(correct) / 14)


def test_eval_bad_verifier_is_named_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(r1jax, "load_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    rc = main(["eval", CONFIG, f"model={tmp_path / 'm'}", f"out_dir={tmp_path / 'e'}",
               "verifier=r1jax.data.tasks:no_such_verifier"])
    err = capsys.readouterr().err
    assert rc == 2 and "r1jax eval: error: verifier: cannot import 'r1jax.data.tasks:no_such_verifier'" in err
    assert "no_such_verifier" in err and not (tmp_path / "e").exists()
