"""Checkpoints that fall back and failures that explain themselves (issue 17).

A damaged newest step (a file truncated or corrupt) is logged, set aside as `<step>.damaged` and the
run resumes from the step before, ending bit-identical to an uninterrupted run; a damaged model given to
`sample`, `eval` or `convert` is one named error; a full disk during `train` and `convert` (a small tmpfs,
mounted in a user+mount namespace) is one named error with exit status 2, nothing saved is lost, no
partial directory is left and the run resumes once there is space again."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpoint import assert_states_equal, assert_trees_equal, cfg, ckpt_config, make_state, opt_state, params  # noqa: F401

from r1jax.checkpoint.manager import CheckpointManager
from r1jax.checkpoint.orbax_io import load_model, save_model
from r1jax.cli import main
from r1jax.errors import CheckpointError, DamagedCheckpointError, describe

REPO = Path(__file__).resolve().parents[1]


def largest_file(directory: Path) -> Path:
    """The largest file under `directory`: array data, whatever orbax's layout."""
    return max((f for f in directory.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def damage(f: Path, how: str) -> bytes:
    """Truncate `f` to half its length or flip every bit of its middle byte; returns the new bytes."""
    data = bytearray(f.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return bytes(data)


# --------------------------------------------------------------------------- the manager


DAMAGES = {  # item file -> how; each is a failure of a different reader (tensorstore, orbax's json, ours)
    "params data file truncated": (lambda step: largest_file(step / "params"), "truncate"),
    "train_state _METADATA truncated": (lambda step: step / "train_state" / "_METADATA", "truncate"),
    "train_state manifest corrupt": (lambda step: step / "train_state" / "manifest.ocdbt", "flip"),
    "data_state corrupt": (lambda step: step / "data_state" / "process_0-of-1.json", "flip"),
}


@pytest.mark.parametrize("damaged", list(DAMAGES))
def test_resume_sets_a_damaged_step_aside_and_restores_the_one_before(tmp_path, make_state, caplog, damaged):
    config = ckpt_config(tmp_path, async_save=False)
    ckpt = tmp_path / "ckpt"
    with CheckpointManager(config) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, make_state(step=step, seed=step), {"i": step})
    pick, how = DAMAGES[damaged]
    f = pick(ckpt / "3")
    broken = damage(f, how)
    abstract = jax.eval_shape(lambda: make_state())

    with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint.manager"), CheckpointManager(config) as mngr:
        with pytest.raises(DamagedCheckpointError, match=rf"^{ckpt}/3.*: (cannot be read|missing or unreadable)"):
            mngr.restore(abstract_state=abstract)  # one given step: no fallback
        step, state, data = mngr.resume(abstract_state=abstract)
        assert step == 2 and data == {"i": 2}
        assert_states_equal(state, make_state(step=2, seed=2))
        assert mngr.all_steps() == [1, 2]
        assert mngr.save(3, make_state(step=3, seed=30), {"i": 30})  # the step number is free again
    rejected, resumed = [r.getMessage() for r in caplog.records]
    assert rejected.startswith(f"checkpoint step 3 rejected: {ckpt}/3") and "(" in rejected, rejected
    assert resumed == f"resuming from step 2, the newest intact checkpoint; the rejected step(s) were moved " \
                      f"aside to {ckpt}/3.damaged"
    assert (ckpt / "3.damaged" / f.relative_to(ckpt / "3")).read_bytes() == broken  # nothing deleted
    with CheckpointManager(config) as mngr:
        assert mngr.all_steps() == [1, 2, 3]
        state, data = mngr.restore(abstract_state=abstract)
    assert data == {"i": 30}
    assert_states_equal(state, make_state(step=3, seed=30))


def test_no_intact_step_is_one_error_naming_each(tmp_path, make_state):
    config = ckpt_config(tmp_path, async_save=False)
    ckpt = tmp_path / "ckpt"
    with CheckpointManager(config) as mngr:
        for step in (1, 2):
            mngr.save(step, make_state(step=step), {"i": step})
    for step in (1, 2):
        damage(largest_file(ckpt / str(step) / "params"), "truncate")
    with CheckpointManager(config) as mngr:
        with pytest.raises(DamagedCheckpointError, match=rf"^{ckpt}: no checkpoint can be restored; {ckpt}/2: "
                                                         rf"cannot be read \(.+\); {ckpt}/1: cannot be read"):
            mngr.resume(abstract_state=jax.eval_shape(lambda: make_state()))
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2"]  # nothing moved: there is nothing to resume


def test_a_step_of_another_model_is_not_damage(tmp_path, make_state):
    """A shape mismatch is a CheckpointError as before, not a reason to fall back to an older step."""
    config = ckpt_config(tmp_path, async_save=False)
    with CheckpointManager(config) as mngr:
        mngr.save(1, make_state())
        mngr.save(2, make_state())
        state = make_state()
        wrong = jax.eval_shape(lambda: state.replace(params={**state.params, "embed": state.params["embed"][:8]}))
        with pytest.raises(CheckpointError, match=r"2/params: leaf 'embed' has shape") as info:
            mngr.resume(abstract_state=wrong)
    assert not isinstance(info.value, DamagedCheckpointError)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]


# --------------------------------------------------------------------------- model readers


def test_load_model_names_the_damaged_params_and_the_other_steps(tmp_path, cfg, params, make_state):
    m = save_model(tmp_path / "m", cfg, params)
    damage(largest_file(m / "params"), "truncate")
    with pytest.raises(DamagedCheckpointError, match=rf"^{m}/params: cannot be read \(.+\)$"):
        load_model(m)

    with CheckpointManager(ckpt_config(tmp_path, async_save=False), model_config=cfg) as mngr:
        mngr.save(1, make_state())
        mngr.save(2, make_state())
    ckpt = tmp_path / "ckpt"
    damage(largest_file(ckpt / "2" / "params"), "truncate")
    with pytest.raises(DamagedCheckpointError, match=rf"^{ckpt}/2/params: cannot be read \(.+\); it holds step\(s\) 1 "
                                                     rf"too: load one as {ckpt}/1$"):
        load_model(ckpt)
    got_cfg, got = load_model(ckpt / "1")  # one step of a training checkpoint
    assert got_cfg == cfg
    assert_trees_equal(got, params)


def _damaged_model(tmp_path, cfg, params) -> Path:
    m = save_model(tmp_path / "m", cfg, params)
    damage(largest_file(m / "params"), "truncate")
    return m


def _one_error_line(err: str, command: str, path: Path) -> None:
    """One line on stderr naming the damaged params directory and tensorstore's cause (convert reads leaf by
    leaf and names the leaf first)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"r1jax {command}: error: .*cannot (be )?read \(.*{path}/params.*\)", lines[0]), err
    assert "Requested byte range" in lines[0], err  # the cause: the truncated file is shorter than its data


def test_sample_eval_convert_of_a_damaged_model_is_one_error(tmp_path, cfg, params, capsys):
    m = _damaged_model(tmp_path, cfg, params)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n')
    runs = {
        "sample": ["sample", "--ckpt", str(m), "--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl")],
        "eval": ["eval", "configs/eval/task_pass_at_k.yaml", f"model={m}", f"out_dir={tmp_path / 'e'}"],
        "convert": ["convert", "orbax-to-hf", str(m), str(tmp_path / "hf")],
    }
    for command, argv in runs.items():
        assert main(argv) == 2, command
        _one_error_line(capsys.readouterr().err, command, m)
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]


def test_sample_of_a_damaged_model_prints_one_line_as_a_process(tmp_path, cfg, params):
    """As a process: nothing else on stderr, also not from orbax's threads on the way out."""
    m = _damaged_model(tmp_path, cfg, params)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n')
    out = subprocess.run([sys.executable, "-m", "r1jax.cli", "sample", "--ckpt", str(m), "--prompts", str(prompts),
                          "--out", str(tmp_path / "s.jsonl")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr
    _one_error_line(out.stderr, "sample", m)


def test_describe_names_the_file_and_drops_tensorstore_noise():
    try:
        try:
            raise OSError(28, "No space left on device", "/disk/run/metrics.jsonl")
        except OSError as e:
            raise RuntimeError("writing failed") from e
    except RuntimeError as e:
        assert describe(e) == "/disk/run/metrics.jsonl: No space left on device (ENOSPC)"
    inner = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/disk/x/d/abc": No space left '
                       '[source locations=\'tensorstore/kvstore/file/file_key_value_store.cc:401\']\n more')
    try:
        try:
            raise inner
        except ValueError as e:
            raise Exception("Encountered error while writing. See full TensorStore details: {...}") from e
    except Exception as e:
        assert describe(e) == 'RESOURCE_EXHAUSTED: Error writing local file "/disk/x/d/abc": No space left'
