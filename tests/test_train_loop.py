"""The training loop end to end: loss falls, exact resume after kill -9, SIGTERM, NaN stop,
SFT masking, metrics files, and config errors before any compile."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config
from r1jax.errors import ConfigError
from r1jax.train.loop import TrainingDiverged, train
from r1jax.train.metrics import read_metrics

BASE = ["steps=12", "log_every=1", "eval_every=0", "progress=false", "data.seq_len=64", "data.batch_size=8",
        "eval_data.seq_len=64", "eval_data.batch_size=8", "eval_batches=2", "checkpoint.save_interval_steps=4",
        "checkpoint.async_save=false", "optimizer.warmup_steps=2"]


def cfg_for(tmp_path, *extra, name="run"):
    return config.load_stage("configs/train/tiny_pretrain.yaml", BASE + [f"out_dir={tmp_path / name}", *extra])


def _final_params(run_dir: Path):
    from r1jax.checkpoint.orbax_io import load_model

    return load_model(run_dir / "checkpoints")[1]


def test_loss_falls_and_metrics_are_written(tmp_path):
    cfg = cfg_for(tmp_path, "steps=30", "optimizer.learning_rate=3e-3")
    result = train(cfg)
    assert result.status == "completed" and result.step == 30
    rows = read_metrics(cfg.out_dir)
    first, last = np.mean([r["ce"] for r in rows[:3]]), np.mean([r["ce"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    for key in ("loss", "ce", "mtp_ce", "balance_loss", "grad_norm", "lr", "tokens_per_s", "moe/load_max_over_mean",
                "moe/bias_norm", "moe/dropped"):
        assert key in rows[-1], key
    assert "eval/ce" in rows[-1] and rows[-1]["eval/ce"] < first
    assert list((Path(cfg.out_dir) / "tensorboard").glob("events.out.tfevents.*"))
    saved = config.load_stage(Path(cfg.out_dir) / "config.yaml")
    assert saved.model == cfg.model and saved.steps == 30


def _run_cli(tmp_path, name, *extra):
    cmd = [sys.executable, "-m", "r1jax.cli", "train", "configs/train/tiny_pretrain.yaml", *BASE,
           f"out_dir={tmp_path / name}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def _wait_for_step(run_dir: Path, step: int, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    ref = _run_cli(tmp_path, "ref")
    assert ref.wait() == 0, ref.stdout.read()
    run = tmp_path / "killed"
    p = _run_cli(tmp_path, "killed")
    _wait_for_step(run, 6, p)  # a checkpoint at step 4 exists; steps 5-6 are lost
    p.send_signal(signal.SIGKILL)
    p.wait()
    resumed = _run_cli(tmp_path, "killed")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "ref"), _final_params(run))


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
    run = tmp_path / "term"
    p = _run_cli(tmp_path, "term", "checkpoint.save_interval_steps=100")
    _wait_for_step(run, 3, p)
    p.send_signal(signal.SIGTERM)
    out = p.communicate()[0]
    assert p.returncode == 0 and "preempted" in out, out
    saved = json.loads((run / "result.json").read_text())["step"]
    steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [saved] and saved >= 3
    p2 = _run_cli(tmp_path, "term", "checkpoint.save_interval_steps=100")
    out = p2.communicate()[0]
    assert p2.returncode == 0 and "completed at step 12" in out, out


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, "optimizer.learning_rate=1e30", "optimizer.grad_clip_norm=null",
                  "optimizer.warmup_steps=0", "steps=50")
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss or gradient is not finite.*last good checkpoint"):
        train(cfg)
    ckpts = [d for d in (Path(cfg.out_dir) / "checkpoints").iterdir() if d.name.isdigit()]
    for d in ckpts:  # whatever was saved holds finite params
        from r1jax.checkpoint.orbax_io import load_model

        params = load_model(Path(cfg.out_dir) / "checkpoints")[1]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("override,match", [
    ("optimizer.learnin_rate=1", r"optimizer.learnin_rate: unknown key"),
    ("data.seq_len=1", r"data.seq_len: must be >= 2"),
    ("model.vocab_size=100", r"model.vocab_size: 100 is smaller than the tokenizer's 265 tokens"),
    ("optimizer.grad_accum_steps=3", r"optimizer.grad_accum_steps: must divide data.batch_size \(8\)"),
    ("stage=grpo_typo", r"stage: must be one of"),
    ("data.kind=sft", r"data.kind: stage 'pretrain' trains on kind 'pretrain' data"),
])
def test_bad_config_is_named_before_compiling(tmp_path, override, match, monkeypatch):
    import r1jax.train.loop as loop

    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ConfigError, match=match):
        train(cfg_for(tmp_path, override))


def test_sft_loss_ignores_user_tokens():
    """Hand-built chat example: changing the user's tokens' targets does not change the loss,
    changing an assistant token's target does."""
    from r1jax.data.tokenizer import builtin_tokenizer, encode_chat
    from r1jax.demo import tiny_config
    from r1jax.model.params import init_params
    from r1jax.train.losses import lm_loss

    tok = builtin_tokenizer()
    ids, mask = encode_chat(tok, [{"role": "user", "content": "2+3=?"},
                                  {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n<answer>5</answer>"}])
    ids, mask = np.asarray(ids), np.asarray(mask)
    T = len(ids) - 1
    batch = {"inputs": ids[None, :-1], "targets": ids[None, 1:], "loss_mask": mask[None, 1:],
             "segment_ids": np.ones((1, T), np.int32), "positions": np.arange(T)[None]}
    user_len = len(tok.encode("<｜User｜>2+3=?<｜Assistant｜>")) + 1
    assert not batch["loss_mask"][0, : user_len - 1].any() and batch["loss_mask"][0, -1] == 1
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    f = jax.jit(lambda b: lm_loss(params, b, cfg, mtp_weight=0.3, balance_alpha=0.0)[1]["ce"])
    base = float(f(batch))
    user = dict(batch, targets=batch["targets"].copy())
    user["targets"][0, :user_len - 2] = 7
    assert float(f(user)) == base
    asst = dict(batch, targets=batch["targets"].copy())
    asst["targets"][0, -2] = 7
    assert float(f(asst)) != base
