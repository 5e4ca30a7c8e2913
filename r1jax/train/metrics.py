"""Run metrics: one JSON line per logged step in `metrics.jsonl` and TensorBoard event files.
Only process 0 writes.

A run directory on gs:// cannot be appended to (an object is written whole), and tensorboardX appends
to its event file. So the writer works in a local directory and copies the two to the run directory:
at most every `sync_every_s` seconds and on close (a kill loses at most that much of the log; the
checkpoints, which hold what matters for resuming, are written to the bucket directly). On resume the
bucket's copies are read back first. A local run directory is written in place, as before."""

from __future__ import annotations

import json
import time

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
        run_dir = paths.as_path(run_dir)
        self.mirror = None  # a remote run directory's local working copy
        self.path = run_dir / METRICS_FILE
        self.tb = None
        if not self.enabled:
            return
        local = run_dir
        if paths.is_remote(run_dir):
            self.mirror = paths.LocalMirror(run_dir, [METRICS_FILE, TENSORBOARD_DIR], every_s=sync_every_s,
                                            prefix="metrics")
            local = self.mirror.local
            self.path = local / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(local / TENSORBOARD_DIR), purge_step=resume_step or None)

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
        if self.mirror is not None:
            self.mirror.sync()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            if self.mirror is not None:
                try:
                    self.mirror.sync(force=True)
                finally:
                    self.mirror.close()


def read_metrics(run_dir) -> list[dict]:
    path = paths.as_path(run_dir) / METRICS_FILE
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
