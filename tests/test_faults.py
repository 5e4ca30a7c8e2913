"""Checkpoints that fall back and failures that explain themselves (issue 17).

A damaged newest step (a file truncated or corrupt) is logged, set aside as `<step>.damaged` and the
run resumes from the step before, ending bit-identical to an uninterrupted run; a damaged model given to
`sample`, `eval` or `convert` is one named error; a full disk during `train` and `convert` (a small tmpfs,
mounted in a user+mount namespace) is one named error with exit status 2, nothing saved is lost, no
partial directory is left and the run resumes once there is space again."""

import contextlib
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

# Written beside a run's checkpoints (docs/chat_templates.md), sorted.
TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


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
    # nothing else is logged, also not asyncio's "Future exception was never retrieved" of the failed reads
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
        # The tokenizer named: a model without one would otherwise get a notice that the built-in one is used.
        "eval": ["eval", "configs/eval/task_pass_at_k.yaml", f"model={m}", f"out_dir={tmp_path / 'e'}",
                 "prompts.tokenizer=builtin"],
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


# --------------------------------------------------------------------------- a training run


def _saved_tree(step_dir: Path) -> dict:
    """{item: its arrays as numpy}, read straight from orbax's files."""
    import orbax.checkpoint as ocp

    with contextlib.closing(ocp.StandardCheckpointHandler()) as h:
        return {item: jax.tree.map(np.asarray, h.restore(step_dir / item)) for item in ("params", "train_state")}


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_resumes_from_the_one_before_bit_identically(tmp_path, monkeypatch, caplog):
    """Four steps saved at 2 and 4; step 4's largest params file is cut in half. `train` again: step 4 is
    set aside, the run resumes from step 2 (two more steps run, not four) and its new step 4 holds
    exactly the params and optimizer state of the uninterrupted run, with the same losses."""
    from test_train_loop import cfg_for

    import r1jax.train.loop as loop
    from r1jax.train.metrics import read_metrics

    real, calls = loop.make_train_step, []

    def counted(*args, **kwargs):
        step_fn = real(*args, **kwargs)
        return lambda *a: (calls.append(1), step_fn(*a))[1]

    monkeypatch.setattr(loop, "make_train_step", counted)
    cfg = cfg_for(tmp_path, "steps=4", "checkpoint.save_interval_steps=2", "eval_data=null")
    assert loop.train(cfg).step == 4 and len(calls) == 4
    run, ckpt = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    uninterrupted, losses = _saved_tree(ckpt / "4"), [r["loss"] for r in read_metrics(run)]
    damage(largest_file(ckpt / "4" / "params"), "truncate")

    with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint.manager"):
        assert loop.train(cfg).step == 4 and len(calls) == 6  # resumed at step 2
    assert f"checkpoint step 4 rejected: {ckpt}/4: cannot be read" in caplog.text
    assert "resuming from step 2" in caplog.text
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4", "4.damaged", "config.yaml", *TOKENIZER_FILES]
    resumed = _saved_tree(ckpt / "4")
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(run)] == losses


# --------------------------------------------------------------------------- a full disk

# Runs inside a private mount namespace (the test's own mounts vanish with it): mounts a tmpfs on
# DISK, then runs each scenario's commands against it, and prints what it saw as one JSON line.
DISK_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, subprocess, sys
    from pathlib import Path

    disk, scenario, args = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

    def mount(size, remount=False):
        opts = ("remount," if remount else "") + f"size={size}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)], check=True)

    def r1jax(*argv):
        p = subprocess.run([sys.executable, "-m", "r1jax.cli", *argv], capture_output=True, text=True)
        return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}

    def listing(d):
        return sorted(p.name for p in Path(d).iterdir()) if Path(d).is_dir() else None

    def digest(d):  # every file's path and bytes
        h = hashlib.sha256()
        for f in sorted(p for p in Path(d).rglob("*") if p.is_file()):
            h.update(str(f.relative_to(d)).encode() + f.read_bytes())
        return h.hexdigest()

    def fill(leave):  # a file taking all free space but `leave` bytes
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
            f.write(b"\\0" * max(0, st.f_bavail * st.f_frsize - leave))

    report = {}
    if scenario == "train":
        mount(args["size"])
        run = disk / "run"
        report["full"] = r1jax(*args["train"], f"out_dir={run}")
        report["after_full"] = listing(run / "checkpoints")
        report["metrics_full"] = (run / "metrics.jsonl").read_text()
        mount("64m", remount=True)  # space freed
        report["resumed"] = r1jax(*args["train"], f"out_dir={run}")
        report["after_resume"] = listing(run / "checkpoints")
        report["metrics_resumed"] = (run / "metrics.jsonl").read_text()
    else:
        mount("64m")
        dst, hf = disk / "dst", disk / "hf"
        report["first"] = r1jax("convert", "hf-to-orbax", args["src"], str(dst))
        before = digest(dst)
        fill(leave=64 << 10)
        report["hf_to_orbax_full"] = r1jax("convert", "hf-to-orbax", args["src"], str(dst), "--overwrite")
        report["dst_unchanged"] = digest(dst) == before
        report["orbax_to_hf_full"] = r1jax("convert", "orbax-to-hf", str(dst), str(hf))
        report["after_full"] = listing(disk)
        (disk / "filler").unlink()
        report["hf_to_orbax_freed"] = r1jax("convert", "hf-to-orbax", args["src"], str(dst), "--overwrite")
        report["orbax_to_hf_freed"] = r1jax("convert", "orbax-to-hf", str(dst), str(hf))
        report["after_freed"] = listing(disk)
    print(json.dumps(report))
''')


def _namespace_prefix(tmp_path) -> list[str]:
    """A command prefix under which a tmpfs may be mounted privately: `unshare -m` as root, else a user
    + mount namespace (`unshare -Urm`); skips, saying why, where neither is allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small tmpfs privately")
    probe = tmp_path / "probe"
    probe.mkdir()
    why = []
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        p = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                           capture_output=True, text=True)
        if p.returncode == 0:
            return prefix
        why.append(f"{' '.join(prefix)}: {p.stderr.strip()}")
    pytest.skip("cannot mount a tmpfs in a private mount namespace (not root, and user namespaces are off): "
                + "; ".join(why))


def _on_a_small_disk(tmp_path, scenario: str, **args) -> dict:
    prefix = _namespace_prefix(tmp_path)
    (tmp_path / "disk").mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("R1JAX_DEBUG", None)
    p = subprocess.run([*prefix, sys.executable, str(script), str(tmp_path / "disk"), scenario, json.dumps(args)],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads(p.stdout.splitlines()[-1])


def _single_line_error(result: dict, command: str) -> str:
    assert result["rc"] == 2, result["stderr"][-5000:]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"r1jax {command}: error: "), result["stderr"][-5000:]
    return lines[0]


NO_SPACE = r"(No space left on device|RESOURCE_EXHAUSTED)"


@pytest.mark.slow
def test_a_full_disk_during_train_is_one_error_and_the_run_resumes(tmp_path):
    """A checkpoint step of the tiny model takes 4.2 MB: on a 6 MB disk step 2 is saved, step 4 (saved
    asynchronously) fails. One line names the step and the cause, exit 2, its partial directory is gone,
    step 2 intact; with space again the same command resumes from step 2 and completes."""
    from test_train_loop import BASE

    train = ["train", "configs/train/tiny_pretrain.yaml", *BASE, "steps=4", "checkpoint.save_interval_steps=2",
             "checkpoint.async_save=true", "eval_data=null"]
    report = _on_a_small_disk(tmp_path, "train", size="6m", train=train)
    ckpt = tmp_path / "disk" / "run" / "checkpoints"
    line = _single_line_error(report["full"], "train")
    assert re.fullmatch(rf"r1jax train: error: {ckpt}/4: saving the checkpoint failed \(.*{NO_SPACE}.*\); its "
                        rf"partial files are removed and the last complete checkpoint, step 2, is intact: a new run "
                        rf"resumes from it", line), line
    assert report["after_full"] == ["2", "config.yaml", *TOKENIZER_FILES]  # no *.orbax-checkpoint-tmp* left
    resumed = report["resumed"]
    assert resumed["rc"] == 0 and "completed at step 4" in resumed["stdout"], resumed["stderr"][-5000:]
    assert report["after_resume"] == ["2", "4", "config.yaml", *TOKENIZER_FILES]
    full = report["metrics_full"].splitlines()
    again = report["metrics_resumed"].splitlines()
    assert [json.loads(r)["step"] for r in again] == [1, 2, 3, 4]
    # Steps 1-2 are the first run's rows, timings and all (a restart from scratch would rewrite them);
    # steps 3-4 ran again from step 2's checkpoint to the same losses.
    assert again[:2] == full[:2]
    assert [json.loads(r)["loss"] for r in again[2:]] == [json.loads(r)["loss"] for r in full[2:]]


@pytest.mark.slow
def test_a_full_disk_during_convert_is_one_error_and_the_old_destination_stays(tmp_path):
    """Both directions on a disk with 64 KiB left: one line naming the destination and the cause, exit 2,
    the existing destination byte for byte as it was, no temporary directory left; with space again
    both succeed."""
    from convert_fixtures import moe_config, write_random_hf

    src = tmp_path / "src"
    write_random_hf(src, moe_config())
    report = _on_a_small_disk(tmp_path, "convert", src=str(src))
    disk = tmp_path / "disk"
    assert report["first"]["rc"] == 0, report["first"]["stderr"][-5000:]
    for direction, dst in (("hf_to_orbax_full", "dst"), ("orbax_to_hf_full", "hf")):
        line = _single_line_error(report[direction], "convert")
        assert re.fullmatch(rf"r1jax convert: error: {disk}/{dst}: not written \(.*{NO_SPACE}.*\) "
                            rf"\(the traceback: R1JAX_DEBUG=1\)", line), line
    assert report["dst_unchanged"]
    assert report["after_full"] == ["dst", "filler"]  # no .dst.tmp-*, no .hf.tmp-*
    for done in ("hf_to_orbax_freed", "orbax_to_hf_freed"):
        assert report[done]["rc"] == 0, report[done]["stderr"][-5000:]
    assert report["after_freed"] == ["dst", "hf"]


# --------------------------------------------------------------------------- the command's error path


def test_storage_failures_are_one_line_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import r1jax.sample

    argv = ["sample", "--ckpt", "m", "--prompts", "p.jsonl", "--out", str(tmp_path / "out.jsonl")]
    enospc = OSError(28, "No space left on device", str(tmp_path / "out.jsonl"))

    def fail(error):
        def sample_file(*args, **kwargs):
            raise error
        monkeypatch.setattr(r1jax.sample, "sample_file", sample_file)

    fail(enospc)
    monkeypatch.delenv("R1JAX_DEBUG", raising=False)
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"r1jax sample: error: {tmp_path}/out.jsonl: No space left on device (ENOSPC) "
                                       f"(the traceback: R1JAX_DEBUG=1)\n")
    fail(OSError(28, "No space left on device"))  # no file named: the command's destination is
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"r1jax sample: error: {tmp_path}/out.jsonl: not written (No space "
                                              f"left on device (ENOSPC))")
    monkeypatch.setenv("R1JAX_DEBUG", "1")
    fail(enospc)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in sample_file" in err
    assert err.endswith(f"r1jax sample: error: {tmp_path}/out.jsonl: No space left on device (ENOSPC)\n")
    fail(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):  # not a storage failure: its traceback is the report
        main(argv)
