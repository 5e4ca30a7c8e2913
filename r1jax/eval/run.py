"""Evaluate a model on a prompt set: sample n completions per prompt, verify, report pass@k/maj@k."""

from __future__ import annotations

import json
from collections.abc import Callable

import jax
import numpy as np

from r1jax import api, paths, plugins
from r1jax.config import DataConfig, ModelConfig, VerifierName, check_names
from r1jax.data import task_registry, tasks
from r1jax.data.pipeline import make_prompt_iterator
from r1jax.data.tokenizer import completion_texts, load_tokenizer
from r1jax.eval.metrics import evaluate, format_table, results_table, write_jsonl
from r1jax.infer import sampler
from r1jax.parallel import mesh as mesh_lib
from r1jax.train.run import check_vocab

# verify(gold answer: str, completion: str) -> bool. The built-in: a row of a built-in task by its
# task's verifier (the row's `task` column, docs/tasks.md), any other row by its final answer
# (<answer>, \boxed{} or after </think>) equal to the gold one, integers compared as integers.
VERIFIERS: dict[str, Callable] = {"answer_match": task_registry.verify_answer}
check_names(VERIFIERS, VerifierName, "verifier")


def resolve_verifier(spec: str) -> Callable:
    """`EvalConfig.verifier` -> the verify function: a built-in name, or `package.module:function`
    imported by the loader GRPO uses for custom rewards (so both accept the same specs)."""
    return plugins.resolve_spec(spec, VERIFIERS, "verifier", "verifier")


def prompt_rows(batch: dict) -> list[list[int]]:
    """Left-padded prompt batch -> each row's real token ids."""
    return [t[m.astype(bool)].tolist() for t, m in zip(batch["tokens"], batch["prompt_mask"])]


def evaluate_model(params, model_cfg: ModelConfig, prompts: DataConfig, tok, *, num_samples: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                   max_prompts: int | None = None, ks=(1,), maj_ks=(), mesh=None,
                   verify: Callable = task_registry.verify_answer):
    """-> (summary {pass@k..., maj@k..., mean_length}, records with completions). Greedy when
    temperature is 0 (then every sample is the same; use num_samples 1). verify(gold answer,
    completion) -> bool judges each sample (the built-in one also reads the row's `task` column);
    maj@k votes on tasks.extract_answer's answers."""
    it = make_prompt_iterator(prompts, tok)
    problems, completions, ids, lengths = [], [], [], []
    for batch in it:
        rows = prompt_rows(batch)
        keep = [i for i, a in enumerate(batch["answer"]) if str(a)]
        rep = [rows[i] for i in keep for _ in range(num_samples)]
        if not rep:
            continue
        out = sampler.sample(params, model_cfg, rep, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed + len(problems), eos_id=tok.eos_id,
                             stop_ids=tok.extra_stop_ids or None, mesh=mesh)
        texts = completion_texts(tok, out.tokens, out.lengths, out.finished)
        lengths.extend(int(n) for n in out.lengths)
        for j, i in enumerate(keep):
            problems.append((str(batch["answer"][i]), batch["columns"][i].get("task")))
            completions.append(texts[j * num_samples:(j + 1) * num_samples])
            ids.append(str(batch["id"][i]))
        if max_prompts is not None and len(problems) >= max_prompts:
            break
    if verify is task_registry.verify_answer:
        judge = lambda problem, c: verify(problem[0], c, problem[1])  # noqa: E731
    else:
        judge = lambda problem, c: verify(problem[0], c)  # noqa: E731
    summary, records = evaluate(problems, completions, judge, tasks.extract_answer, ks=ks, maj_ks=maj_ks,
                                ids=ids)
    summary["mean_length"] = float(np.mean(lengths)) if lengths else 0.0
    for rec, comps in zip(records, completions):
        rec["completions"] = comps
    return summary, records


def run_eval(cfg) -> dict:
    """`r1jax eval`: evaluate cfg.model on cfg.prompts; print and write the results table."""
    mesh_lib.initialize_distributed()
    mesh = mesh_lib.build_mesh(cfg.mesh)
    mesh_lib.check_model(api.read_config(cfg.model), dict(mesh.shape))  # before loading any weight
    verify = resolve_verifier(cfg.verifier)  # checked at config load too; imported before any weight
    tok = load_tokenizer(cfg.prompts.tokenizer, cfg.model)
    check_vocab(tok, api.read_config(cfg.model), cfg.model)
    model_cfg, params = api.load_pretrained(cfg.model, mesh=mesh)
    summary, records = evaluate_model(params, model_cfg, cfg.prompts, tok, num_samples=cfg.num_samples,
                                      temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                      max_prompts=cfg.max_prompts, ks=cfg.ks, maj_ks=cfg.maj_ks, mesh=mesh,
                                      verify=verify)
    if jax.process_index() != 0:
        return summary
    out = paths.as_path(cfg.out_dir)
    rows = results_table({",".join(cfg.prompts.sources): summary})
    write_jsonl(rows, out / "results.jsonl")
    write_jsonl(records, out / "records.jsonl")
    print(format_table(rows))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
