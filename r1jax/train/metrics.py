"""Run metrics: one JSON line per logged step in `metrics.jsonl` and TensorBoard event files.
Only process 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np


def to_host(metrics: dict) -> dict:
    """Device scalars/vectors -> python floats/lists."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(jax.device_get(v))
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


class MetricsWriter:
    def __init__(self, run_dir, *, resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
