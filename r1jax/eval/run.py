"""Evaluate a model on a prompt set: sample n completions per prompt, verify, report pass@k/maj@k."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from r1jax.config import DataConfig, ModelConfig
from r1jax.data import tasks
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.eval.metrics import evaluate
from r1jax.infer import sampler
from r1jax.rl import rewards

# verify(gold answer: str, completion: str) -> bool. The built-in: the completion's final answer
# (<answer>, \boxed{} or after </think>) equals the gold one, integers compared as integers.
VERIFIERS: dict[str, Callable] = {"answer_match": tasks.verify}


def resolve_verifier(spec: str) -> Callable:
    """`EvalConfig.verifier` -> the verify function: a built-in name, or `package.module:function`
    imported by the loader GRPO uses for custom rewards (so both accept the same specs)."""
    return rewards.resolve_spec(spec, VERIFIERS, "verifier", "verifier")


def prompt_rows(batch: dict) -> list[list[int]]:
    """Left-padded prompt batch -> each row's real token ids."""
    return [t[m.astype(bool)].tolist() for t, m in zip(batch["tokens"], batch["prompt_mask"])]


def evaluate_model(params, model_cfg: ModelConfig, prompts: DataConfig, tok, *, num_samples: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                   max_prompts: int | None = None, ks=(1,), maj_ks=(), mesh=None, verify: Callable = tasks.verify):
    """-> (summary {pass@k..., maj@k..., mean_length}, records with completions). Greedy when
    temperature is 0 (then every sample is the same; use num_samples 1). verify(gold answer,
    completion) -> bool judges each sample; maj@k votes on tasks.extract_answer's answers."""
    it = make_prompt_iterator(prompts, tok)
    problems, completions, ids, lengths = [], [], [], []
    for batch in it:
        rows = prompt_rows(batch)
        keep = [i for i, a in enumerate(batch["answer"]) if str(a)]
        rep = [rows[i] for i in keep for _ in range(num_samples)]
        if not rep:
            continue
        out = sampler.sample(params, model_cfg, rep, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed + len(problems), eos_id=tok.eos_id, mesh=mesh)
        for j, i in enumerate(keep):
            texts = []
            for s in range(num_samples):
                r = j * num_samples + s
                n = int(out.lengths[r])
                ids_ = out.tokens[r, :n].tolist()
                if out.finished[r] and ids_ and ids_[-1] == tok.eos_id:
                    ids_ = ids_[:-1]
                texts.append(tok.decode(ids_))
                lengths.append(n)
            problems.append(str(batch["answer"][i]))
            completions.append(texts)
            ids.append(str(batch["id"][i]))
        if max_prompts is not None and len(problems) >= max_prompts:
            break
    summary, records = evaluate(problems, completions, verify, tasks.extract_answer, ks=ks, maj_ks=maj_ks,
                                ids=ids)
    summary["mean_length"] = float(np.mean(lengths)) if lengths else 0.0
    for rec, comps in zip(records, completions):
        rec["completions"] = comps
    return summary, records


def run_eval(cfg) -> dict:
    """`r1jax eval`: evaluate cfg.model on cfg.prompts; print and write the results table."""
    import json
    from pathlib import Path

    import r1jax
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.eval.metrics import format_table, results_table, write_jsonl

    import jax

    from r1jax.parallel import mesh as mesh_lib

    mesh_lib.initialize_distributed()
    mesh = mesh_lib.build_mesh(cfg.mesh)
    mesh_lib.check_model(r1jax.api.read_config(cfg.model), dict(mesh.shape))  # before loading any weight
    verify = resolve_verifier(cfg.verifier)  # checked at config load too; imported before any weight
    model_cfg, params = r1jax.load_pretrained(cfg.model, mesh=mesh)
    tok = load_tokenizer(cfg.prompts.tokenizer)
    summary, records = evaluate_model(params, model_cfg, cfg.prompts, tok, num_samples=cfg.num_samples,
                                      temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                      max_prompts=cfg.max_prompts, ks=cfg.ks, maj_ks=cfg.maj_ks, mesh=mesh,
                                      verify=verify)
    if jax.process_index() != 0:
        return summary
    out = Path(cfg.out_dir)
    rows = results_table({",".join(cfg.prompts.sources): summary})
    write_jsonl(rows, out / "results.jsonl")
    write_jsonl(records, out / "records.jsonl")
    print(format_table(rows))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
