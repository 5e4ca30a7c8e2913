"""Rows → token examples, one function per pipeline kind.

A training example is next-token prediction over one document, already shifted:
`inputs = ids[:-1]`, `targets = ids[1:]`, `loss_mask = mask[1:]` (the loss counts where the *target*
is a token to learn). Shifting before packing keeps every target inside its own document.

- pretrain: `[bos] + text + [eos]` (no bos for tokenizers without one), loss on every target.
- sft: `messages`, or `prompt` + `completion` as in TRL, rendered by the tokenizer's chat template
  (R1's by default), loss on the assistant tokens only (data/chat_template.py).
- prompts: the prompt rendered up to the generation prompt, left-padded to `seq_len`, with the gold
  answer (for RL rollouts and evaluation).

A row that cannot be used becomes a `BadRow(where, reason)` instead of raising here: rows are
formatted in reader threads or worker processes, and the decision (raise `DataError` or skip and
count) is taken downstream in the main process, where it is reported the same way in every setup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from r1jax.data.sources import Row
from r1jax.data.tokenizer import Tokenizer, encode_chat, encode_prompt
from r1jax.errors import DataError


class BadRow(NamedTuple):
    where: str
    reason: str

    def message(self) -> str:
        return f"{self.where}: {self.reason}"


def decode_record(record) -> Mapping:
    """bytes (JSON text) or dict → dict; DataError says what is wrong."""
    if isinstance(record, (bytes, bytearray)):
        try:
            record = json.loads(record)
        except UnicodeDecodeError:
            raise DataError("not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _field(record: Mapping, name: str):
    if name not in record or record[name] is None:
        raise DataError(f"missing field {name!r} (fields: {', '.join(sorted(map(str, record))) or 'none'})")
    return record[name]


def _text(record: Mapping, name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str):
        raise DataError(f"field {name!r}: expected a string, got {type(value).__name__}")
    return value


def _as_messages(value, name: str) -> list:
    """A prompt given as a string is one user turn; a list is taken as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"field {name!r}: expected a string or a list of messages, got {type(value).__name__}")


def shift(ids: list[int], mask: list[int]) -> dict[str, np.ndarray]:
    """Document ids and per-token loss mask → next-token inputs/targets/loss_mask (int32)."""
    ids_arr, mask_arr = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    return {"inputs": ids_arr[:-1], "targets": ids_arr[1:], "loss_mask": mask_arr[1:]}


def pretrain_example(tok: Tokenizer, record: Mapping, text_field: str = "text") -> dict[str, np.ndarray]:
    body = tok.encode(_text(record, text_field))
    if not body:
        raise DataError(f"field {text_field!r} is empty after tokenization")
    ids = ([] if tok.bos_id is None else [tok.bos_id]) + body + [tok.eos_id]
    return shift(ids, [1] * len(ids))


def sft_messages(record: Mapping) -> list:
    """`messages`, or `prompt` (string or messages) + `completion` (string) as one assistant turn."""
    if "messages" in record:
        return _field(record, "messages")  # encode_chat checks its shape
    prompt = _as_messages(_field(record, "prompt"), "prompt")
    return prompt + [{"role": "assistant", "content": _text(record, "completion")}]


def sft_example(tok: Tokenizer, record: Mapping) -> dict[str, np.ndarray]:
    messages = sft_messages(record)
    ids, mask = encode_chat(tok, messages)
    turns = sum(1 for m in messages if m["role"] == "assistant")
    if turns == 0:
        raise DataError("no assistant turn: nothing to learn from this row")
    if not any(m["content"] for m in messages if m["role"] == "assistant"):
        raise DataError("the assistant content is empty after tokenization")
    return shift(ids, mask)


def prompt_example(tok: Tokenizer, record: Mapping, seq_len: int) -> dict[str, np.ndarray]:
    """Prompt ids left-padded to `seq_len` (generation starts at the same column for every row)."""
    messages = _as_messages(_field(record, "prompt"), "prompt")
    ids = encode_prompt(tok, messages)
    if len(ids) > seq_len:
        raise DataError(f"prompt is {len(ids)} tokens, longer than seq_len={seq_len}")
    answer = _field(record, "answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"field 'answer': expected a string or a number, got {type(answer).__name__}")
    tokens = np.full(seq_len, tok.pad_id, np.int32)
    tokens[seq_len - len(ids):] = ids
    mask = np.zeros(seq_len, np.int32)
    mask[seq_len - len(ids):] = 1
    return {"tokens": tokens, "prompt_mask": mask, "answer": np.str_(str(answer)),
            "prompt": np.str_(tok.decode(ids)),
            # The prompt's chat turns as JSON, for writing new chat datasets (rejection sampling).
            "messages": np.str_(json.dumps(list(messages)))}


class RowFormatter:
    """The per-row grain map: Row → example dict, or BadRow. Picklable (tokenizer included)."""

    def __init__(self, kind: str, tok: Tokenizer, *, seq_len: int, text_field: str = "text"):
        if kind not in FORMATS:
            raise DataError(f"kind: expected one of {sorted(FORMATS)}, got {kind!r}")
        self.kind, self.tok, self.seq_len, self.text_field = kind, tok, seq_len, text_field

    def __call__(self, row: Row):
        if isinstance(row.record, (bytes, bytearray)) and not row.record.strip():
            return None  # a whitespace-only line is no row at all; grain drops the None
        try:
            record = decode_record(row.record)
            example = FORMATS[self.kind](self, record)
        except DataError as e:
            return BadRow(row.where, str(e))
        if self.kind == "prompts":
            example["id"] = np.str_(row.where)
        return example


FORMATS = {
    "pretrain": lambda f, r: pretrain_example(f.tok, r, f.text_field),
    "sft": lambda f, r: sft_example(f.tok, r),
    "prompts": lambda f, r: prompt_example(f.tok, r, f.seq_len),
}
