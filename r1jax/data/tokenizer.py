"""Tokenizer (HF `tokenizers`) and the DeepSeek-R1 chat format.

The R1 chat format (docs/deepseek_v3.md §9, and the `chat_template` of DeepSeek-R1's
tokenizer_config.json):

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...

System messages are joined with a blank line and come right after bos. The generation prompt is
`<｜Assistant｜><think>\\n`: R1 is made to open its reasoning, then writes
`…\\n</think>\\n\\n{answer}`. For inference R1's template keeps only the text after the last
`</think>` of earlier assistant turns (`strip_reasoning=True`); training keeps the reasoning, since it
is what the model learns.

The built-in tokenizer is byte-level BPE without merges: every byte is one token, so any text
round-trips, and the vocabulary is 9 special tokens + 256 bytes = 265, small enough for tiny models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from r1jax.errors import DataError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
GENERATION_PROMPT = ASSISTANT + THINK_OPEN + "\n"

# In R1's tokenizer the reasoning tags are ordinary added tokens (kept when decoding with
# skip_special_tokens); bos/eos/pad and the role markers are special.
_SPECIAL = (BOS, EOS, PAD, USER, ASSISTANT)
_PLAIN = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
ROLES = ("system", "user", "assistant")

# The same format as a Jinja chat template (written to tokenizer_config.json so transformers'
# `apply_chat_template` renders exactly what `render_chat(..., strip_reasoning=True)` does).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system='', first=true) %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- if ns.first %}{% set ns.system = m['content'] %}{% set ns.first = false %}"
    "{%- else %}{% set ns.system = ns.system + '\\n\\n' + m['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{%- endif %}"
    "{%- if m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


class Tokenizer:
    """A HF `tokenizers.Tokenizer` with the R1 special-token ids. Picklable (grain workers)."""

    def __init__(self, hf: tokenizers.Tokenizer, *, bos: str = BOS, eos: str = EOS, pad: str | None = None,
                 name: str = "tokenizer"):
        self.hf = hf
        self.name = name
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = self._require(bos, "bos")
        self.eos_id = self._require(eos, "eos")
        # R1 pads with eos; a dedicated pad token is used when the vocabulary has one.
        self.pad_token = pad if pad is not None else (PAD if hf.token_to_id(PAD) is not None else eos)
        self.pad_id = self._require(self.pad_token, "pad")

    def _require(self, token: str, what: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise DataError(f"{self.name}: no {what} token {token!r} in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one vocabulary token (e.g. `<｜User｜>`); DataError if it is not there."""
        return self._require(token, "required")

    def encode(self, text: str) -> list[int]:
        """Text → ids. Adds no bos/eos; special-token strings inside `text` become their ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json and an HF tokenizer_config.json (with the R1 chat template)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return d / "tokenizer.json"


def completion_texts(tok: Tokenizer, tokens, lengths, finished) -> list[str]:
    """Sampled completions [N, M] -> their texts: each row cut at its length, and the eos that ended a
    finished row dropped (the text is what the model wrote, not the stop token)."""
    texts = []
    for row, n, done in zip(tokens, lengths, finished):
        ids = row[: int(n)].tolist()
        if done and ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        texts.append(tok.decode(ids))
    return texts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, the alphabet of tokenizers' ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def builtin_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: ids 0..8 the special/tag tokens (bos 0, eos 1, pad 2), then 256 bytes."""
    byte_chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(_SPECIAL + _PLAIN)}
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in _PLAIN])
    return Tokenizer(hf, name="builtin")


def load_tokenizer(spec: str | os.PathLike = "builtin") -> Tokenizer:
    """"builtin", a tokenizer.json, or a directory with tokenizer.json (+ tokenizer_config.json)."""
    if str(spec) == "builtin":
        return builtin_tokenizer()
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{spec}: no tokenizer.json there")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on malformed files
        raise DataError(f"{file}: not a valid tokenizer.json: {e}") from None
    names = _special_names(file.parent / "tokenizer_config.json")
    return Tokenizer(hf, bos=names.get("bos_token", BOS), eos=names.get("eos_token", EOS),
                     pad=names.get("pad_token"), name=str(file))


def _special_names(config_path: Path) -> dict[str, str]:
    """bos/eos/pad token strings from an HF tokenizer_config.json (plain or AddedToken dicts)."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{config_path}: not valid JSON: {e}") from None
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        v = config.get(key)
        v = v.get("content") if isinstance(v, Mapping) else v
        if isinstance(v, str):
            out[key] = v
    return out


# --------------------------------------------------------------------------- chat format


def check_messages(messages) -> list[Mapping]:
    """Messages must be a list of {role: system|user|assistant, content: str}; DataError otherwise."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise DataError(f"messages: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"messages[{i}]: expected an object with role and content")
        if m.get("role") not in ROLES:
            raise DataError(f"messages[{i}].role: expected one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"messages[{i}].content: expected a string, got {type(m.get('content')).__name__}")
    return list(messages)


def drop_reasoning(content: str) -> str:
    """What R1's template keeps of an earlier assistant turn: the text after the last `</think>`."""
    return content.split(THINK_CLOSE)[-1]


def _system_text(messages) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] == "system")


def render_chat(messages, *, add_generation_prompt: bool = False, strip_reasoning: bool = False) -> str:
    """Messages → the R1 chat string (bos first, each assistant turn closed by eos)."""
    messages = check_messages(messages)
    out = [BOS, _system_text(messages)]
    for m in messages:
        if m["role"] == "user":
            out += [USER, m["content"]]
        elif m["role"] == "assistant":
            content = drop_reasoning(m["content"]) if strip_reasoning else m["content"]
            out += [ASSISTANT, content, EOS]
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def encode_chat(tok: Tokenizer, messages) -> tuple[list[int], list[int]]:
    """Messages → (ids, loss_mask): mask 1 exactly on assistant content tokens and their closing eos.

    Encoded piece by piece; every boundary is a special token, which the tokenizer splits on anyway,
    so the ids equal `tok.encode(render_chat(messages))`.
    """
    messages = check_messages(messages)
    user, assistant = tok.token_id(USER), tok.token_id(ASSISTANT)
    ids, mask = [tok.bos_id], [0]

    def add(piece: list[int], m: int):
        ids.extend(piece)
        mask.extend([m] * len(piece))

    add(tok.encode(_system_text(messages)), 0)
    for m in messages:
        if m["role"] == "user":
            add([user] + tok.encode(m["content"]), 0)
        elif m["role"] == "assistant":
            add([assistant], 0)
            add(tok.encode(m["content"]) + [tok.eos_id], 1)
    return ids, mask


def encode_prompt(tok: Tokenizer, messages) -> list[int]:
    """Prompt messages → ids ending in the generation prompt `<｜Assistant｜><think>\\n`."""
    messages = check_messages(messages)
    return tok.encode(render_chat(messages, add_generation_prompt=True, strip_reasoning=True))
