"""Training checkpoints: an orbax CheckpointManager around a TrainState.

The state is a `flax.struct` dataclass with a `params` field (the model params pytree) and any other
pytree fields (`step`, `opt_state`, `rng`, ...). Typed PRNG keys anywhere in it are stored as their raw
key data and rewrapped on restore. Layout of one run's directory::

    DIR/config.yaml                               the ModelConfig (when given): load_model(DIR) works
    DIR/<step>/params/                            state.params, same format as a model checkpoint's
    DIR/<step>/train_state/                       the rest of the state (params left out)
    DIR/<step>/data_state/process_<i>-of-<n>.json each process's data-iterator state
    DIR/<step>/_CHECKPOINT_METADATA               orbax's step metadata; `metadata=` goes in here

Guarantees:
- A step is written to `<step>.orbax-checkpoint-tmp-*` and renamed when every item is complete, so a
  killed save leaves no step behind; orbax lists only complete steps and the leftovers are removed
  when the next manager opens the directory. An existing step is never written again.
- Old steps are deleted (keep the last `max_to_keep`, plus every `keep_period`-th) only after the new
  step is complete, so the last good checkpoint survives a failed save.
- Arrays are restored straight into the shardings of `abstract_state` (or `shardings`), whatever
  mesh they were saved from.
- `resume` restores the newest step that reads back whole. A step that does not (a file missing,
  truncated or corrupt: tensorstore, orbax or JSON fail on it) is logged with its cause and moved aside
  to `<step>.damaged`, never deleted, and the next older one is tried; the run then saves that step
  number afresh. `restore` of one given step raises `DamagedCheckpointError` instead.
- A save that fails (a full disk, an I/O error) raises a CheckpointError naming the step and the cause,
  and its partial `<step>.orbax-checkpoint-tmp-*` directory is removed: the steps before it are intact
  and a new run resumes from the newest of them.

Multi-host: every process builds the manager and calls `save`, `restore`, `wait` and `close` at the
same steps. orbax coordinates them: each process writes the shards it owns, process 0 commits the
step and deletes old ones. `data_state` is per process, so a run restores its data position only with
the same number of processes.

Preemption: `install_sigterm_handler()` makes SIGTERM set a flag (`preemption_requested()`); `save`
then writes whatever the step. Under `jax.distributed`, JAX's preemption service owns SIGTERM instead
and agrees on a step with every host; orbax reads it (`reached_preemption`) and saves at that step.
Call `save` every step, then stop when `reached_preemption(step)` and `wait()` before exiting.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from r1jax import paths
from r1jax.checkpoint.orbax_io import (CONFIG_FILE, PARAMS_ITEM, check_tree, flat_leaves, quiet_unraisable,
                                       read_model_config, training_steps, write_model_config)
from r1jax.config import CheckpointConfig, ModelConfig
from r1jax.errors import CheckpointError, ConfigError, DamagedCheckpointError, describe

log = logging.getLogger(__name__)

TRAIN_STATE_ITEM = "train_state"
DATA_STATE_ITEM = "data_state"
DAMAGED_SUFFIX = ".damaged"  # <step>.damaged: a step that did not restore, set aside (orbax lists no such name)


# --------------------------------------------------------------------------- preemption

_PREEMPTED = threading.Event()


def install_sigterm_handler() -> bool:
    """Make SIGTERM set the flag read by `preemption_requested()`. Call from the main thread.

    With several processes nothing is installed (returns False): JAX's preemption service handles
    SIGTERM there and makes every host save at the same step; a per-host flag would not.
    """
    if jax.process_count() > 1:
        log.info("install_sigterm_handler: %d processes, leaving SIGTERM to JAX's preemption service",
                 jax.process_count())
        return False
    signal.signal(signal.SIGTERM, lambda signum, frame: _PREEMPTED.set())
    return True


def preemption_requested() -> bool:
    """True once SIGTERM arrived (after `install_sigterm_handler`)."""
    return _PREEMPTED.is_set()


# --------------------------------------------------------------------------- data-iterator state


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _encode_data_state(state) -> dict:
    """JSON envelope: grain iterators give bytes (DataLoader) or a dict (Dataset API)."""
    if state is None:
        return {"kind": "none"}
    if isinstance(state, (bytes, bytearray)):
        return {"kind": "bytes", "base64": base64.b64encode(bytes(state)).decode("ascii")}
    _check_json(state, "data_state")
    return {"kind": "json", "value": state}


def _decode_data_state(d: dict):
    if d["kind"] == "bytes":
        return base64.b64decode(d["base64"])
    return d.get("value")


def _check_json(value, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: must be JSON-serializable ({e})") from None


class DataStateHandler(ocp.CheckpointHandler):
    """Each process keeps its own file: every host reads a different shard of the data."""

    def save(self, directory, args: "DataStateSave"):
        (directory / _process_file()).write_text(json.dumps(args.state))

    def restore(self, directory, args: "DataStateRestore | None" = None):
        f = directory / _process_file()
        if not f.exists():
            raise CheckpointError(f"{f}: no data-iterator state for this process (was the checkpoint saved "
                                  f"with a different number of processes?)")
        return json.loads(f.read_text())

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------- typed PRNG keys


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    # Typed key arrays have no storage dtype; their uint32 key data does.
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_impl(abstract_key):
    """The PRNG implementation of a key, also of a ShapeDtypeStruct (key_impl wants a key array,
    so ask it while tracing)."""
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), abstract_key)
    return found[0]


def _data_to_keys(tree, abstract):
    return jax.tree.map(lambda x, a: jax.random.wrap_key_data(x, impl=_key_impl(a)) if _is_key(a) else x,
                        tree, abstract)


# --------------------------------------------------------------------------- restore targets


def _abstract_leaf(x, sharding=None) -> jax.ShapeDtypeStruct:
    """Restore target of one leaf: its shape, dtype and sharding (given, its own, or the first local
    device); typed keys become their raw key data."""
    if sharding is None:
        sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shape, dtype = np.shape(x), getattr(x, "dtype", None)
    if dtype is None:  # a Python scalar
        dtype = np.asarray(x).dtype
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        shape, dtype = data.shape, data.dtype
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _targets(abstract_state, shardings):
    if shardings is None:
        return jax.tree.map(_abstract_leaf, abstract_state)
    try:
        return jax.tree.map(_abstract_leaf, abstract_state, shardings)
    except ValueError as e:
        raise CheckpointError(f"shardings: does not match the structure of abstract_state ({e})") from None


def _split(state):
    """(params, the rest with params=None): params get their own item, readable by load_model."""
    if not (hasattr(state, "params") and hasattr(state, "replace")):
        raise CheckpointError(f"state: expected a flax.struct dataclass with a `params` field, got "
                              f"{type(state).__name__}")
    return state.params, state.replace(params=None)


def _architecture(cfg: ModelConfig) -> dict:
    # The fields that shape the params and their meaning; dtype, dispatch and remat may change on resume.
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.metadata.get("hf", True) and f.name != "hf_extra"}


def _on_every_process(ok: bool) -> bool:
    """`ok` on every process of the job (all of them must restore the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


# --------------------------------------------------------------------------- the manager


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    # Named items, so a fresh manager can read a step's metadata before anything was restored.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in (PARAMS_ITEM, TRAIN_STATE_ITEM):
        registry.add(item, ocp.args.StandardSave)
        registry.add(item, ocp.args.StandardRestore)
    registry.add(DATA_STATE_ITEM, DataStateSave)
    registry.add(DATA_STATE_ITEM, DataStateRestore)
    return registry


class CheckpointManager:
    """Async, keep-N training checkpoints of (state, data_state) under `config.directory`."""

    def __init__(self, config: CheckpointConfig, *, model_config: ModelConfig | None = None):
        if not config.directory:
            raise ConfigError("checkpoint.directory: must not be empty")
        self.config = config
        self.directory = paths.absolute(config.directory)  # local, or gs:// (orbax's own GCS support)
        self._writing: int | None = None  # the step of the last save started
        self._failed = False  # the last save failed: it was reported, there is nothing to wait for
        keep = [policies.LatestN(config.max_to_keep)]
        if config.keep_period is not None:
            keep.append(policies.EveryNSteps(config.keep_period))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(config.save_interval_steps), policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())
        if model_config is not None:
            try:
                self._check_model_config(model_config)
            except BaseException:
                self.close()  # the caller never gets this manager to close
                raise

    def _check_model_config(self, model_config: ModelConfig) -> None:
        f = self.directory / CONFIG_FILE
        if not f.exists():
            if jax.process_index() == 0:
                write_model_config(self.directory, model_config)
            return
        saved, now = _architecture(read_model_config(self.directory)), _architecture(model_config)
        for key in saved:
            if saved[key] != now[key]:
                raise CheckpointError(f"{f}: checkpoints here are of a different model ({key}: {saved[key]!r} "
                                      f"in the directory, {now[key]!r} in the config)")

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Steps with a complete (or, while an async save runs, committing) checkpoint, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write: on the interval, or at a preemption."""
        return preemption_requested() or self._mngr.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True when the run should save now and stop (SIGTERM here, or orbax/JAX preemption sync)."""
        return preemption_requested() or self._mngr.reached_preemption(step)

    def metadata(self, step: int) -> dict:
        """The `metadata` dict saved with `step`."""
        return dict(self._mngr.metadata(step).custom_metadata or {})

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, data_state=None, *, metadata: dict | None = None, force: bool = False) -> bool:
        """Start writing `state` (+ data_state, metadata) as `step`; returns whether a save started.

        Async by default: device arrays are copied to host before this returns, so the caller may
        donate or overwrite them; the files are written in the background (see `wait`).
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise CheckpointError(f"{self.directory}: step {step} is older than the latest checkpoint "
                                  f"(step {latest}); move the newer steps away to branch from an old one")
        if step == latest:
            return False  # already saved (typically: the step a run resumed from); never overwritten
        if not (force or self.should_save(step)):
            return False
        data = _encode_data_state(data_state)
        if metadata is not None:
            _check_json(metadata, "metadata")
        params, rest = _split(_keys_to_data(state))
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            TRAIN_STATE_ITEM: ocp.args.StandardSave(rest),
            DATA_STATE_ITEM: DataStateSave(data),
        })
        self.wait()  # orbax waits for the previous save here anyway; a failure of it is then named as its own
        try:
            # should_save was decided above (with our SIGTERM flag added), so orbax need not re-decide.
            started = self._mngr.save(step, args=args, force=True, custom_metadata=metadata)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._writing, self._failed = step, False
        return started

    def wait(self) -> None:
        """Block until the last save is committed (and old steps deleted); raise its error, if any
        (once: a failed manager has nothing more to wait for)."""
        if self._failed:
            return
        try:
            self._mngr.wait_until_finished()
            self._mngr.check_for_errors()
        except Exception as e:
            raise self._save_failed(self._writing, e) from e

    def _save_failed(self, step: int | None, e: Exception) -> CheckpointError:
        """The error of a failed save, once its partial step directory is gone (the orbax tmp name is
        ours alone: a manager that opens the directory removes such leftovers too)."""
        self._failed = True
        self._remove_partial_steps()
        kept = training_steps(self.directory)
        where = self.directory / str(step) if step is not None else self.directory
        return CheckpointError(f"{where}: saving the checkpoint failed ({describe(e)}); its partial files are "
                               f"removed and " + (f"the last complete checkpoint, step {kept[-1]}, is intact: "
                                                  f"a new run resumes from it" if kept else "no earlier step exists"))

    def _remove_partial_steps(self, settle_s: float = 0.0) -> None:
        """Remove `<step>.orbax-checkpoint-tmp*` directories. With settle_s, keep removing until none has
        reappeared for settle_s seconds (at most 10 s): tensorstore's writes of a failed save are not
        joined by orbax's close, and on 2026-12-02 one recreated the step's directory after it (a full
        disk, tests/test_faults.py)."""
        if jax.process_index() != 0:
            return
        deadline, quiet_since = time.monotonic() + 10.0, time.monotonic()
        while True:
            leftovers = list(self.directory.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"))
            for partial in leftovers:
                paths.rmtree(partial)
            now = time.monotonic()
            if leftovers:
                quiet_since = now
            if now - quiet_since >= settle_s or now > deadline:
                return
            time.sleep(0.1)

    # ------------------------------------------------------------------ restore
    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.directory}: no complete checkpoint at step {step} (have {steps})")
        return step

    def _check_step(self, step: int, targets: dict) -> None:
        """Compare every item's leaves with orbax's metadata before reading any array."""
        found = self._mngr.item_metadata(step)
        for item, target in targets.items():
            where = f"{self.directory}/{step}/{item}"
            tree = getattr(found.get(item), "tree", None)
            if tree is None:
                raise DamagedCheckpointError(f"{where}: missing or unreadable")
            check_tree(flat_leaves(target), flat_leaves(tree), where)

    def _read(self, step: int, abstract_state, shardings):
        """(state, data_state) of `step`. A file of it that is missing, truncated or corrupt (tensorstore,
        orbax and json raise all kinds of errors for those) is a DamagedCheckpointError naming the step
        and the cause; a step of another model is a CheckpointError as before."""
        params_target, rest_target = _split(_targets(abstract_state, shardings))
        damaged = None
        with quiet_unraisable():
            try:
                self._check_step(step, {PARAMS_ITEM: params_target, TRAIN_STATE_ITEM: rest_target})
                restored = self._mngr.restore(step, args=ocp.args.Composite(**{
                    PARAMS_ITEM: ocp.args.StandardRestore(params_target),
                    TRAIN_STATE_ITEM: ocp.args.StandardRestore(rest_target),
                    DATA_STATE_ITEM: DataStateRestore(),
                }))
            except CheckpointError as e:
                if not isinstance(e, DamagedCheckpointError):
                    raise
                damaged = e
            except Exception as e:
                log.debug("step %d of %s does not restore", step, self.directory, exc_info=True)
                # Raised below, outside this handler: the failed read's frames (orbax coroutines among
                # them) are then freed here, where their noise on the way out is silenced.
                damaged = DamagedCheckpointError(f"{self.directory / str(step)}: cannot be read ({describe(e)})")
            if damaged is not None:
                damaged.__traceback__ = None
                raise damaged
        state = restored[TRAIN_STATE_ITEM].replace(params=restored[PARAMS_ITEM])
        return _data_to_keys(state, abstract_state), _decode_data_state(restored[DATA_STATE_ITEM])

    def restore(self, step: int | None = None, *, abstract_state, shardings=None):
        """(state, data_state) of `step` (default: the latest complete one); DamagedCheckpointError
        when its files do not read back (`resume` falls back to an older step instead).

        `abstract_state` gives the structure, shapes, dtypes (arrays are cast) and, where its leaves
        carry one, the sharding; `shardings` (a pytree of jax.sharding.Sharding of the same structure)
        overrides it. Leaves with neither land on the first local device.
        """
        self.wait()
        return self._read(self._resolve_step(step), abstract_state, shardings)

    def resume(self, *, abstract_state, shardings=None):
        """(step, state, data_state) of the newest step that restores, or None when there is no step.

        A newer step that does not read back is logged with its path and cause and moved aside to
        `<step>.damaged` (nothing saved is deleted), so that the run saves that step number afresh.
        Every process must agree: a step one of them cannot read is rejected by all. When no step
        restores, raises naming each one's cause. Arguments as for `restore`."""
        self.wait()
        rejected = []
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self._read(step, abstract_state, shardings)
                failure = None
            except DamagedCheckpointError as e:
                failure = str(e)
            if _on_every_process(failure is None):
                break
            rejected.append((step, failure or f"{self.directory / str(step)}: another process cannot read it"))
            log.warning("checkpoint step %d rejected: %s", step, rejected[-1][1])
        else:
            if not rejected:
                return None
            raise DamagedCheckpointError(f"{self.directory}: no checkpoint can be restored; "
                                         + "; ".join(why for _, why in rejected))
        if rejected:
            aside = self._set_aside([s for s, _ in rejected])
            log.warning("resuming from step %d, the newest intact checkpoint; the rejected step(s) were moved "
                        "aside to %s", step, ", ".join(str(p) for p in aside))
        return step, state, data_state

    def _set_aside(self, steps: list[int]) -> list:
        """Rename each step directory to `<step>.damaged` (`.damaged.1`, ... when taken); orbax neither
        lists nor deletes those names, and the step number is free to be saved again."""
        moved = []
        for step in steps:
            src, dst = self.directory / str(step), self.directory / f"{step}{DAMAGED_SUFFIX}"
            n = 0
            while dst.exists():
                n += 1
                dst = self.directory / f"{step}{DAMAGED_SUFFIX}.{n}"
            if jax.process_index() == 0:
                src.rename(dst)
            moved.append(dst)
        ocp.multihost.sync_global_processes(f"r1jax_set_aside_{'_'.join(map(str, steps))}")
        self._mngr.reload()
        return moved

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Wait for the last save and the removal of killed saves' leftovers, then release orbax's threads."""
        # orbax removes the leftovers in a thread started by its constructor and waits for it only in
        # `save`: a run stopped before its first save would leave it running into interpreter shutdown
        # ("cannot schedule new futures after interpreter shutdown").
        await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        try:
            if await_cleanup is not None:
                await_cleanup()
        finally:
            try:
                self._mngr.close()
            except Exception:
                if not self._failed:
                    raise
                # orbax re-raises the failed save it was waiting for; that was reported already
                log.debug("closing %s after a failed save", self.directory, exc_info=True)
            if self._failed:  # again: writers still running at the failure may have recreated it
                self._remove_partial_steps(settle_s=1.0)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
