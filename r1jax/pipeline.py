"""`r1jax pipeline CONFIG`: stages in order (the R1 recipe), each feeding the next, every model
stage evaluated on held-out prompts and exported; a finished stage is skipped on a rerun and an
interrupted one resumes from its own checkpoints. Each RL stage's learning curve (reward and held-out
pass@1 every `curve_every` steps) is written beside it and plotted in rl_curves.png (curves.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from r1jax import api, curves, paths
from r1jax import config as config_lib
from r1jax.config import GRPOConfig, PipelineConfig, RejectionConfig, StageKind, StageSpec, TrainConfig, check_names
from r1jax.errors import ConfigError

MODEL_KINDS = ("pretrain", "sft", "grpo", "distill")
CLASSES = {"pretrain": TrainConfig, "sft": TrainConfig, "distill": TrainConfig, "grpo": GRPOConfig,
           "rejection": RejectionConfig}
check_names(CLASSES, StageKind, "kind")
STAGE_FIELD = {"pretrain": "pretrain", "sft": "sft", "distill": "sft", "grpo": "grpo"}


def stage_dir(cfg: PipelineConfig, name: str) -> Path:
    return paths.as_path(cfg.out_dir) / name  # local or gs://


def checkpoint_dir(cfg: PipelineConfig, name: str) -> Path:
    return stage_dir(cfg, name) / "checkpoints"


def dataset_path(cfg: PipelineConfig, name: str) -> Path:
    return stage_dir(cfg, name) / "data.jsonl"


def _ref(cfg: PipelineConfig, i: int, value: str, want: tuple[str, ...], key: str) -> str:
    name = value[1:]
    earlier = {st.name: st for st in cfg.stages[:i]}
    if name not in earlier:
        raise ConfigError(f"stages[{i}].config.{key}: {value!r} names no earlier stage "
                          f"(earlier: {', '.join(earlier) or 'none'})")
    if earlier[name].kind not in want:
        raise ConfigError(f"stages[{i}].config.{key}: stage {name!r} is a {earlier[name].kind} stage; "
                          f"expected one of {list(want)}")
    return str(checkpoint_dir(cfg, name) if want == MODEL_KINDS else dataset_path(cfg, name))


def resolve_stage(cfg: PipelineConfig, i: int):
    """The stage's typed config with the pipeline's out_dir and references filled in."""
    spec: StageSpec = cfg.stages[i]
    d = config_lib.thaw(spec.config)
    d["out_dir"] = str(stage_dir(cfg, spec.name))
    if spec.kind in STAGE_FIELD:
        d["stage"] = STAGE_FIELD[spec.kind]
    if isinstance(d.get("init_from"), str) and d["init_from"].startswith("@"):
        d["init_from"] = _ref(cfg, i, d["init_from"], MODEL_KINDS, "init_from")
    distill = d.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("teacher"), str) and distill["teacher"].startswith("@"):
        distill["teacher"] = _ref(cfg, i, distill["teacher"], MODEL_KINDS, "distill.teacher")
    for section in ("data", "eval_data", "prompts", "eval_prompts"):
        sources = (d.get(section) or {}).get("sources") if isinstance(d.get(section), dict) else None
        if sources:
            d[section]["sources"] = [_ref(cfg, i, s, ("rejection",), f"{section}.sources") if s.startswith("@") else s
                                     for s in sources]
    if spec.kind == "grpo" and cfg.curve_every:
        # The learning curve's held-out points: GRPO's own evaluation every curve_every steps, on the
        # pipeline's held-out prompts unless the stage names its own (a stage's eval_every wins).
        d.setdefault("eval_every", cfg.curve_every)
        if d.get("eval_prompts") is None and cfg.eval_prompts is not None:
            d["eval_prompts"] = config_lib.to_dict(cfg.eval_prompts)
    if spec.kind == "rejection" and not d.get("init_from"):
        raise ConfigError(f"stages[{i}].config.init_from: a rejection stage needs a model (e.g. '@rl')")
    # YAML includes left as paths (a config built in Python) resolve from the working directory.
    d = config_lib.resolve_includes(d, CLASSES[spec.kind], Path("."), f"stages[{i}].config.")
    return config_lib.from_dict(CLASSES[spec.kind], d, f"stages[{i}].config")


def _final_model(cfg: PipelineConfig, name: str):
    return api.load_pretrained(checkpoint_dir(cfg, name))


def evaluate_stage(cfg: PipelineConfig, model_cfg, params, tok) -> dict:
    from r1jax.eval.run import evaluate_model

    k = cfg.eval_samples
    greedy, _ = evaluate_model(params, model_cfg, cfg.eval_prompts, tok, num_samples=1, temperature=0.0,
                               max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
    sampled, _ = evaluate_model(params, model_cfg, cfg.eval_prompts, tok, num_samples=k,
                                temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                                max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, ks=(1, k))
    return {"pass@1_greedy": greedy["pass@1"], f"pass@1_T{cfg.eval_temperature:g}": sampled["pass@1"],
            f"pass@{k}": sampled[f"pass@{k}"], "mean_length": sampled["mean_length"],
            "eval_problems": sampled["num_problems"]}


def _export(cfg: PipelineConfig, name: str, model_cfg, params, tok) -> str:
    dst = stage_dir(cfg, name) / "hf"
    api.save_pretrained(dst, model_cfg, params, overwrite=True)
    tok.save(dst)
    return str(dst)


def run_stage(cfg: PipelineConfig, i: int, stage_cfg, tok) -> dict:
    spec = cfg.stages[i]
    t0 = time.perf_counter()
    record = {"name": spec.name, "kind": spec.kind}
    if spec.kind == "grpo":
        from r1jax.rl.grpo_loop import train_grpo

        result = train_grpo(stage_cfg)
        record.update(status=result.status, steps=result.step)
        record["curve"], _ = curves.write_curve(stage_dir(cfg, spec.name))
    elif spec.kind == "rejection":
        from r1jax.rl.rejection import rejection_sample

        model_cfg, params = api.load_pretrained(stage_cfg.init_from)
        stats = rejection_sample(params, model_cfg, stage_cfg, tok, dataset_path(cfg, spec.name), progress=True)
        record.update(status="completed", kept=stats["kept"], samples=stats["samples"],
                      kept_fraction=stats["kept_fraction"], prompts=stats["prompts"])
    else:
        from r1jax.train.loop import train

        result = train(stage_cfg)
        record.update(status=result.status, steps=result.step)
    if spec.kind in MODEL_KINDS and record["status"] == "completed":
        model_cfg, params = _final_model(cfg, spec.name)
        if cfg.eval_prompts is not None:
            record["eval"] = evaluate_stage(cfg, model_cfg, params, tok)
        if cfg.export_hf:
            record["hf"] = _export(cfg, spec.name, model_cfg, params, tok)
        from r1jax.model.params import count_params

        record["params"] = count_params(model_cfg)
        record["architecture"] = model_cfg.model_type
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    """Run every stage not yet done; -> one record per stage (name, kind, eval, seconds, ...)."""
    from r1jax.data.tokenizer import load_tokenizer

    stage_cfgs = [resolve_stage(cfg, i) for i in range(len(cfg.stages))]  # all errors before any work
    tok = load_tokenizer(_tokenizer_spec(stage_cfgs), getattr(stage_cfgs[0], "init_from", None))
    paths.makedirs(cfg.out_dir)
    records = []
    for i, (spec, stage_cfg) in enumerate(zip(cfg.stages, stage_cfgs)):
        done = stage_dir(cfg, spec.name) / "DONE.json"
        if done.exists():
            records.append(json.loads(done.read_text()))
            continue
        print(f"== stage {i + 1}/{len(cfg.stages)}: {spec.name} ({spec.kind})", flush=True)
        record = run_stage(cfg, i, stage_cfg, tok)
        records.append(record)
        if record["status"] != "completed":
            print(f"stage {spec.name} stopped: {record['status']}; rerun the pipeline to resume", flush=True)
            break
        done.write_text(json.dumps(record, indent=1))
    (paths.as_path(cfg.out_dir) / "results.json").write_text(json.dumps(records, indent=1))
    rl = {r["name"]: json.loads(paths.as_path(r["curve"]).read_text()) for r in records if r.get("curve")}
    if (plot := curves.plot_curves(cfg.out_dir, rl)) is not None:
        print(f"RL curves: {plot}", flush=True)
    return records


def _tokenizer_spec(stage_cfgs) -> str:
    for c in stage_cfgs:
        for section in ("data", "prompts"):
            data = getattr(c, section, None)
            if data is not None:
                return data.tokenizer
    return "auto"


def load_pipeline(path, overrides=()) -> PipelineConfig:
    """Load a pipeline YAML; YAML includes inside each stage's config (`model: ../model/x.yaml`)
    resolve beside the pipeline file."""
    d = config_lib.load_dict(PipelineConfig, path, overrides)
    base = Path(path).parent
    for i, st in enumerate(d.get("stages") or []):
        if isinstance(st, dict) and isinstance(st.get("config"), dict) and st.get("kind") in CLASSES:
            st["config"] = config_lib.resolve_includes(st["config"], CLASSES[st["kind"]], base,
                                                        f"stages[{i}].config.")
    return config_lib.from_dict(PipelineConfig, d)
