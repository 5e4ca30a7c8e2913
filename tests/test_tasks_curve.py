"""The learning curve `r1jax pipeline` writes for each RL stage: read back from the run's
metrics.jsonl (reward every logged step, held-out pass@1 where GRPO evaluated), and for a tiny
2-stage run on the sort_words task, curve.json and rl_curves.png."""

import json

import pytest

from r1jax import config, curves
from r1jax.config import PipelineConfig
from r1jax.pipeline import run_pipeline


def test_curve_from_metrics(tmp_path):
    rows = [{"step": 1, "reward/mean": 0.25, "reward/accuracy": 0.5},
            {"step": 2, "reward/mean": 0.5, "reward/accuracy": 0.75, "eval/pass@1": 0.4},
            {"step": 3, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, got = curves.write_curve(tmp_path)
    assert got == [{"step": 1, "reward": 0.25, "accuracy": 0.5, "heldout_pass@1": None},
                   {"step": 2, "reward": 0.5, "accuracy": 0.75, "heldout_pass@1": 0.4}]
    assert json.loads(open(path).read()) == got
    png = curves.plot_curves(tmp_path, {"rl": got})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves.plot_curves(tmp_path, {}) is None


@pytest.mark.slow
def test_pipeline_writes_the_curve(tmp_path):
    task = {"name": "sort_words", "num_eval": 8, "sort_words": {"min_words": 2, "max_words": 2, "word_length": 2}}
    prompts = lambda **kw: dict(kind="prompts", seq_len=24, task=task, **kw)  # noqa: E731
    cfg = config.from_dict(PipelineConfig, dict(
        out_dir=str(tmp_path), eval_samples=1, eval_max_new_tokens=8, curve_every=1, export_hf=False,
        eval_prompts=prompts(sources=["task:eval"], batch_size=8, shuffle=False, drop_remainder=False),
        stages=[
            dict(name="cold", kind="sft", config=dict(
                model="configs/model/tiny_v3.yaml", steps=2, progress=False,
                data=dict(kind="sft", sources=["task:train"], seq_len=64, batch_size=8, num_epochs=None, task=task),
                checkpoint=dict(async_save=False))),
            dict(name="rl", kind="grpo", config=dict(
                init_from="@cold", steps=3, log_every=2, num_generations=4, max_new_tokens=8, progress=False,
                prompts=prompts(sources=["task:train"], batch_size=2, num_epochs=None),
                checkpoint=dict(async_save=False))),
        ]))
    records = run_pipeline(cfg)
    assert [r["status"] for r in records] == ["completed", "completed"]
    curve = json.loads((tmp_path / "rl" / "curve.json").read_text())
    # Every step evaluated (curve_every 1), so logged though log_every is 2.
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert all(0 <= r["heldout_pass@1"] <= 1 and r["reward"] is not None for r in curve)
    assert records[1]["curve"] == str(tmp_path / "rl" / "curve.json")
    assert (tmp_path / "rl_curves.png").read_bytes()[:4] == b"\x89PNG"
