"""DataConfig → a grain pipeline of numpy batches, deterministic, shardable and resumable.

    sources ─ concatenate (or mix by weights) ─ shard [i::n] ─ shuffle(seed) ─ repeat(epochs)
      ─ map(format row: parse, tokenize)          MapDataset: random access, read by threads
      ─ mp_prefetch(worker_count)                 optional worker processes
      ─ examples (bad rows, long examples)        main process: errors and counters reported here
      ─ pack (grain first/best fit) or pad ─ batch ─ fill the last batch

Everything before `examples` is a pure function of the row index, so the order depends only on the
seed, the shard and the config. Grain shuffles each epoch differently (the seed is folded with the
epoch). The iterator's `get_state()` is a small JSON-able dict; `set_state()` on a fresh iterator of
the same config resumes with exactly the batches that would have come next. The returned iterator is
a `grain.DatasetIterator`, so grain's orbax handler (`grain.checkpoint.CheckpointSave`) saves it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from r1jax.config import DataConfig, DataKind, check_names
from r1jax.data.examples import BadRow, Fields, RowFormatter
from r1jax.data.packing import ExamplesIterator, ExamplesIterDataset, empty_row, pack
from r1jax.data.sources import open_source
from r1jax.data.tokenizer import Tokenizer, load_tokenizer
from r1jax.errors import ConfigError, DataError


def resolve_shard(cfg: DataConfig, shard: grain.sharding.ShardOptions | None = None) -> grain.sharding.ShardOptions:
    """The shard this process reads: the argument, else the config's, else the JAX process's.
    Shards are always made equal (drop_remainder) so every process yields the same number of batches."""
    if shard is not None:
        return shard
    if cfg.shard_count is not None:
        return grain.sharding.ShardOptions(cfg.shard_index, cfg.shard_count, drop_remainder=True)
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def per_process_batch(cfg: DataConfig, shard: grain.sharding.ShardOptions) -> int:
    if cfg.batch_size % shard.shard_count:
        raise ConfigError(f"batch_size: {cfg.batch_size} (global) is not divisible by the "
                          f"{shard.shard_count} processes reading data")
    return cfg.batch_size // shard.shard_count


# --------------------------------------------------------------------------- rows


CHECK_ROWS = 8  # rows of each source formatted up front


def check_source(source, formatter: RowFormatter, on_bad_row: str, section: str) -> None:
    """Format the first rows of one source now, before any model compiles, so a wrong column name
    or format fails in a second, naming the file, the row and the key to set. With `skip`, only a
    source whose every checked row is bad fails (its columns are surely not what the config says)."""
    bad = []
    for i in range(min(len(source), CHECK_ROWS)):
        out = formatter(source[i])
        if isinstance(out, BadRow):
            if on_bad_row == "error":
                raise DataError(f"{out.message()} ({section}.on_bad_row=skip skips such rows)")
            bad.append(out)
        elif out is not None:
            return
    if bad:
        raise DataError(f"the first {len(bad)} rows of {source!r} are all unusable; the first: {bad[0].message()}")


def _source_dataset(spec: str, cfg: DataConfig, check) -> grain.MapDataset:
    sources = open_source(spec, fmt=cfg.format, task=cfg.task)
    for s in sources:
        if check is not None:
            check(s)
    parts = [grain.MapDataset.source(s) for s in sources]
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _shard(ds: grain.MapDataset, shard: grain.sharding.ShardOptions, what: str) -> grain.MapDataset:
    n = len(ds)
    if shard.drop_remainder:
        ds = ds[: n - n % shard.shard_count]
    ds = ds[shard.shard_index:: shard.shard_count]
    if len(ds) == 0:
        raise DataError(f"{what}: no rows for process {shard.shard_index} of {shard.shard_count} "
                        f"({n} rows in all)")
    return ds


def _epochs(ds: grain.MapDataset, cfg: DataConfig, seed: int) -> grain.MapDataset:
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    return ds if cfg.num_epochs == 1 else ds.repeat(cfg.num_epochs)


def rows_dataset(cfg: DataConfig, shard: grain.sharding.ShardOptions, check=None) -> grain.MapDataset:
    """This process's rows (`sources.Row`) in training order: sharded, shuffled, repeated, mixed.
    `check(source)` is called on each source as it is opened."""
    if not cfg.sources:
        raise ConfigError("sources: no data sources given")
    parts = [_source_dataset(spec, cfg, check) for spec in cfg.sources]
    if cfg.weights is None:
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        return _epochs(_shard(ds, shard, ", ".join(cfg.sources)), cfg, cfg.seed)
    # Mixing: each source is shuffled with its own seed; the mixture ends with its first exhausted
    # source (num_epochs: null repeats every source forever).
    parts = [_epochs(_shard(ds, shard, spec), cfg, (cfg.seed + i) % 2**32)
             for i, (spec, ds) in enumerate(zip(cfg.sources, parts))]
    return grain.MapDataset.mix(parts, weights=list(cfg.weights))


# --------------------------------------------------------------------------- batches


class BatchesIterDataset(grain.IterDataset):
    """Last stage: fills a short final batch with `fill` rows (if given) to keep shapes static."""

    def __init__(self, parent: grain.IterDataset, *, rows: int, fill: dict[str, np.ndarray] | None):
        super().__init__(parent)
        self._rows, self._fill = rows, fill

    def __iter__(self) -> "DataIterator":
        return DataIterator(self._parent.__iter__(), self._rows, self._fill)

    def __str__(self) -> str:
        return f"BatchesIterDataset(rows={self._rows})"


class DataIterator(grain.DatasetIterator):
    """Yields dicts of numpy arrays `[rows, seq_len]`; `get_state`/`set_state` resume exactly;
    `stats` counts rows read, rows skipped (with the last reason) and examples split or truncated."""

    def __init__(self, parent: grain.DatasetIterator, rows: int, fill: dict[str, np.ndarray] | None):
        super().__init__(parent)
        self._rows, self._fill = rows, fill
        self._examples = _upstream(self, ExamplesIterator)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        short = self._rows - len(next(iter(batch.values())))
        if short and self._fill is not None:
            batch = {k: np.concatenate([v, np.repeat(self._fill[k][None], short, axis=0)]) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._examples.counts)


def _upstream(it: grain.DatasetIterator, cls: type) -> Any:
    """The iterator of type `cls` among `it`'s ancestors (grain keeps them in `_parents`)."""
    todo = list(it._parents)
    while todo:
        node = todo.pop()
        if isinstance(node, cls):
            return node
        todo.extend(getattr(node, "_parents", ()))
    raise AssertionError(f"pipeline has no {cls.__name__}")


def _training_batches(ds: grain.IterDataset, cfg: DataConfig, tok: Tokenizer, rows: int,
                      section: str) -> grain.IterDataset:
    ds = ExamplesIterDataset(ds, on_bad_row=cfg.on_bad_row, seq_len=cfg.seq_len, overlong=cfg.overlong,
                             section=section)
    ds = pack(ds, cfg.packing, seq_len=cfg.seq_len, rows=rows, pad_id=tok.pad_id)
    ds = ds.batch(rows, drop_remainder=cfg.drop_remainder)
    return BatchesIterDataset(ds, rows=rows, fill=empty_row(cfg.seq_len, tok.pad_id))


def _prompt_batches(ds: grain.IterDataset, cfg: DataConfig, tok: Tokenizer, rows: int,
                    section: str) -> grain.IterDataset:
    ds = ExamplesIterDataset(ds, on_bad_row=cfg.on_bad_row, section=section)
    ds = ds.batch(rows, drop_remainder=cfg.drop_remainder)
    # A short last batch of prompts stays short: padding it would invent prompts to roll out.
    return BatchesIterDataset(ds, rows=rows, fill=None)


KINDS = {"pretrain": _training_batches, "sft": _training_batches, "prompts": _prompt_batches}
check_names(KINDS, DataKind, "kind")


def build_dataset(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                  shard: grain.sharding.ShardOptions | None = None, section: str = "data") -> grain.IterDataset:
    """The grain dataset of this process's batches (see the module docstring for the stages). The
    first rows of every source are formatted here, so bad data fails now (`check_source`); errors
    name keys under `section` (`data`, `prompts`, ...).

    pretrain / sft batches: int32 `inputs, targets, segment_ids, positions, loss_mask`
    `[batch_size / shard_count, seq_len]`. prompts batches: `tokens, prompt_mask` int32
    `[rows, seq_len]` (left-padded), `answer, prompt, id, messages` strings `[rows]`, and objects
    `[rows]`: `raw_prompt` (as the data gives it) and `columns` (the reward keywords, a dict a row).
    """
    tok = tokenizer or load_tokenizer(cfg.tokenizer)
    shard = resolve_shard(cfg, shard)
    rows = per_process_batch(cfg, shard)
    formatter = RowFormatter(cfg.kind, tok, seq_len=cfg.seq_len, fields=Fields.of(cfg, section))
    check = functools.partial(check_source, formatter=formatter, on_bad_row=cfg.on_bad_row, section=section)
    ds = rows_dataset(cfg, shard, check).map(formatter)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads))
    if cfg.worker_count:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return KINDS[cfg.kind](ds, cfg, tok, rows, section)


def _absl_flags_parsed() -> None:
    """grain ≤ 0.2.18 reads an absl flag when it starts workers, which fails in programs that never
    parse absl flags (google/grain#1355, fixed upstream in #1362). Their defaults are what we want."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                  shard: grain.sharding.ShardOptions | None = None, section: str = "data") -> DataIterator:
    """A fresh iterator over `build_dataset(cfg)`; restore a checkpoint with `.set_state(state)`."""
    return iter(build_dataset(cfg, tokenizer, shard=shard, section=section))


def make_prompt_iterator(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                         shard: grain.sharding.ShardOptions | None = None, section: str = "prompts") -> DataIterator:
    """RL prompt batches (`kind` forced to `prompts`) from a built-in task or rows with a prompt
    (string or messages, column `prompt_field`) and a gold answer (`answer_field`, or none)."""
    return make_iterator(dataclasses.replace(cfg, kind="prompts"), tokenizer, shard=shard, section=section)
