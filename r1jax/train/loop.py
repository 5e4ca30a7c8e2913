"""One training loop for pre-training and SFT (and reused by distillation): data → jitted step →
metrics, evaluation, checkpoints, SIGTERM and NaN handling, exact resume. With `distill` set, a frozen
teacher is loaded once beside the student and the step mixes KL to it with the CE (train/distill.py);
checkpoints hold the student alone.

Every run is a mesh run (one CPU device is a 1×1×1×1 mesh): the state lives in the shardings the rules
give it, each process feeds its rows of the global batch, and only process 0 writes files other than
checkpoints (which every process writes its shards of)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

import r1jax
from r1jax import config as config_lib
from r1jax.checkpoint.manager import CheckpointManager, install_sigterm_handler, preemption_requested
from r1jax.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
from r1jax.data.pipeline import make_iterator
from r1jax.data.tokenizer import load_tokenizer
from r1jax.errors import ConfigError, R1JaxError
from r1jax.model.params import init_params
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules as rules_lib
from r1jax.train import flops, optimizer
from r1jax.train.losses import lm_loss
from r1jax.train.metrics import MetricsWriter, to_host
from r1jax.train.step import StepOptions, init_state, make_train_step, step_shardings

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

EXECUTION_FIELDS = ("dtype", "moe_dispatch", "capacity_factor", "remat_policy")


class TrainingDiverged(R1JaxError):
    """Loss or gradient became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    status: str  # "completed" | "preempted"
    step: int
    run_dir: Path
    metrics: dict


def close_run(manager, writer, bar) -> None:
    """Wait for the last checkpoint to commit, then close everything a run opened."""
    manager.wait()
    manager.close()
    writer.close()
    if bar is not None:
        bar.close()


def finish_run(run_dir: Path, status: str, step: int, last: dict, primary: bool) -> RunResult:
    """Write result.json (process 0 only) and return the run's outcome."""
    if primary:
        (run_dir / "result.json").write_text(json.dumps({"status": status, "step": step, "metrics": last}, indent=1))
    return RunResult(status, step, run_dir, last)


def resolve_model(cfg: TrainConfig, mesh=None):
    """(ModelConfig, params or None): from init_from (architecture from the checkpoint, params placed on
    `mesh` when given) or cfg.model."""
    if cfg.init_from is None:
        return cfg.model, None
    model_cfg, params = r1jax.load_pretrained(cfg.init_from, dtype=cfg.model.param_dtype if cfg.model else None,
                                              mesh=mesh)
    if cfg.model is not None:
        arch = lambda c: {k: v for k, v in config_lib.to_dict(c).items()  # noqa: E731
                          if k not in EXECUTION_FIELDS + ("param_dtype", "hf_extra", "hf_rope_key")}
        if arch(cfg.model) != arch(model_cfg):
            diff = sorted(k for k in arch(model_cfg) if arch(model_cfg)[k] != arch(cfg.model).get(k))
            raise ConfigError(f"model.{diff[0]}: differs from the init_from checkpoint {cfg.init_from} "
                              f"({getattr(cfg.model, diff[0])!r} vs {getattr(model_cfg, diff[0])!r}); with "
                              f"init_from, model may only set {', '.join(EXECUTION_FIELDS)}")
        model_cfg = model_cfg.replace(**{k: getattr(cfg.model, k) for k in EXECUTION_FIELDS})
    return model_cfg, params


def teacher_config(dcfg: DistillConfig, student: ModelConfig, sizes: dict[str, int]):
    """The distillation teacher's config, read without its weights, checked against the student (same
    vocabulary: the KL compares the distributions id by id) and the mesh."""
    from r1jax.api import read_config

    path = Path(dcfg.teacher)
    teacher = read_config(path, "distill.teacher")
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"distill.teacher: vocab_size {teacher.vocab_size} of {path} differs from the student's "
                          f"{student.vocab_size}; logit distillation needs one shared vocabulary")
    if dcfg.top_k is not None and dcfg.top_k > teacher.vocab_size:
        raise ConfigError(f"distill.top_k: {dcfg.top_k} is larger than the vocabulary ({teacher.vocab_size})")
    try:
        mesh_lib.check_model(teacher, sizes)
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    return teacher


def load_teacher(dcfg: DistillConfig, shardings) -> dict:
    """The teacher's params, each leaf read straight into its sharding (this run's rules)."""
    from r1jax.checkpoint import orbax_io
    from r1jax.convert import hf_io

    path = Path(dcfg.teacher)
    if (path / "config.json").exists():
        return hf_io.load_hf(path, None, shardings)[1]
    return orbax_io.load_model(path, shardings=shardings)[1]


def _check_vocab(tok, model_cfg: ModelConfig) -> None:
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} tokens")


def _write_run_config(run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """config.yaml is the resolved config of the run's first start; a resume with a different one
    keeps it and writes config.resume-<n>.yaml beside it."""
    resolved = config_lib.to_dict(dataclasses.replace(cfg, model=model_cfg))
    text = yaml.safe_dump(resolved, sort_keys=False)
    main = run_dir / "config.yaml"
    if not main.exists():
        main.write_text(text)
    elif main.read_text() != text:
        n = len(list(run_dir.glob("config.resume-*.yaml"))) + 1
        (run_dir / f"config.resume-{n}.yaml").write_text(text)


def evaluate(params, model_cfg: ModelConfig, cfg: TrainConfig, tok, mesh) -> dict:
    """Token-mean CE over eval_batches of eval_data (same loss as training, no MTP/balance)."""
    it = make_iterator(cfg.eval_data, tok)
    shapes = batch_shapes(cfg.eval_data)
    shardings = rules_lib.batch_shardings(shapes, mesh, cfg.mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    loss = jax.jit(lambda p, b: lm_loss(p, b, model_cfg, mtp_weight=0.0, balance_alpha=0.0)[1],
                   in_shardings=(None, shardings), out_shardings=replicated)
    total, count = 0.0, 0.0
    for _ in range(cfg.eval_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        aux = loss(params, global_batch(batch, shapes, shardings))
        total += float(aux["ce"]) * float(aux["tokens"])
        count += float(aux["tokens"])
    return {"eval/ce": total / max(count, 1.0), "eval/tokens": count}


def batch_shapes(data: DataConfig) -> dict:
    """Global shapes of one training batch (every process's rows together)."""
    return {k: jax.ShapeDtypeStruct((data.batch_size, data.seq_len), jnp.int32) for k in BATCH_KEYS}


def global_batch(local: dict, shapes: dict, shardings: dict) -> dict:
    """This process's numpy rows -> global arrays. A process holds either its share of the rows (one data
    shard per process) or all of them (`data.shard_count: 1`: every process reads the same stream)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k], np.int32), shapes[k].shape)
            for k in shapes}


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"{cfg.stage}", dynamic_ncols=True)


def train(cfg: TrainConfig) -> RunResult:
    """Run (or resume) a training run in cfg.out_dir."""
    mesh_lib.initialize_distributed()
    run_dir = Path(cfg.out_dir)
    mesh = mesh_lib.build_mesh(cfg.mesh)
    model_cfg, params = resolve_model(cfg, mesh)
    mesh_lib.check_train(cfg, model_cfg, rules_lib.mesh_sizes(mesh))
    teacher_cfg = None if cfg.distill is None else teacher_config(cfg.distill, model_cfg, rules_lib.mesh_sizes(mesh))
    tok = load_tokenizer(cfg.data.tokenizer)
    _check_vocab(tok, model_cfg)
    ckpt_cfg = cfg.checkpoint
    if not ckpt_cfg.directory:
        ckpt_cfg = dataclasses.replace(ckpt_cfg, directory=str(run_dir / "checkpoints"))
    run_dir.mkdir(parents=True, exist_ok=True)
    manager = CheckpointManager(ckpt_cfg, model_config=model_cfg)
    data = make_iterator(cfg.data, tok)
    tx = optimizer.build(cfg.optimizer, cfg.steps)
    opts = StepOptions(mtp_weight=cfg.mtp_loss_weight, balance_alpha=cfg.balance_loss_alpha,
                       bias_rate=cfg.router_bias_update_rate, grad_accum_steps=cfg.optimizer.grad_accum_steps,
                       distill=cfg.distill)
    shapes = batch_shapes(cfg.data)
    abstract, shardings = step_shardings(model_cfg, tx, cfg.seed, mesh, cfg.mesh, shapes, teacher_cfg)
    step_fn = make_train_step(model_cfg, tx, opts, shardings, teacher_cfg)
    lr_at = optimizer.schedule(cfg.optimizer, cfg.steps)
    primary = jax.process_index() == 0

    with rules_lib.sharding_context(mesh, cfg.mesh):
        # The frozen teacher: an argument of every step, never part of the state (nor the checkpoints).
        teacher = () if teacher_cfg is None else (load_teacher(cfg.distill, shardings.teacher),)
        start = manager.latest_step()
        if start is None:
            if params is None:
                params = init_params(model_cfg, jax.random.key(cfg.seed), out_shardings=shardings.state.params)
            else:  # loaded with the default rules; this run's rules may differ
                params = jax.device_put(params, shardings.state.params)
            state = jax.jit(lambda p: init_state(p, tx, cfg.seed), out_shardings=shardings.state)(params)
            start = 0
        else:
            state, data_state = manager.restore(start, abstract_state=abstract, shardings=shardings.state)
            data.set_state(data_state)
        if primary:
            _write_run_config(run_dir, cfg, model_cfg)
        writer = MetricsWriter(run_dir, resume_step=start)
        install_sigterm_handler()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_step = flops.train_flops_per_token(model_cfg, cfg.data.seq_len) * tokens_per_step
        if teacher_cfg is not None:  # its forward: a third of a training step's FLOPs
            flops_per_step += flops.train_flops_per_token(teacher_cfg, cfg.data.seq_len) / 3 * tokens_per_step
        peak = cfg.peak_flops_per_device
        if peak is None and jax.default_backend() == "cpu":
            peak = flops.measured_matmul_flops()
        bar = _progress(cfg, start)
        status, last = "completed", {}
        step, t_last, steps_since = start, time.perf_counter(), 0
        try:
            while step < cfg.steps:
                try:
                    batch = next(data)
                except StopIteration:
                    status = "data_exhausted"
                    break
                state, metrics = step_fn(state, global_batch(batch, shapes, shardings.batch), *teacher)
                step += 1
                steps_since += 1
                if not bool(metrics["finite"]):
                    raise TrainingDiverged(
                        f"step {step}: loss or gradient is not finite (loss={float(metrics['loss'])}, "
                        f"grad_norm={float(metrics['grad_norm'])}); stopped without saving, the last good "
                        f"checkpoint (step {manager.latest_step()}) is intact in {manager.directory}")
                manager.save(step, state, data.get_state())
                if step % cfg.log_every == 0 or step == cfg.steps:
                    host = to_host(metrics)
                    dt = time.perf_counter() - t_last
                    host.update(lr=float(lr_at(step - 1)), step_time=dt / steps_since,
                                tokens_per_s=tokens_per_step * steps_since / dt)
                    if peak:
                        host["mfu"] = flops_per_step * steps_since / dt / (peak * jax.device_count())
                    host.pop("finite", None)
                    periodic = cfg.eval_every and step % cfg.eval_every == 0
                    if cfg.eval_data is not None and (periodic or step == cfg.steps):
                        host.update(evaluate(state.params, model_cfg, cfg, tok, mesh))
                    writer.write(step, host)
                    last = host
                    t_last, steps_since = time.perf_counter(), 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if preemption_requested() or manager.reached_preemption(step):
                    manager.save(step, state, data.get_state(), force=True)
                    status = "preempted"
                    break
            if status != "preempted":
                manager.save(step, state, data.get_state(), force=True)
        finally:
            close_run(manager, writer, bar)
    return finish_run(run_dir, status, step, last, primary)
