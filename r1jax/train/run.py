"""What every training run does around its loop, shared by SFT/pre-training/distillation
(train/loop.py) and GRPO (rl/grpo_loop.py): the mesh and the model (fresh or init_from), the
vocabulary check, the run directory and its resolved config.yaml, checkpoints with exact resume,
metrics (jsonl and TensorBoard), the progress bar, SIGTERM/preemption, the NaN stop and result.json.

A loop opens its data first, then the `Run`, which closes the checkpoint manager, the metrics writer
and the bar on every path, errors included (an orbax manager left open dies noisily at interpreter
exit)::

    with Run(cfg, model_cfg, data) as run, rules_lib.sharding_context(mesh, cfg.mesh):
        state, step = run.start(params, make_state, abstract, state_shardings)
        while step < cfg.steps:
            ...one step...; step += 1
            if not finite:
                raise run.diverged(f"step {step}: ...")
            run.save(step, state)
            if run.log_due(step):
                run.log(step, metrics)
            run.advance()
            if run.preempted(step, state):
                break
        run.end(step, state)
    return run.result(last)

Only process 0 writes files other than checkpoints (which every process writes its shards of)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import yaml

from r1jax import api
from r1jax import config as config_lib
from r1jax import paths
from r1jax.checkpoint.manager import CheckpointManager, install_sigterm_handler
from r1jax.config import ModelConfig
from r1jax.errors import ConfigError, R1JaxError
from r1jax.model.params import init_params
from r1jax.parallel import mesh as mesh_lib
from r1jax.train.metrics import MetricsWriter

# What a run may change about an init_from checkpoint's model: how it computes, not what it is.
EXECUTION_FIELDS = ("dtype", "moe_dispatch", "capacity_factor", "ragged_buffer_factor", "remat_policy")


class TrainingDiverged(R1JaxError):
    """Loss or gradient became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    status: str  # "completed" | "preempted" | "data_exhausted"
    step: int
    run_dir: Path
    metrics: dict


def resolve_model(cfg, mesh=None):
    """(ModelConfig, params or None): from init_from (architecture from the checkpoint, params placed on
    `mesh` when given) or cfg.model."""
    if cfg.init_from is None:
        return cfg.model, None
    model_cfg, params = api.load_pretrained(cfg.init_from, dtype=cfg.model.param_dtype if cfg.model else None,
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


def mesh_and_model(cfg, devices=None):
    """(mesh, ModelConfig, params or None) of a run: join the job's processes, build the mesh of
    `devices` (default: all) shaped by cfg.mesh, and resolve the model on it."""
    mesh_lib.initialize_distributed()
    mesh = mesh_lib.build_mesh(cfg.mesh, devices)
    return (mesh, *resolve_model(cfg, mesh))


def check_vocab(tok, model_cfg: ModelConfig, model_name: str | None = None) -> None:
    """The model must have an embedding row for every token the tokenizer can produce. Called before
    anything compiles: an id past the embedding would otherwise be read as garbage (XLA clamps)."""
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} tokens (the tokenizer {tok.name} has ids up to {tok.vocab_size - 1}; "
                          f"the model {model_name or 'of the config'} has {model_cfg.vocab_size} embedding rows)")


def write_run_config(run_dir: Path, cfg, model_cfg: ModelConfig) -> None:
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


class Run:
    """One run in cfg.out_dir: its checkpoints of (state, data position), metrics and stop signals.

    `cfg` is a stage config (TrainConfig or GRPOConfig: out_dir, checkpoint, seed, steps, log_every,
    progress, stage); `data` the already opened iterator whose position is checkpointed with the state;
    `tokenizer` (data/tokenizer.Tokenizer) is written beside the checkpoints' config.yaml, so that a
    checkpoint, and every export of it, carries the tokenizer and chat template it was trained with."""

    def __init__(self, cfg, model_cfg: ModelConfig, data, tokenizer=None):
        self.cfg, self.model_cfg, self.data = cfg, model_cfg, data
        self.dir = paths.as_path(cfg.out_dir)  # local, or gs:// (r1jax/paths.py)
        self.primary = jax.process_index() == 0
        self.status = "completed"  # a loop sets "data_exhausted" when its data runs out
        self.step = 0
        self.writer = self.bar = None
        ckpt_cfg = cfg.checkpoint
        if not ckpt_cfg.directory:
            ckpt_cfg = dataclasses.replace(ckpt_cfg, directory=str(self.dir / "checkpoints"))
        paths.makedirs(self.dir)
        self.manager = CheckpointManager(ckpt_cfg, model_config=model_cfg)
        self._closing = contextlib.ExitStack()
        self._closing.callback(self.manager.close)
        if tokenizer is not None and self.primary:
            tokenizer.save(self.manager.directory)
        self._closing.callback(self.manager.wait)  # first: the last checkpoint commits (or raises)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self._closing.close()  # every callback runs, also when one of them raises

    def start(self, params, make_state, abstract, shardings):
        """(state, first step): the newest intact checkpoint's state and data position (a newer one that
        does not read back is logged and moved aside: CheckpointManager.resume), or else a fresh state
        `make_state(params)` (jitted into `shardings`) from `params` (None: initialized from cfg.seed).
        Then the run's config, metrics writer, SIGTERM handler and progress bar."""
        resumed = self.manager.resume(abstract_state=abstract, shardings=shardings)
        if resumed is None:
            if params is None:
                params = init_params(self.model_cfg, jax.random.key(self.cfg.seed), out_shardings=shardings.params)
            else:  # loaded with the default rules; this run's rules may differ
                params = jax.device_put(params, shardings.params)
            state = jax.jit(make_state, out_shardings=shardings)(params)
            start = 0
        else:
            start, state, data_state = resumed
            self.data.set_state(data_state)
        if self.primary:
            write_run_config(self.dir, self.cfg, self.model_cfg)
        self.writer = MetricsWriter(self.dir, resume_step=start)
        self._closing.callback(self.writer.close)
        install_sigterm_handler()
        if self.cfg.progress and self.primary:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.steps, initial=start, desc=self.cfg.stage, dynamic_ncols=True)
            self._closing.callback(self.bar.close)
        self.step = start
        return state, start

    def save(self, step: int, state) -> None:
        """Checkpoint (state, data position) when the save interval (or a preemption) says so."""
        self.manager.save(step, state, self.data.get_state())

    def log_due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def log(self, step: int, metrics: dict) -> None:
        self.writer.write(step, metrics)

    def advance(self, **postfix) -> None:
        """One step done: move the progress bar (showing `postfix`, when given)."""
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix(refresh=False, **postfix)
        self.bar.update(1)

    def diverged(self, what: str) -> TrainingDiverged:
        """The error to raise when a step's loss is not finite: nothing more is saved."""
        return TrainingDiverged(f"{what}; stopped without saving, the last good checkpoint "
                                f"(step {self.manager.latest_step()}) is intact in {self.manager.directory}")

    def preempted(self, step: int, state) -> bool:
        """SIGTERM here, or JAX's preemption service agreeing on this step: save now, whatever the step,
        and stop (True)."""
        if not self.manager.reached_preemption(step):
            return False
        self.manager.save(step, state, self.data.get_state(), force=True)
        self.status = "preempted"
        return True

    def end(self, step: int, state) -> None:
        """After the last step: save it (a preempted run already did)."""
        self.step = step
        if self.status != "preempted":
            self.manager.save(step, state, self.data.get_state(), force=True)

    def result(self, metrics: dict) -> RunResult:
        """After the run closed: write result.json (process 0) and return the run's outcome."""
        if self.primary:
            (self.dir / "result.json").write_text(json.dumps({"status": self.status, "step": self.step,
                                                              "metrics": metrics}, indent=1))
        return RunResult(self.status, self.step, self.dir, metrics)
