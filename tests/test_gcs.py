"""Run directories, checkpoints and conversions on gs:// (issue 16), against a GCS emulator the tests
start on loopback (tests/gcs_emulator.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gcs_emulator import gcs  # noqa: F401  (the fixture)

from r1jax import paths

REPO = Path(__file__).resolve().parents[1]


def r1jax(*argv, cwd):
    """The CLI in its own one-device process (the emulator's environment is inherited)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "r1jax.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def listing(uri) -> list[str]:
    return sorted(p.name for p in paths.as_path(uri).iterdir())


SFT = ["configs/train/tiny_sft.yaml", "log_every=1", "eval_every=0", "eval_data=null", "progress=false",
       "data.seq_len=64", "data.batch_size=4", "checkpoint.save_interval_steps=2", "checkpoint.async_save=false",
       "optimizer.warmup_steps=1"]


def test_paths_keep_gs_uris_and_local_paths_apart(gcs):
    uri = f"{gcs}/a/b"
    assert paths.is_remote(uri) and not paths.is_remote("runs/gs:/x") and not paths.is_remote(Path("/tmp"))
    assert str(paths.as_path(uri)) == uri  # pathlib would make it gs:/r1jax-test/a/b
    assert isinstance(paths.as_path("runs/x"), Path)
    (paths.as_path(uri) / "f.txt").write_text("hi")
    assert listing(uri) == ["f.txt"] and (paths.as_path(uri) / "f.txt").read_text() == "hi"
    with pytest.raises(Exception, match="s3:// scheme is not supported"):
        paths.as_path("s3://bucket/x")


@pytest.mark.slow
def test_sft_writes_its_run_to_gs_and_resumes_from_it(gcs, tmp_path):
    run = f"{gcs}/sft-run"
    first = r1jax("train", *SFT, "steps=2", f"out_dir={run}", cwd=REPO)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"completed at step 2; run directory {run}" in first.stdout
    assert not (REPO / "gs:").exists()  # the old bug: a local ./gs:/bucket/...
    assert listing(run) == ["checkpoints", "config.yaml", "metrics.jsonl", "result.json", "tensorboard"]
    assert listing(f"{run}/checkpoints") == ["2", "config.yaml"]
    rows = [json.loads(l) for l in paths.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert listing(f"{run}/tensorboard")  # the event file was copied up

    again = r1jax("train", *SFT, "steps=4", f"out_dir={run}", cwd=REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "completed at step 4" in again.stdout
    assert listing(f"{run}/checkpoints") == ["2", "4", "config.yaml"]
    rows2 = [json.loads(l) for l in paths.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert rows2[:2] == rows  # resumed at step 2: the first run's rows are kept, not re-run

    # The same two runs locally, for the losses of the resumed steps: the bucket changes nothing.
    local = tmp_path / "run"
    assert r1jax("train", *SFT, "steps=4", f"out_dir={local}", cwd=REPO).returncode == 0
    local_rows = [json.loads(l) for l in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows2] == [r["loss"] for r in local_rows]
