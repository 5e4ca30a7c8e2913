"""The training loop end to end: loss falls, exact resume after kill -9, SIGTERM (async saves), NaN
stop, SFT masking, metrics files (jsonl and TensorBoard), config errors before any compile, and the
recipes in configs/train."""

import json
import os
import re
import signal
import struct
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
from r1jax.train.loop import train
from r1jax.train.run import TrainingDiverged
from r1jax.train.metrics import read_metrics

BASE = ["steps=12", "log_every=1", "eval_every=0", "progress=false", "data.seq_len=64", "data.batch_size=8",
        "eval_data.seq_len=64", "eval_data.batch_size=8", "eval_batches=2", "checkpoint.save_interval_steps=4",
        "checkpoint.async_save=false", "optimizer.warmup_steps=2"]


def cfg_for(tmp_path, *extra, name="run"):
    return config.load_stage("configs/train/tiny_pretrain.yaml", BASE + [f"out_dir={tmp_path / name}", *extra])


def _final_params(run_dir: Path):
    from r1jax.checkpoint.orbax_io import load_model

    return load_model(run_dir / "checkpoints")[1]


def _tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag, read back from the TFRecord event files (u64 length, u32 crc,
    an Event proto, u32 crc per record)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
    return out


def test_loss_falls_and_metrics_are_written(tmp_path):
    from test_flops import v3_hand_count

    cfg = cfg_for(tmp_path, "steps=30", "optimizer.learning_rate=3e-3")
    result = train(cfg)
    assert result.status == "completed" and result.step == 30
    rows = read_metrics(cfg.out_dir)
    first, last = np.mean([r["ce"] for r in rows[:3]]), np.mean([r["ce"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    for key in ("loss", "ce", "mtp_ce", "balance_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                "moe/load_max_over_mean", "moe/load_min_over_mean", "moe/load_cv", "moe/bias_norm", "moe/dropped"):
        assert key in rows[-1], key
    assert "eval/ce" in rows[-1] and rows[-1]["eval/ce"] < first

    # MFU = model FLOPs/s over the peak; per row it shares the elapsed time with tokens/s, so
    # mfu / tokens_per_s = FLOPs per token / (peak · devices) is the same on every row.
    E, gamma = cfg.model.n_routed_experts, cfg.router_bias_update_rate
    assert all(0 < r["mfu"] < 1 for r in rows), [r["mfu"] for r in rows]
    per_token = np.array([r["mfu"] / r["tokens_per_s"] for r in rows])
    np.testing.assert_allclose(per_token, per_token[0], rtol=1e-9)
    peak = v3_hand_count(cfg.model, cfg.data.seq_len) / (per_token[0] * jax.device_count())
    assert 1e8 < peak < 1e13, peak  # the measured matmul FLOP/s of a CPU device

    # Expert load per MoE layer, as ratios to the mean load: min ≤ 1 ≤ max ≤ E, and the coefficient of
    # variation lies between the range's lower bound (max−min)/√(2E) and Bhatia–Davis √((max−1)(1−min)).
    for r in rows:
        mx, mn, cv = (np.array(r[f"moe/load_{k}"]) for k in ("max_over_mean", "min_over_mean", "cv"))
        assert mx.shape == mn.shape == cv.shape == (cfg.model.num_moe_layers,)
        assert (0 <= mn).all() and (mn <= 1 + 1e-6).all() and (1 - 1e-6 <= mx).all() and (mx <= E + 1e-6).all(), r
        assert ((mx - mn) / np.sqrt(2 * E) <= cv + 1e-6).all() and (cv <= np.sqrt((mx - 1) * (1 - mn)) + 1e-6).all(), r
        # Each step moves every bias by at most γ (the sign rule): |b| ≤ step·γ·√E, and it has moved.
        bias = np.array(r["moe/bias_norm"])
        assert (0 < bias).all() and (bias <= r["step"] * gamma * np.sqrt(E) * (1 + 1e-5)).all(), r
        assert r["moe/dropped"] == 0  # ragged dispatch drops nothing
    assert rows[-1]["moe/load_cv"][0] > 0

    # TensorBoard holds the same loss values (stored as float32) at the same steps.
    run_dir = Path(cfg.out_dir)
    assert _tensorboard_scalars(run_dir, "loss") == {r["step"]: np.float32(r["loss"]) for r in rows}
    assert _tensorboard_scalars(run_dir, "moe/load_cv/layer_1")[30] == np.float32(rows[-1]["moe/load_cv"][1])
    saved = config.load_stage(run_dir / "config.yaml")
    assert saved.model == cfg.model and saved.steps == 30


def _cli(tmp_path, name, *extra) -> dict:
    cmd = [sys.executable, "-m", "r1jax.cli", "train", "configs/train/tiny_pretrain.yaml", *BASE,
           f"out_dir={tmp_path / name}", *extra]
    return dict(args=cmd, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def _run_cli(tmp_path, name, *extra):
    return subprocess.Popen(**_cli(tmp_path, name, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


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
    no_eval = "eval_data=null"  # what is under test is resuming; the final evaluation would compile a step more
    ref = _run_cli(tmp_path, "ref", no_eval)
    assert ref.wait() == 0, ref.stdout.read()
    run = tmp_path / "killed"
    p = _run_cli(tmp_path, "killed", no_eval)
    _wait_for_step(run, 6, p)  # a checkpoint at step 4 exists; steps 5-6 are lost
    p.send_signal(signal.SIGKILL)
    p.wait()
    resumed = _run_cli(tmp_path, "killed", no_eval)
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "ref"), _final_params(run))


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
    """With async saves (the default): periodic saves every 2 steps overlap training, SIGTERM forces one
    at the step it lands on, and the process exits only once that one is committed."""
    run = tmp_path / "term"
    opts = ("checkpoint.async_save=true", "checkpoint.save_interval_steps=2")
    p = _run_cli(tmp_path, "term", *opts)
    _wait_for_step(run, 3, p)
    p.send_signal(signal.SIGTERM)
    out = p.communicate()[0]
    assert p.returncode == 0 and "preempted" in out, out
    saved = json.loads((run / "result.json").read_text())["step"]
    steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
    assert saved >= 3 and steps[-1] == saved and len(steps) <= 2, (saved, steps)  # max_to_keep: 2
    assert not [d for d in (run / "checkpoints").iterdir() if "tmp" in d.name]  # every save committed
    p2 = _run_cli(tmp_path, "term", *opts)
    out = p2.communicate()[0]
    assert p2.returncode == 0 and "completed at step 12" in out, out
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Two good steps (checkpoint at step 2, written asynchronously while training goes on), then a NaN
    weight makes step 3's loss non-finite: the run stops naming step 3, step 2's checkpoint holds
    exactly the params training had, and nothing later is written."""
    import r1jax.train.loop as loop

    real, before = loop.make_train_step, {}

    def poisoned_after_two_steps(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), []

        def step(state, batch, *rest):
            calls.append(1)
            if len(calls) == 3:
                before["params"] = jax.tree.map(np.array, state.params)  # copies: the step donates state
                state = state.replace(params={**state.params, "final_norm": state.params["final_norm"] * jnp.nan})
            return step_fn(state, batch, *rest)

        return step

    monkeypatch.setattr(loop, "make_train_step", poisoned_after_two_steps)
    cfg = cfg_for(tmp_path, "steps=50", "checkpoint.save_interval_steps=2", "checkpoint.async_save=true")
    with pytest.raises(TrainingDiverged, match=r"^step 3: loss or gradient is not finite .*"
                                               r"the last good checkpoint \(step 2\) is intact"):
        train(cfg)
    run_dir = Path(cfg.out_dir)
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir() if d.name[0].isdigit()) == ["2"]
    saved = _final_params(run_dir)
    jax.tree.map(np.testing.assert_array_equal, saved, before["params"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(before["params"]))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


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


def _other_model_checkpoints(tmp_path):
    from r1jax.checkpoint.orbax_io import write_model_config

    model = config.load_stage("configs/train/tiny_pretrain.yaml").model
    (tmp_path / "other").mkdir()
    write_model_config(tmp_path / "other", model.replace(vocab_size=2 * model.vocab_size))
    return f"checkpoint.directory={tmp_path / 'other'}"


@pytest.mark.parametrize("case,error", [
    ("missing_data", r"nope.jsonl: no such file"),
    ("other_model", r"config.yaml: checkpoints here are of a different model"),
])
def test_errors_before_the_first_step_end_with_the_clean_error_alone(tmp_path, case, error):
    """Issue 17: the data is opened before the checkpoint manager and a run closes the manager on every
    path, so the error line is the whole of stderr (no orbax "cannot schedule new futures after
    interpreter shutdown" from a cleanup thread left running)."""
    extra = {"missing_data": lambda: f"data.sources=[{tmp_path / 'nope.jsonl'}]",
             "other_model": lambda: _other_model_checkpoints(tmp_path)}[case]()
    out = subprocess.run(**_cli(tmp_path, "run", extra), capture_output=True)
    assert out.returncode == 2, out.stderr
    assert re.fullmatch(rf"r1jax train: error: .*{error}.*\n", out.stderr), out.stderr


def test_a_run_closes_its_checkpoint_manager_when_the_loop_raises(tmp_path, monkeypatch):
    from r1jax.errors import DataError
    from r1jax.train import run as run_lib

    closed, real = [], run_lib.CheckpointManager.close
    monkeypatch.setattr(run_lib.CheckpointManager, "close", lambda self: (closed.append(self), real(self)))
    cfg = cfg_for(tmp_path)
    with pytest.raises(DataError, match="^boom$"):
        with run_lib.Run(cfg, cfg.model, data=None) as run:
            raise DataError("boom")
    assert closed == [run.manager]


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


def test_train_recipes_load_and_fit_the_tokenizer():
    """Every recipe in configs/train loads through the stage loader (unknown keys, types and values
    are checked there). The tiny ones pass the pre-compile mesh checks on one device and their model's
    vocabulary covers their tokenizer; the pod ones (whose tokenizer is the user's model directory)
    pass the mesh checks on the chips their mesh names (BUILD.md compiles them for those slices)."""
    from r1jax.config import ModelConfig
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.parallel.mesh import check_train
    from r1jax.train.run import check_vocab as _check_vocab

    paths = sorted((Path(__file__).parent.parent / "configs" / "train").glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny_pretrain.yaml", "tiny_sft.yaml", "tiny_grpo.yaml"}
    tiny_v3 = config.load(ModelConfig, Path(__file__).parent.parent / "configs" / "model" / "tiny_v3.yaml")
    pods = {"deepseek_v3_671b_v5p.yaml": 256, "deepseek_v3_671b_grpo_v5p.yaml": 512, "deepseek_v2_lite_v5e.yaml": 16}
    for path in paths:
        cfg = config.load_stage(path)
        assert cfg.stage == config.read_yaml(path)["stage"], path
        if path.name in pods:
            shape = cfg.mesh.shape(pods[path.name])
            if cfg.stage == "grpo":
                from r1jax.rl.grpo_loop import check_mesh
                check_mesh(cfg, cfg.model, shape)
            else:
                check_train(cfg, cfg.model, shape)
            continue
        assert cfg.model == tiny_v3, path
        _check_vocab(load_tokenizer((cfg.prompts if cfg.stage == "grpo" else cfg.data).tokenizer), cfg.model)
        if cfg.stage != "grpo":
            check_train(cfg, cfg.model, cfg.mesh.shape(1))
    assert set(pods) <= {p.name for p in paths}
