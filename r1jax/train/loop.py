"""One training loop for pre-training and SFT (and reused by distillation): data → jitted step →
metrics, evaluation, checkpoints, SIGTERM and NaN handling, exact resume. With `distill` set, a frozen
teacher is loaded once beside the student and the step mixes KL to it with the CE (train/distill.py);
checkpoints hold the student alone.

Every run is a mesh run (one CPU device is a 1×1×1×1 mesh): the state lives in the shardings the rules
give it, each process feeds its rows of the global batch, and only process 0 writes files other than
checkpoints (which every process writes its shards of)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import api, paths
from r1jax.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
from r1jax.data.pipeline import make_iterator
from r1jax.data.tokenizer import load_tokenizer
from r1jax.errors import ConfigError
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules as rules_lib
from r1jax.train import flops, optimizer
from r1jax.train.losses import lm_loss
from r1jax.train.metrics import to_host
from r1jax.train.run import Run, RunResult, check_vocab, mesh_and_model
from r1jax.train.step import StepOptions, init_state, make_train_step, step_shardings

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def teacher_config(dcfg: DistillConfig, student: ModelConfig, sizes: dict[str, int]):
    """The distillation teacher's config, read without its weights, checked against the student (same
    vocabulary: the KL compares the distributions id by id) and the mesh."""
    path = paths.as_path(dcfg.teacher)  # local or gs://
    teacher = api.read_config(path, "distill.teacher")
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
    return api.load_pretrained(dcfg.teacher, shardings=shardings)[1]


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


def train(cfg: TrainConfig) -> RunResult:
    """Run (or resume) a training run in cfg.out_dir."""
    mesh, model_cfg, params = mesh_and_model(cfg)
    mesh_lib.check_train(cfg, model_cfg, rules_lib.mesh_sizes(mesh))
    teacher_cfg = None if cfg.distill is None else teacher_config(cfg.distill, model_cfg, rules_lib.mesh_sizes(mesh))
    tok = load_tokenizer(cfg.data.tokenizer, cfg.init_from)
    check_vocab(tok, model_cfg, cfg.init_from)
    data = make_iterator(cfg.data, tok)
    tx = optimizer.build(cfg.optimizer, cfg.steps)
    opts = StepOptions.of(cfg)
    shapes = batch_shapes(cfg.data)
    abstract, shardings = step_shardings(model_cfg, tx, cfg.seed, mesh, cfg.mesh, shapes, teacher_cfg)
    step_fn = make_train_step(model_cfg, tx, opts, shardings, teacher_cfg)
    lr_at = optimizer.schedule(cfg.optimizer, cfg.steps)

    with Run(cfg, model_cfg, data, tok) as run, rules_lib.sharding_context(mesh, cfg.mesh):
        # The frozen teacher: an argument of every step, never part of the state (nor the checkpoints).
        teacher = () if teacher_cfg is None else (load_teacher(cfg.distill, shardings.teacher),)
        state, step = run.start(params, lambda p: init_state(p, tx, cfg.seed), abstract, shardings.state)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_step = flops.train_flops_per_token(model_cfg, cfg.data.seq_len) * tokens_per_step
        if teacher_cfg is not None:  # its forward: a third of a training step's FLOPs
            flops_per_step += flops.train_flops_per_token(teacher_cfg, cfg.data.seq_len) / 3 * tokens_per_step
        peak = cfg.peak_flops_per_device
        if peak is None and jax.default_backend() == "cpu":
            peak = flops.measured_matmul_flops()
        last, t_last, steps_since = {}, time.perf_counter(), 0
        while step < cfg.steps:
            try:
                batch = next(data)
            except StopIteration:
                run.status = "data_exhausted"
                break
            state, metrics = step_fn(state, global_batch(batch, shapes, shardings.batch), *teacher)
            step += 1
            steps_since += 1
            if not bool(metrics["finite"]):
                raise run.diverged(f"step {step}: loss or gradient is not finite (loss={float(metrics['loss'])}, "
                                   f"grad_norm={float(metrics['grad_norm'])})")
            run.save(step, state)
            postfix = {}
            if run.log_due(step):
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
                run.log(step, host)
                last = host
                t_last, steps_since = time.perf_counter(), 0
                postfix = {"loss": f"{host['loss']:.4f}"}
            run.advance(**postfix)
            if run.preempted(step, state):
                break
        run.end(step, state)
    return run.result(last)
