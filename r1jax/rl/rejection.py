"""Rejection sampling (R1 §2.3.3): sample N completions per prompt from a (RL-trained) model, keep
the correct ones that also pass the format and readability filters, deduplicate, and write an SFT
dataset in chat format with per-prompt statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from r1jax import paths
from r1jax.config import RejectionConfig
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.data.tokenizer import completion_texts
from r1jax.eval.run import prompt_rows
from r1jax.infer import sampler
from r1jax.rl import rewards

THINK_PREFIX = "<think>\n"  # the R1 generation prompt ends inside the reasoning block


def _keep(prompt: str, completion: str, answer, n_tokens: int, finished: bool, cfg: RejectionConfig,
          task: str | None = None) -> str | None:
    """None if kept, else the reason it was rejected."""
    if not finished:
        return "truncated"
    if n_tokens < cfg.min_tokens:
        return "too_short"
    if answer is None or rewards.accuracy([prompt], [completion], answer=[answer], task=[task])[0] != 1.0:
        return "incorrect"
    if cfg.require_format and rewards.format_reward([prompt], [completion], prompt_texts=[prompt])[0] != 1.0:
        return "format"
    share = rewards.language_consistency([prompt], [completion], prompt_texts=[prompt], language=cfg.language)[0]
    if share < cfg.min_language_share:
        return "language"
    return None


SYNC_EVERY_S = 30.0  # on gs://: how often the partial dataset and its marker are copied up


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


def rejection_sample(params, model_cfg, cfg: RejectionConfig, tok, out_path, *, progress: bool = False) -> dict:
    """Write kept samples to `out_path` (jsonl of {"messages": [...], "id", "answer"}, and "task" for a
    built-in task's rows) and `out_path` + `.stats.json`; return the statistics. Progress is recorded
    after every batch, so a killed run, started again, continues where it stopped (same seeds, same
    output). On gs:// the files are written locally and copied up (every 30 s and at the end; paths.LocalMirror)."""
    if not paths.is_remote(out_path):
        return _rejection_sample(params, model_cfg, cfg, tok, Path(out_path), progress)
    remote = paths.as_path(out_path)
    # The dataset and its progress marker after the partial rows they describe; the finished ones last.
    names = [remote.name + suffix for suffix in (".tmp", ".progress.json", "", ".stats.json")]
    with paths.LocalMirror(remote.parent, names, every_s=SYNC_EVERY_S, prefix="rejection") as mirror:
        stats = _rejection_sample(params, model_cfg, cfg, tok, mirror.local / remote.name, progress, mirror.sync)
        mirror.sync(force=True)
    for leftover in names[:2]:  # the partial dataset and its marker, superseded by the finished one
        if (remote.parent / leftover).exists():
            (remote.parent / leftover).unlink()
    return stats


def _rejection_sample(params, model_cfg, cfg: RejectionConfig, tok, out_path: Path, progress: bool,
                      after_batch=lambda: None) -> dict:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    marker = out_path.with_name(out_path.name + ".progress.json")
    it = make_prompt_iterator(cfg.prompts, tok)
    stats = {"prompts": 0, "samples": 0, "kept": 0, "rejected": {}, "per_prompt": []}
    done_bytes = 0
    if tmp.exists() and marker.exists():  # a killed run: keep its finished batches, sample the rest
        saved = json.loads(marker.read_text())
        stats, done_bytes = saved["stats"], saved["bytes"]
        it.set_state(saved["iterator"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_prompts, initial=stats["prompts"], desc="rejection sampling", dynamic_ncols=True)
    with open(tmp, "r+" if done_bytes else "w") as f:
        f.truncate(done_bytes)  # rows written after the last recorded batch are sampled again
        f.seek(done_bytes)
        for batch in it:
            if cfg.max_prompts is not None and stats["prompts"] >= cfg.max_prompts:
                break
            rows = prompt_rows(batch)
            rep = [r for r in rows for _ in range(cfg.num_samples)]
            out = sampler.sample(params, model_cfg, rep, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=cfg.seed + stats["prompts"], eos_id=tok.eos_id,
                                 stop_ids=tok.extra_stop_ids or None)
            texts = completion_texts(tok, out.tokens, out.lengths, out.finished)
            for p, row in enumerate(rows):
                if cfg.max_prompts is not None and stats["prompts"] >= cfg.max_prompts:
                    break
                prompt_text = tok.decode(row)
                answer = str(batch["answer"][p]) or None
                task = batch["columns"][p].get("task")  # a built-in task's rows keep it: they verify as its rows
                seen, kept = set(), 0
                for s in range(cfg.num_samples):
                    i = p * cfg.num_samples + s
                    n, text = int(out.lengths[i]), texts[i]
                    stats["samples"] += 1
                    reason = _keep(prompt_text, text, answer, n, bool(out.finished[i]), cfg, task)
                    key = " ".join(text.split())
                    if reason is None and key in seen:
                        reason = "duplicate"
                    if reason is None and kept >= cfg.max_per_prompt:
                        reason = "per_prompt_cap"
                    if reason is not None:
                        stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
                        continue
                    seen.add(key)
                    kept += 1
                    f.write(json.dumps({
                        "id": str(batch["id"][p]), "answer": answer, **({"task": task} if task else {}),
                        "messages": json.loads(str(batch["messages"][p]))
                        + [{"role": "assistant", "content": THINK_PREFIX + text}],
                    }) + "\n")
                stats["prompts"] += 1
                stats["kept"] += kept
                stats["per_prompt"].append({"id": str(batch["id"][p]), "kept": kept, "total": cfg.num_samples})
                if bar is not None:
                    bar.update(1)
            f.flush()
            _write_atomic(marker, json.dumps({"bytes": f.tell(), "stats": stats, "iterator": it.get_state()}))
            after_batch()
    if bar is not None:
        bar.close()
    tmp.replace(out_path)  # the dataset appears only when complete
    marker.unlink(missing_ok=True)
    stats["kept_fraction"] = stats["kept"] / max(stats["samples"], 1)
    stats["prompts_with_any"] = float(np.mean([r["kept"] > 0 for r in stats["per_prompt"]])) if stats["per_prompt"] else 0.0
    Path(str(out_path) + ".stats.json").write_text(json.dumps(stats, indent=1))
    return stats
