"""`r1jax pipeline`: stage references are checked before any work; a small recipe runs end to end,
exports a model transformers loads with the same logits, and a rerun skips finished stages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from r1jax import config
from r1jax.config import PipelineConfig
from r1jax.errors import ConfigError
from r1jax.pipeline import load_pipeline, resolve_stage, run_pipeline

TASK = {"min_operands": 2, "max_operands": 2, "num_eval": 30}


def tiny_pipeline(out, sft_steps=6, rl_steps=2):
    prompts = lambda **kw: dict(kind="prompts", seq_len=32, task=TASK, **kw)  # noqa: E731
    return config.from_dict(PipelineConfig, dict(
        out_dir=str(out), eval_samples=2, eval_max_new_tokens=12,
        eval_prompts=prompts(sources=["task:eval"], batch_size=30, shuffle=False, drop_remainder=False),
        stages=[
            dict(name="cold", kind="sft", config=dict(
                model="configs/model/tiny_v3.yaml", steps=sft_steps, progress=False,
                data=dict(kind="sft", sources=["task:train"], seq_len=64, batch_size=8, num_epochs=None, task=TASK),
                checkpoint=dict(async_save=False))),
            dict(name="rl", kind="grpo", config=dict(
                init_from="@cold", steps=rl_steps, num_generations=4, max_new_tokens=12, progress=False,
                prompts=prompts(sources=["task:train"], batch_size=2, num_epochs=None),
                checkpoint=dict(async_save=False))),
            dict(name="rs", kind="rejection", config=dict(
                init_from="@rl", num_samples=2, max_new_tokens=12, max_prompts=4, require_format=False,
                prompts=prompts(sources=["task:train"], batch_size=4, shuffle=False))),
        ]))


def test_bad_references_are_named_before_any_work(tmp_path):
    cfg = tiny_pipeline(tmp_path)
    bad = config.to_dict(cfg)
    bad["stages"][1]["config"]["init_from"] = "@later"
    with pytest.raises(ConfigError, match=r"stages\[1\].config.init_from: '@later' names no earlier stage"):
        resolve_stage(config.from_dict(PipelineConfig, bad), 1)
    bad["stages"][1]["config"]["init_from"] = "@cold"
    bad["stages"][2]["config"]["init_from"] = None
    with pytest.raises(ConfigError, match=r"stages\[2\].config.init_from: a rejection stage needs a model"):
        resolve_stage(config.from_dict(PipelineConfig, bad), 2)
    bad["stages"][2]["name"] = "cold"
    with pytest.raises(ConfigError, match=r"stages\[2\].name: 'cold' is used twice"):
        config.from_dict(PipelineConfig, bad)
    bad = config.to_dict(cfg)
    bad["stages"][0]["config"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"stages\[0\].config.steps: expected int"):
        run_pipeline(config.from_dict(PipelineConfig, bad))
    assert not (tmp_path / "cold").exists()


def test_distill_teacher_may_name_an_earlier_stage(tmp_path):
    d = config.to_dict(tiny_pipeline(tmp_path))
    d["stages"].append(dict(name="student", kind="distill", config=dict(
        model="configs/model/tiny_qwen2_student.yaml", steps=2, distill=dict(teacher="@rl", alpha=0.5),
        data=dict(kind="sft", sources=["@rs"], seq_len=64, batch_size=8))))
    assert resolve_stage(config.from_dict(PipelineConfig, d), 3).distill.teacher == str(tmp_path / "rl" / "checkpoints")
    d["stages"][3]["config"]["distill"]["teacher"] = "@rs"
    with pytest.raises(ConfigError, match=r"stages\[3\].config.distill.teacher: stage 'rs' is a rejection stage"):
        resolve_stage(config.from_dict(PipelineConfig, d), 3)


def test_pipeline_yaml_in_configs_resolves():
    cfg = load_pipeline("configs/pipeline/r1_tiny.yaml")
    kinds = [type(resolve_stage(cfg, i)).__name__ for i in range(len(cfg.stages))]
    assert kinds == ["TrainConfig", "GRPOConfig", "RejectionConfig", "TrainConfig"]
    assert type(resolve_stage(cfg, 3).model).__name__ == "DenseConfig"
    assert resolve_stage(cfg, 3).data.sources[0].endswith("rejection/data.jsonl")


def test_demo_default_equals_the_pipeline_yaml():
    from r1jax.demo import demo_pipeline

    a, b = demo_pipeline("runs/r1_tiny"), load_pipeline("configs/pipeline/r1_tiny.yaml")
    for i in range(len(b.stages)):
        assert resolve_stage(a, i) == resolve_stage(b, i), b.stages[i].name


@pytest.mark.slow
def test_small_recipe_runs_exports_and_skips_finished_stages(tmp_path):
    records = run_pipeline(tiny_pipeline(tmp_path))
    assert [r["name"] for r in records] == ["cold", "rl", "rs"]
    assert all(r["status"] == "completed" for r in records)
    assert 0 <= records[1]["eval"]["pass@1_greedy"] <= 1 and "pass@2" in records[1]["eval"]
    rows = [json.loads(l) for l in (tmp_path / "rs" / "data.jsonl").read_text().splitlines()]
    stats = json.loads((tmp_path / "rs" / "data.jsonl.stats.json").read_text())
    assert stats["samples"] == 8 and stats["kept"] == len(rows)
    for row in rows:
        assert row["messages"][0]["role"] == "user" and row["messages"][1]["content"].startswith("<think>\n")
    # The exported teacher loads in transformers and gives r1jax's logits.
    import torch
    from transformers import AutoModelForCausalLM

    import r1jax

    cfg, params = r1jax.load_pretrained(tmp_path / "rl" / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "hf", dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(r1jax.forward(params, tokens, cfg))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
    assert (tmp_path / "rl" / "hf" / "tokenizer.json").exists()
    # A rerun finds every stage done and does no work.
    import r1jax.pipeline as pl

    again = pl.run_pipeline(tiny_pipeline(tmp_path))
    assert [r["seconds"] for r in again] == [r["seconds"] for r in records]


def _pipeline_yaml(tmp_path, name):
    import yaml

    d = config.to_dict(tiny_pipeline(tmp_path / name, sft_steps=4, rl_steps=4))
    d["eval_prompts"] = None  # what is under test is resuming; evaluation would compile two samplers per stage
    d["stages"][0]["config"]["model"] = str(Path("configs/model/tiny_v3.yaml").absolute())
    d["stages"][1]["config"]["checkpoint"]["save_interval_steps"] = 1
    d["stages"][1]["config"]["log_every"] = 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _run_pipeline_cli(path):
    cmd = [sys.executable, "-m", "r1jax.cli", "pipeline", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


@pytest.mark.slow
def test_kill_9_in_a_stage_then_rerun_resumes_and_equals_uninterrupted(tmp_path):
    from r1jax.checkpoint.orbax_io import load_model
    from r1jax.train.metrics import read_metrics

    ref = _run_pipeline_cli(_pipeline_yaml(tmp_path, "ref"))
    assert ref.wait() == 0, ref.stdout.read()
    run = tmp_path / "killed"
    p = _run_pipeline_cli(_pipeline_yaml(tmp_path, "killed"))
    t0 = time.time()
    while not ((run / "rl" / "metrics.jsonl").exists() and read_metrics(run / "rl")[-1]["step"] >= 2):
        assert p.poll() is None, p.stdout.read()
        assert time.time() - t0 < 600, "timed out"
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    cold_done = (run / "cold" / "DONE.json").read_text()
    assert not (run / "rl" / "DONE.json").exists()
    resumed = _run_pipeline_cli(run.with_suffix(".yaml"))
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "stage 1/3" not in out and "stage 2/3: rl" in out  # the finished stage is not run again
    assert (run / "cold" / "DONE.json").read_text() == cold_done
    assert [r["step"] for r in read_metrics(run / "rl")] == [1, 2, 3, 4]
    a, b = read_metrics(tmp_path / "ref" / "rl"), read_metrics(run / "rl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # resumed from its checkpoint, same stream
    jax.tree.map(np.testing.assert_array_equal, load_model(tmp_path / "ref" / "rl" / "checkpoints")[1],
                 load_model(run / "rl" / "checkpoints")[1])
    assert (run / "rs" / "data.jsonl").read_text() == (tmp_path / "ref" / "rs" / "data.jsonl").read_text()
