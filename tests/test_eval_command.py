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


def test_eval_command_writes_the_table(tmp_path, capsys):
    cfg = tiny_config()
    r1jax.save_pretrained(tmp_path / "m", cfg, init_params(cfg, jax.random.key(0)))
    rc = main(["eval", "configs/eval/task_pass_at_k.yaml", f"model={tmp_path / 'm'}", f"out_dir={tmp_path / 'e'}",
               "max_new_tokens=8", "prompts.task.num_eval=8", "num_samples=2", "ks=[1,2]", "maj_ks=[2]"])
    assert rc == 0
    row = json.loads((tmp_path / "e" / "results.jsonl").read_text())
    assert row["num_problems"] == 8 and row["samples"] == 2
    assert 0 <= row["pass@1"] <= row["pass@2"] <= 1 and "maj@2" in row
    assert len((tmp_path / "e" / "records.jsonl").read_text().splitlines()) == 8
    assert "pass@2" in capsys.readouterr().out


@pytest.mark.parametrize("override,match", [
    ("ks=[1,8]", r"ks\[1\]: every k must be in \[1, num_samples=4\]"),
    ("temperature=0", r"num_samples: greedy decoding"),
    ("model=", r"model: required"),
])
def test_eval_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        config.load(EvalConfig, "configs/eval/task_pass_at_k.yaml", [override])
