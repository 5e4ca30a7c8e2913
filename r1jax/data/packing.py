"""Examples → fixed-length rows `[seq_len]`: inputs, targets, segment_ids, positions, loss_mask.

`segment_ids` number the documents of a row 1, 2, … (0 is padding) and `positions` restart at 0 in
each document, so attention masks `segment_ids[q] == segment_ids[k]` and RoPE sees each document
from position 0. Targets were shifted inside each document before packing (examples.py), so no
target crosses a document boundary. Packing itself is grain's (`FirstFitPackIterDataset`,
`BestFitPackIterDataset`: online bin packing of whole examples over `batch` bins, exact
checkpointable state); `none` pads each example to its own row.

Before packing, `ExamplesIterDataset` turns the formatted stream into clean examples of at most
`seq_len` tokens: it raises or counts bad rows and splits or truncates long examples, with its
counters in the iterator state so a restored iterator reports the same totals.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import grain
import numpy as np

from r1jax.config import Packing, check_names
from r1jax.data.examples import BadRow
from r1jax.errors import DataError

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# --------------------------------------------------------------------------- long examples


def fit_example(ex: dict[str, np.ndarray], seq_len: int, overlong: str) -> tuple[list[dict], str]:
    """An example of any length → pieces of at most `seq_len` and what was done (ok/split/truncated).

    `split` cuts into consecutive seq_len pieces (each then its own segment); `truncate` keeps the
    first. Pieces with nothing to learn (all of a long SFT prompt) are dropped: a piece attends only
    to itself, so they would cost compute and teach nothing.
    """
    n = len(ex["inputs"])
    if n <= seq_len:
        return [ex], "ok"
    starts = range(0, n, seq_len) if overlong == "split" else [0]
    pieces = [{k: v[s:s + seq_len] for k, v in ex.items()} for s in starts]
    return [p for p in pieces if p["loss_mask"].any()], "split" if overlong == "split" else "truncated"


OVERLONG = ("split", "truncate")


class ExamplesIterDataset(grain.IterDataset):
    """Formatted rows → usable examples: BadRow raises DataError (`error`) or is counted (`skip`);
    with `seq_len`, long examples are split or truncated."""

    def __init__(self, parent: grain.IterDataset, *, on_bad_row: str, seq_len: int | None = None,
                 overlong: str = "split", section: str = "data"):
        super().__init__(parent)
        if on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row: expected 'error' or 'skip', got {on_bad_row!r}")
        if overlong not in OVERLONG:
            raise DataError(f"overlong: expected one of {list(OVERLONG)}, got {overlong!r}")
        self._on_bad_row, self._seq_len, self._overlong, self._section = on_bad_row, seq_len, overlong, section

    def __iter__(self) -> "ExamplesIterator":
        return ExamplesIterator(self._parent.__iter__(), self._on_bad_row, self._seq_len, self._overlong,
                                self._section)

    def __str__(self) -> str:
        return f"ExamplesIterDataset(on_bad_row={self._on_bad_row}, seq_len={self._seq_len})"


_NO_COUNTS = {"rows": 0, "skipped_rows": 0, "split_examples": 0, "truncated_examples": 0, "last_skipped": ""}


class ExamplesIterator(grain.DatasetIterator):
    """State: the parent's state just before the current row, how many of its pieces were emitted,
    and the counters as they stood before it (a restore replays that row and counts it once)."""

    def __init__(self, parent: grain.DatasetIterator, on_bad_row: str, seq_len: int | None, overlong: str,
                 section: str = "data"):
        super().__init__(parent)
        self._on_bad_row, self._seq_len, self._overlong, self._section = on_bad_row, seq_len, overlong, section
        self._row_parent_state = self._parent.get_state()
        self._pieces: list = []
        self._next_piece = 0
        self.counts = dict(_NO_COUNTS)
        self._counts_before_row = dict(_NO_COUNTS)

    def _pieces_of(self, element) -> tuple[list, str]:
        if self._seq_len is None:
            return [element], "ok"
        return fit_example(element, self._seq_len, self._overlong)

    def __next__(self):
        while self._next_piece >= len(self._pieces):
            state = self._parent.get_state()
            element = next(self._parent)
            if isinstance(element, BadRow):
                if self._on_bad_row == "error":
                    raise DataError(element.message() + f" ({self._section}.on_bad_row=skip skips such rows)")
                self.counts["skipped_rows"] += 1
                self.counts["last_skipped"] = element.message()
                continue
            self._row_parent_state = state
            self._counts_before_row = dict(self.counts)
            self._pieces, outcome = self._pieces_of(element)
            self._next_piece = 0
            self.counts["rows"] += 1
            if outcome != "ok":
                self.counts[f"{outcome}_examples"] += 1
        piece = self._pieces[self._next_piece]
        self._next_piece += 1
        return piece

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._row_parent_state, "next_piece": self._next_piece,
                "counts": dict(self._counts_before_row)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._row_parent_state = state["parent"]
        self.counts = dict(_NO_COUNTS, **state["counts"])
        self._counts_before_row = dict(self.counts)
        self._pieces, self._next_piece = [], 0
        while self._next_piece < state["next_piece"]:  # re-emit (and drop) the pieces already seen
            next(self)


# --------------------------------------------------------------------------- rows of seq_len


def pad_example(ex: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example alone in a row: segment 1, positions 0..n-1, then padding (segment 0)."""
    n = len(ex["inputs"])
    row = empty_row(seq_len, pad_id)
    row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = ex["inputs"], ex["targets"], ex["loss_mask"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    return row


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
    row["inputs"][:] = pad_id
    row["targets"][:] = pad_id
    return row


def _from_grain(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed element (`inputs_segment_ids`, `inputs_positions`, …) → our field names."""
    return {"inputs": x["inputs"], "targets": x["targets"], "segment_ids": x["inputs_segment_ids"],
            "positions": x["inputs_positions"], "loss_mask": x["loss_mask"]}


def _grain_packer(cls) -> Callable:
    def pack(ds: grain.IterDataset, *, seq_len: int, rows: int, pad_id: int) -> grain.IterDataset:
        lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
        padding = {"inputs": pad_id, "targets": pad_id, "loss_mask": 0}
        # One packing round fills `rows` bins, i.e. one batch; bins are emitted in order.
        packed = cls(ds, length_struct=lengths, num_packing_bins=rows, shuffle_bins=False,
                     padding_struct=padding)
        return packed.map(_from_grain)
    return pack


def _no_packing(ds: grain.IterDataset, *, seq_len: int, rows: int, pad_id: int) -> grain.IterDataset:
    return ds.map(functools.partial(pad_example, seq_len=seq_len, pad_id=pad_id))


PACKERS = {
    "first_fit": _grain_packer(grain.experimental.FirstFitPackIterDataset),
    "best_fit": _grain_packer(grain.experimental.BestFitPackIterDataset),
    "none": _no_packing,
}
check_names(PACKERS, Packing, "packing")


def pack(ds: grain.IterDataset, strategy: str, *, seq_len: int, rows: int, pad_id: int) -> grain.IterDataset:
    """Examples (each at most seq_len) → rows of seq_len with the FIELDS, by a named strategy."""
    if strategy not in PACKERS:
        raise DataError(f"packing: unknown strategy {strategy!r}; valid: {', '.join(sorted(PACKERS))}")
    return PACKERS[strategy](ds, seq_len=seq_len, rows=rows, pad_id=pad_id)
