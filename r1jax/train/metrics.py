"""Run metrics: one JSON line per logged step in `metrics.jsonl` and TensorBoard event files.
Only process 0 writes.

A run directory on gs:// cannot be appended to (an object is written whole), and tensorboardX appends
to its event file. So the writer works in a local directory and copies the two to the run directory:
at most every `sync_every_s` seconds and on close (a kill loses at most that much of the log; the
checkpoints, which hold what matters for resuming, are written to the bucket directly). On resume the
bucket's copies are read back first. A local run directory is written in place, as before."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from r1jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_host(metrics: dict) -> dict:
    """Device scalars/vectors -> python floats/lists."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(jax.device_get(v))
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


class MetricsWriter:
    def __init__(self, run_dir, *, resume_step: int = 0, enabled: bool | None = None,
                 sync_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = paths.as_path(run_dir)
        self.remote = paths.is_remote(self.run_dir)
        self.sync_every_s, self._synced = sync_every_s, time.monotonic()
        self.local = self.run_dir
        self.path = self.local / METRICS_FILE
        self.tb = None
        if not self.enabled:
            return
        if self.remote:
            self.local = Path(tempfile.mkdtemp(prefix="r1jax-metrics-"))
            self.path = self.local / METRICS_FILE
            if self.run_dir.exists():
                paths.download_tree(self.run_dir, self.local,
                                    skip=lambda rel: rel.split("/")[0] not in (METRICS_FILE, TENSORBOARD_DIR))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.local / TENSORBOARD_DIR), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines from steps the restored checkpoint had not reached (they are re-run)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.path.write_text("".join(l + "\n" for l in keep))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{k}/layer_{i}", x, step)
        self.tb.flush()
        if self.remote and time.monotonic() - self._synced >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Copy the local metrics.jsonl and event files to a remote run directory (whole files: an
        object cannot be appended to)."""
        if self.remote and self.enabled:
            paths.upload_tree(self.local, self.run_dir)
            self._synced = time.monotonic()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            if self.remote:
                try:
                    self.sync()
                finally:
                    shutil.rmtree(self.local, ignore_errors=True)


def read_metrics(run_dir) -> list[dict]:
    path = paths.as_path(run_dir) / METRICS_FILE
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
