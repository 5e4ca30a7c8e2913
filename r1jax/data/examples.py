"""Rows → token examples, one function per pipeline kind.

A training example is next-token prediction over one document, already shifted:
`inputs = ids[:-1]`, `targets = ids[1:]`, `loss_mask = mask[1:]` (the loss counts where the *target*
is a token to learn). Shifting before packing keeps every target inside its own document.

- pretrain: `[bos] + text + [eos]` (no bos for tokenizers without one), loss on every target.
- sft: `messages`, or `prompt` + `completion` as in TRL (standard or conversational), rendered by
  the tokenizer's chat template (R1's by default), loss on the assistant tokens only
  (data/chat_template.py).
- prompts: the prompt rendered up to the generation prompt, left-padded to `seq_len`, with the gold
  answer (for RL rollouts and evaluation), the prompt as given and the row's other columns (the
  reward functions' keyword arguments, as TRL's GRPOTrainer passes them).

Column names come from the DataConfig (`prompt_field`, ...; `Fields`); docs/data.md lists the formats.

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


class Fields(NamedTuple):
    """The column names a DataConfig maps (TRL's by default) and the config section they live in, so
    an error names the key to set (`prompts.prompt_field`)."""

    section: str = "data"
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    answer: str | None = "answer"

    @classmethod
    def of(cls, cfg, section: str) -> "Fields":
        return cls(section, cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field,
                   cfg.answer_field)

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"


def _field(record: Mapping, name: str, key: str | None = None):
    if name not in record or record[name] is None:
        where = "missing" if name not in record else "null"
        hint = f"; set {key} to the column that holds it" if key else ""
        raise DataError(f"{where} column {name!r} (columns: {', '.join(sorted(map(str, record))) or 'none'}){hint}")
    return record[name]


def _text(record: Mapping, name: str, key: str | None = None) -> str:
    value = _field(record, name, key)
    if not isinstance(value, str):
        raise DataError(f"column {name!r}: expected a string, got {type(value).__name__}")
    return value


def _as_messages(value, name: str) -> list:
    """A prompt given as a string is one user turn; a list is taken as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"column {name!r}: expected a string or a list of messages, got {type(value).__name__}")


def is_conversational(prompt) -> bool:
    """TRL's test (trl.data_utils.is_conversational): a list whose first item is a dict with a role."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], Mapping) and "role" in prompt[0]


def shift(ids: list[int], mask: list[int]) -> dict[str, np.ndarray]:
    """Document ids and per-token loss mask → next-token inputs/targets/loss_mask (int32)."""
    ids_arr, mask_arr = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    return {"inputs": ids_arr[:-1], "targets": ids_arr[1:], "loss_mask": mask_arr[1:]}


def pretrain_example(tok: Tokenizer, record: Mapping, fields: Fields = Fields()) -> dict[str, np.ndarray]:
    body = tok.encode(_text(record, fields.text, fields.key("text_field")))
    if not body:
        raise DataError(f"column {fields.text!r} is empty after tokenization")
    ids = ([] if tok.bos_id is None else [tok.bos_id]) + body + [tok.eos_id]
    return shift(ids, [1] * len(ids))


def sft_messages(record: Mapping, fields: Fields = Fields()) -> list:
    """`messages`, or `prompt` (string or messages) + `completion`: a string (one assistant turn) or,
    in TRL's conversational prompt-completion form, a list of assistant messages."""
    if record.get(fields.messages) is not None:
        return record[fields.messages]  # encode_chat checks its shape
    if fields.prompt not in record:
        raise DataError(f"no column {fields.messages!r} nor {fields.prompt!r} (columns: "
                        f"{', '.join(sorted(map(str, record))) or 'none'}); set {fields.key('messages_field')}, "
                        f"or {fields.key('prompt_field')} and {fields.key('completion_field')}")
    prompt = _as_messages(_field(record, fields.prompt, fields.key("prompt_field")), fields.prompt)
    completion = _field(record, fields.completion, fields.key("completion_field"))
    if isinstance(completion, list):
        return prompt + completion
    if not isinstance(completion, str):
        raise DataError(f"column {fields.completion!r}: expected a string or a list of messages, "
                        f"got {type(completion).__name__}")
    return prompt + [{"role": "assistant", "content": completion}]


def sft_example(tok: Tokenizer, record: Mapping, fields: Fields = Fields()) -> dict[str, np.ndarray]:
    messages = sft_messages(record, fields)
    ids, mask = encode_chat(tok, messages)
    turns = sum(1 for m in messages if m["role"] == "assistant")
    if turns == 0:
        raise DataError("no assistant turn: nothing to learn from this row")
    if not any(m["content"] for m in messages if m["role"] == "assistant"):
        raise DataError("the assistant content is empty after tokenization")
    return shift(ids, mask)


# What the reward call passes itself (rl/rewards.py); a dataset column of one of these names would
# be shadowed, so it is refused. TRL's GRPOTrainer leaves the columns `prompt`, `completion` and
# `completion_ids` out of the keywords; so do we (and the column `prompt_field` names).
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "completion_lengths", "truncated", "prompt_texts",
                    "trainer_state", "log_extra", "log_metric")
_DROPPED_COLUMNS = ("prompt", "completion", "completion_ids")


def reward_columns(record: Mapping, fields: Fields, answer: str) -> dict:
    """The row's columns as reward keywords (TRL passes every dataset column), with the gold answer
    also under `answer` when `answer_field` names another column."""
    for name in RESERVED_COLUMNS:
        if name in record:
            raise DataError(f"column {name!r} has the name of a reward argument; rename it")
    if fields.answer not in (None, "answer") and "answer" in record:
        raise DataError(f"column 'answer' and {fields.key('answer_field')}={fields.answer!r}: the gold answer is "
                        "passed to rewards as `answer`; rename one of them")
    columns = {k: v for k, v in record.items() if k not in _DROPPED_COLUMNS and k != fields.prompt}
    if fields.answer is not None:
        columns["answer"] = answer
    return columns


def _answer(record: Mapping, fields: Fields) -> str:
    if fields.answer is None:
        return ""
    answer = _field(record, fields.answer, fields.key("answer_field") + " (null if the data has no gold answer)")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"column {fields.answer!r}: expected a string or a number, got {type(answer).__name__}")
    return str(answer)


def _object(value) -> np.ndarray:
    """A 0-d object array: grain batches it into a [rows] object array, whatever the value is."""
    out = np.empty((), object)
    out[()] = value
    return out


def prompt_example(tok: Tokenizer, record: Mapping, seq_len: int, fields: Fields = Fields()) -> dict[str, np.ndarray]:
    """Prompt ids left-padded to `seq_len` (generation starts at the same column for every row), the
    gold answer, and for the rewards the prompt as the data gives it (string or messages) and the
    row's other columns."""
    raw = _field(record, fields.prompt, fields.key("prompt_field"))
    messages = _as_messages(raw, fields.prompt)
    ids = encode_prompt(tok, messages)
    if len(ids) > seq_len:
        raise DataError(f"prompt is {len(ids)} tokens, longer than {fields.key('seq_len')}={seq_len}")
    answer = _answer(record, fields)
    tokens = np.full(seq_len, tok.pad_id, np.int32)
    tokens[seq_len - len(ids):] = ids
    mask = np.zeros(seq_len, np.int32)
    mask[seq_len - len(ids):] = 1
    return {"tokens": tokens, "prompt_mask": mask, "answer": np.str_(answer),
            "prompt": np.str_(tok.decode(ids)),
            # The prompt's chat turns as JSON, for writing new chat datasets (rejection sampling).
            "messages": np.str_(json.dumps(list(messages))),
            "raw_prompt": _object(raw), "columns": _object(reward_columns(record, fields, answer))}


class RowFormatter:
    """The per-row grain map: Row → example dict, or BadRow. Picklable (tokenizer included)."""

    def __init__(self, kind: str, tok: Tokenizer, *, seq_len: int, fields: Fields = Fields()):
        if kind not in FORMATS:
            raise DataError(f"kind: expected one of {sorted(FORMATS)}, got {kind!r}")
        self.kind, self.tok, self.seq_len, self.fields = kind, tok, seq_len, fields

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
    "pretrain": lambda f, r: pretrain_example(f.tok, r, f.fields),
    "sft": lambda f, r: sft_example(f.tok, r, f.fields),
    "prompts": lambda f, r: prompt_example(f.tok, r, f.seq_len, f.fields),
}
