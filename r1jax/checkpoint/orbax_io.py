"""Model-only r1jax checkpoints: `config.yaml` (the ModelConfig) beside an orbax params tree.

Layout of a model checkpoint directory::

    DIR/config.yaml      ModelConfig as YAML (r1jax.config.to_dict)
    DIR/params/          orbax StandardCheckpointer tree, one leaf per entry of param_table(cfg)

`load_model` also reads a training checkpoint directory written by `CheckpointManager`
(`DIR/config.yaml` + `DIR/<step>/params/` + ...), taking the params of the latest complete step, or
one step of it (`DIR/<step>`), and a training run's directory (`RUN/checkpoints/` is read; `RUN`'s
own config.yaml is the run's whole config, not a model's). Any of them may be local or on gs://. A params directory whose files do not read back (missing, truncated,
corrupt) is a `DamagedCheckpointError` naming it and the cause; a reader of a model never falls back
to an older step by itself (only a training run's resume does), it names the steps there are instead.

Every leaf is checked against `param_shapes(cfg)` from orbax's metadata before any array is read, so
a checkpoint that does not fit its config fails fast with the leaf's path in the message.

Multi-host: every process calls `save_model` / `load_model` with the same arguments; orbax writes
each array shard once, process 0 writes config.yaml and publishes the directory.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml

from r1jax import paths
from r1jax.config import ModelConfig, model_from_dict, to_dict
from r1jax.errors import CheckpointError, ConfigError, DamagedCheckpointError, describe
from r1jax.model.params import param_shapes

CONFIG_FILE = "config.yaml"
RUN_CHECKPOINTS = "checkpoints"  # where a training run keeps its checkpoints: RUN/checkpoints/
PARAMS_ITEM = "params"  # the params subdirectory, in model and training checkpoints alike

_barrier_ids = itertools.count()
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- leaf names and checks


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_name(path) -> str:
    """Dotted leaf path, the same spelling orbax uses in its metadata ('moe_layers.attn.q_b')."""
    return ".".join(_key_name(k) for k in path)


def flat_leaves(tree) -> dict:
    """{dotted leaf path: leaf}; empty nodes (None, EmptyState()) have no leaves and are left out."""
    return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_tree(expected: dict, found: dict, where: str, *, check_dtype: bool = False) -> None:
    """Compare {path: array-like} maps: same leaves, same shapes (and dtypes). Raise naming the leaf."""
    missing = sorted(set(expected) - set(found))
    if missing:
        e = expected[missing[0]]
        raise CheckpointError(f"{where}: missing leaf '{missing[0]}' (expected {_fmt(e.shape)} {jnp.dtype(e.dtype)})"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected leaf '{extra[0]}' that the target does not define"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, e in expected.items():
        f = found[name]
        if tuple(f.shape) != tuple(e.shape):
            raise CheckpointError(f"{where}: leaf '{name}' has shape {_fmt(f.shape)}, expected {_fmt(e.shape)}")
        if check_dtype and jnp.dtype(f.dtype) != jnp.dtype(e.dtype):
            raise CheckpointError(f"{where}: leaf '{name}' has dtype {jnp.dtype(f.dtype)}, expected "
                                  f"{jnp.dtype(e.dtype)}")


def _metadata_leaves(handler: ocp.StandardCheckpointHandler, directory: Path) -> dict:
    """{leaf path: ArrayMetadata} of an orbax tree, read without touching the arrays."""
    try:
        tree_metadata = handler.metadata(directory)
    except Exception as e:  # FileNotFoundError, json's and tensorstore's ValueErrors, ...
        raise DamagedCheckpointError(f"{directory}: orbax metadata is missing or unreadable ({describe(e)})") from None
    return flat_leaves(tree_metadata.tree)


class _ToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        _log.debug("%s", record.getMessage())
        return False


@contextlib.contextmanager
def quiet_unraisable():
    """Within: what a failed read leaves behind to be printed as it is freed (orbax's coroutines:
    "Exception ignored in <coroutine ...>", asyncio's "Future exception was never retrieved" for the
    reads that failed beside the one that is raised) goes to the debug log, and what is freed here is
    collected before leaving."""
    hook, quiet = sys.unraisablehook, _ToDebug()
    sys.unraisablehook = lambda u: _log.debug("%s: %s", u.err_msg or "ignored", u.exc_value)
    logging.getLogger("asyncio").addFilter(quiet)
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook
        logging.getLogger("asyncio").removeFilter(quiet)


# --------------------------------------------------------------------------- config.yaml


def write_model_config(directory, config: ModelConfig) -> None:
    """Write DIR/config.yaml atomically (a reader never sees half a file; an object store writes an
    object whole)."""
    directory = paths.as_path(directory)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if paths.is_remote(directory):
        (directory / CONFIG_FILE).write_text(text)
        return
    tmp = directory / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, directory / CONFIG_FILE)


def checkpoint_root(path):
    """The checkpoint directory `path` names: itself, or RUN/checkpoints/ when `path` is a training
    run's directory (its config.yaml is the run's, beside checkpoints/)."""
    path = paths.as_path(path)
    inner = path / RUN_CHECKPOINTS
    if (inner / CONFIG_FILE).is_file() and not (path / PARAMS_ITEM).is_dir() and not _is_step_dir(path):
        return inner
    return path


def _is_step_dir(path: Path) -> bool:
    """DIR/<step> of a training checkpoint: its config.yaml is the one of DIR."""
    return path.name.isdigit() and (path / PARAMS_ITEM).is_dir() and (path.parent / CONFIG_FILE).is_file()


def config_dir(directory) -> Path:
    """The directory whose config.yaml (and tokenizer files) describe `directory`: itself, or for a
    step directory its parent."""
    directory = paths.as_path(directory)
    return directory.parent if _is_step_dir(directory) else directory


def read_model_config(directory) -> ModelConfig:
    """ModelConfig from DIR/config.yaml (of a step directory: its parent's); unknown keys and bad values
    name the file and the key."""
    directory = checkpoint_root(directory)
    f = config_dir(directory) / CONFIG_FILE
    try:
        d = yaml.safe_load(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not an r1jax checkpoint directory)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{f}: not valid YAML: {e}") from None
    try:
        return model_from_dict(d if d is not None else {})
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None


# --------------------------------------------------------------------------- where the params live


def training_steps(path: Path) -> list[int]:
    # orbax lists only finalized steps: a `<step>.orbax-checkpoint-tmp-*` left by a killed save is skipped.
    return sorted(ocp.utils.checkpoint_steps(path))


def is_model_checkpoint(path) -> bool:
    """True for an r1jax model checkpoint, a training checkpoint directory (both hold config.yaml) or
    one step of the latter, or a training run's directory holding one."""
    path = checkpoint_root(path)
    if _is_step_dir(path):
        return True
    if not (path / CONFIG_FILE).is_file():
        return False
    return (path / PARAMS_ITEM).is_dir() or bool(training_steps(path))


def _params_dir(path: Path) -> Path:
    """params/ of a model checkpoint or a step directory, or of the latest complete step of a training
    checkpoint."""
    if (path / PARAMS_ITEM).is_dir():
        return path / PARAMS_ITEM
    steps = training_steps(path)
    if not steps:
        raise CheckpointError(f"{path}: has {CONFIG_FILE} but neither {PARAMS_ITEM}/ nor a complete training step")
    return path / str(steps[-1]) / PARAMS_ITEM


def params_dir(path) -> Path:
    """The orbax params directory `load_model` reads: DIR/params/, or DIR/<latest step>/params/."""
    return _params_dir(checkpoint_root(path))


# --------------------------------------------------------------------------- load


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_target(cfg: ModelConfig, mesh, shardings):
    """param_shapes(cfg) with a sharding on every leaf, so orbax reads each shard straight into place."""
    shapes = param_shapes(cfg)
    if shardings is None and mesh is not None:
        from r1jax.model.sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
    if shardings is None:
        shardings = jax.tree.map(lambda _: _default_sharding(), shapes)
    try:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    except ValueError as e:
        raise CheckpointError(f"shardings: does not match the params tree of the config ({e})") from None


def load_model(path, *, dtype=None, mesh=None, shardings=None):
    """(ModelConfig, params) from a model checkpoint, the latest step of a training checkpoint, or one
    step of it (DIR/<step>). Files that do not read back: DamagedCheckpointError, naming the other steps.

    dtype converts every parameter but the fp32 router bias (the config's dtype and param_dtype follow,
    as for a Hugging Face load). With `mesh` (or an explicit `shardings` pytree of jax.sharding.Sharding)
    each array is restored directly into its sharding; otherwise onto the first local device.
    """
    path = paths.absolute(checkpoint_root(path))  # orbax refuses relative paths
    cfg = read_model_config(path)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = cfg.replace(dtype=name, param_dtype=name)
    params_dir = _params_dir(path)
    # Both kinds of params/ are StandardCheckpointHandler directories, so the handler reads either; a
    # Checkpointer would also look for step metadata, which a training step keeps one level up.
    handler = ocp.StandardCheckpointHandler()
    with quiet_unraisable(), contextlib.closing(handler):
        params, damaged = _read_params(handler, cfg, params_dir, _restore_target(cfg, mesh, shardings))
    if damaged is not None:  # raised out here, once the failed read's frames are freed
        raise DamagedCheckpointError(damaged + _other_steps(path, params_dir))
    return cfg, params


def _read_params(handler, cfg: ModelConfig, params_dir: Path, target):
    """(params, None), or (None, what is damaged) when a file does not read back. A tree that does not
    fit the config raises."""
    try:
        found = _metadata_leaves(handler, params_dir)
    except DamagedCheckpointError as e:
        return None, str(e)
    check_tree(flat_leaves(param_shapes(cfg)), found, str(params_dir))
    try:
        return handler.restore(params_dir, args=ocp.args.StandardRestore(target)), None
    except Exception as e:  # tensorstore's ValueErrors, orbax's bare Exceptions, json's errors, OSError
        return None, f"{params_dir}: cannot be read ({describe(e)})"


def _other_steps(path: Path, params_dir: Path) -> str:
    """Where `path` is a training checkpoint directory: the other steps it holds, and how to load one."""
    if params_dir.parent.parent != path:
        return ""
    others = [s for s in training_steps(path) if str(s) != params_dir.parent.name]
    if not others:
        return "; it holds no other step"
    return f"; it holds step(s) {', '.join(map(str, others))} too: load one as {path / str(others[-1])}"


# --------------------------------------------------------------------------- save


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(what: str) -> None:
    # Barrier names must be unique per call; every process calls in the same order.
    ocp.multihost.sync_global_processes(f"r1jax_orbax_io_{what}_{next(_barrier_ids)}")


def _publish(tmp: Path, dst: Path) -> None:
    """Move the finished tmp directory into place; an old dst is only removed once the new one is there."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def save_model(path, config: ModelConfig, params, *, overwrite: bool = False) -> Path:
    """Write config.yaml + params/ to `path`; the directory appears only once complete (on gs://,
    where nothing can be renamed: config.yaml, which makes it a checkpoint, is written last)."""
    dst = paths.absolute(path)
    where = f"{dst}: params (config param_dtype={config.param_dtype})"
    check_tree(flat_leaves(param_shapes(config)), flat_leaves(params), where, check_dtype=True)
    paths.check_destination(dst, overwrite)
    if paths.is_remote(dst):
        return _save_remote(dst, config, params)
    # The name is the same on every process, so all of them write into the one directory.
    tmp = dst.with_name(f".{dst.name}.r1jax-tmp")
    if _is_primary():
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier, killed save
        tmp.mkdir(parents=True)
    _sync("save_model_start")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_ITEM, params)
            ckptr.wait_until_finished()
        if _is_primary():
            write_model_config(tmp, config)
            _publish(tmp, dst)
    except BaseException:
        if _is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("save_model_done")
    return dst


def _save_remote(dst, config: ModelConfig, params):
    if _is_primary():
        paths.rmtree(dst)  # overwrite=True (checked): the old model goes first, nothing renames
    _sync("save_model_remote_start")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / PARAMS_ITEM, params)
        ckptr.wait_until_finished()
    if _is_primary():
        write_model_config(dst, config)
    _sync("save_model_remote_done")
    return dst
