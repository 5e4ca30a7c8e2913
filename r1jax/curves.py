"""The learning curve of each RL stage of a pipeline: mean reward and training-prompt accuracy at
every logged GRPO step, and held-out pass@1 every `curve_every` steps (GRPO's own `eval_every`
evaluation), read back from the metrics.jsonl the run writes. Written as `curve.json` in the
stage's directory and drawn, one panel a stage, in `rl_curves.png` beside the pipeline's results,
so a user sees whether more steps would still pay."""

from __future__ import annotations

import json
from pathlib import Path

from r1jax import paths
from r1jax.train.metrics import read_metrics

CURVE_FILE = "curve.json"
PLOT_FILE = "rl_curves.png"


def stage_curve(run_dir) -> list[dict]:
    """[{step, reward, accuracy, heldout_pass@1}] over the run's logged steps; a value the step did
    not log (held-out pass@1 between evaluations, accuracy without an accuracy reward) is None."""
    out = []
    for m in read_metrics(run_dir):
        if "reward/mean" not in m and "eval/pass@1" not in m:
            continue
        out.append({"step": m["step"], "reward": m.get("reward/mean"), "accuracy": m.get("reward/accuracy"),
                    "heldout_pass@1": m.get("eval/pass@1")})
    return out


def write_curve(run_dir) -> tuple[str, list[dict]]:
    """The curve of one GRPO run -> (path of its curve.json, the rows)."""
    rows = stage_curve(run_dir)
    path = paths.as_path(run_dir) / CURVE_FILE
    path.write_text(json.dumps(rows, indent=1))
    return str(path), rows


def plot_curves(out, curves: dict[str, list[dict]]) -> Path | None:
    """{stage name: curve rows} -> out/rl_curves.png (None when no RL stage ran)."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        for key, label, style in (("reward", "reward (weighted, train prompts)", "-"),
                                  ("accuracy", "accuracy (train prompts)", "-"),
                                  ("heldout_pass@1", "held-out pass@1", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("GRPO step")
        ax.set_title(f"RL stage {name}")
        ax.legend()
    fig.tight_layout()
    path = paths.as_path(out) / PLOT_FILE
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path
