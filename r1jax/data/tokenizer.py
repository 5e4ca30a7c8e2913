"""Tokenizer (HF `tokenizers`) with the chat template it came with, and the DeepSeek-R1 chat format,
the template of tokenizers that bring none (docs/chat_templates.md).

A tokenizer directory (a Hugging Face model's, or one r1jax wrote) gives tokenizer.json, the special
tokens of tokenizer_config.json (bos may be null, as in ChatML), its chat template (chat_template.jinja
or tokenizer_config.json's `chat_template`), and the stop ids of generation_config.json.

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
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from r1jax import paths
from r1jax.data.chat_template import (
    SPECIAL_TOKEN_NAMES, ChatTemplate, compile_template, content_spans, overlap_mask, with_turn_ends,
)
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

# The same format as a Jinja chat template: written to tokenizer_config.json, so transformers'
# `apply_chat_template` renders what r1jax renders, and the template of every tokenizer that brings
# none. Like DeepSeek-R1's own it keeps only the text after the last `</think>` of assistant turns;
# r1jax's SFT renders with `keep_reasoning=True`, since the reasoning is what the model learns. The
# `{% generation %}` block marks the tokens an assistant turn learns: its content and closing eos.
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
    "{%- if not keep_reasoning and '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{{ '<｜Assistant｜>' }}{% generation %}{{ content + eos_token }}{% endgeneration %}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
R1_TEMPLATE = ChatTemplate(CHAT_TEMPLATE, (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)))


class Tokenizer:
    """A HF `tokenizers.Tokenizer` with its special tokens, chat template and stop ids. Picklable (grain
    workers).

    `bos` may be None (ChatML tokenizers have none: nothing is put before a document or a chat but
    what the template writes). `special_tokens` are the named tokens the template sees (`bos_token`,
    `eos_token`, ...); `extra_stop_ids` end a completion besides eos (generation_config.json's
    `eos_token_id` list); `config` is the tokenizer_config.json this was read with, written back by
    `save` with the template and special tokens in force."""

    def __init__(self, hf: tokenizers.Tokenizer, *, bos: str | None = BOS, eos: str = EOS, pad: str | None = None,
                 name: str = "tokenizer", chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None, extra_stop_ids: Sequence[int] = (),
                 config: Mapping | None = None):
        self.hf = hf
        self.name = name
        # One more than the largest id the tokenizer can produce: the embedding rows a model needs.
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = None if bos is None else self._require(bos, "bos")
        self.eos_id = self._require(eos, "eos")
        # R1 pads with eos; a dedicated pad token is used when the vocabulary has one.
        self.pad_token = pad if pad is not None else (PAD if hf.token_to_id(PAD) is not None else eos)
        self.pad_id = self._require(self.pad_token, "pad")
        if special_tokens is None:
            special_tokens = {"bos_token": bos, "eos_token": eos, "pad_token": self.pad_token}
        named = {k: v for k, v in special_tokens.items() if v is not None}
        self.template = ChatTemplate(chat_template or CHAT_TEMPLATE, tuple(named.items()))
        compile_template(self.template.source)  # a broken template fails here, not in a reader thread
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *map(int, extra_stop_ids)]))
        for i in self.stop_ids:
            if not 0 <= i < self.vocab_size:
                raise DataError(f"{name}: stop token id {i} (generation_config.json eos_token_id) is not in the "
                                f"vocabulary of {self.vocab_size} tokens")
        self.config = dict(config or {})

    def _require(self, token: str, what: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise DataError(f"{self.name}: no {what} token {token!r} in the vocabulary")
        return i

    @property
    def extra_stop_ids(self) -> tuple[int, ...]:
        return self.stop_ids[1:]

    def token_id(self, token: str) -> int:
        """Id of one vocabulary token (e.g. `<｜User｜>`); DataError if it is not there."""
        return self._require(token, "required")

    def encode(self, text: str) -> list[int]:
        """Text → ids. Adds no bos/eos; special-token strings inside `text` become their ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json (special tokens and the chat template) and
        special_tokens_map.json, as transformers' AutoTokenizer reads them."""
        d = paths.as_path(directory)  # local or gs://
        paths.makedirs(d)
        (d / "tokenizer.json").write_text(self.hf.to_str(pretty=True))  # what hf.save writes
        named = dict(self.template.special_tokens)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20, **self.config,
                  "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "chat_template": self.template.source}
        for key in ("unk_token", "sep_token", "cls_token", "mask_token"):
            if key in named:
                config[key] = named[key]
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        special = {k: config[k] for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None}
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
        if self.extra_stop_ids:  # kept where load_tokenizer (and transformers' generate) read them
            generation = _read_json(d / "generation_config.json")
            (d / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": list(self.stop_ids)},
                                                                 indent=2, sort_keys=True))
        return d / "tokenizer.json"


def completion_texts(tok: Tokenizer, tokens, lengths, finished) -> list[str]:
    """Sampled completions [N, M] -> their texts: each row cut at its length, and the stop token that
    ended a finished row dropped (the text is what the model wrote, not the stop token)."""
    texts = []
    for row, n, done in zip(tokens, lengths, finished):
        ids = row[: int(n)].tolist()
        if done and ids and ids[-1] in tok.stop_ids:
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


AUTO = "auto"


def model_tokenizer_dir(init_from) -> Path | None:
    """The directory holding the tokenizer of a model given as `init_from`: a Hugging Face directory or
    r1jax model checkpoint (its own files), a run directory (its checkpoints/), a training checkpoint
    directory or one step in it (the directory the steps are in). None when it has none."""
    if init_from is None:
        return None
    p = paths.as_path(init_from)
    for d in (p, p / "checkpoints", p.parent if p.name.isdigit() else None):
        if d is not None and (d / "tokenizer.json").is_file():
            return d
    return None


def load_tokenizer(spec: str | os.PathLike = "builtin", init_from=None) -> Tokenizer:
    """"builtin", a tokenizer.json, or a directory with tokenizer.json (+ tokenizer_config.json,
    chat_template.jinja, generation_config.json). "auto": the tokenizer of the `init_from` model
    (model_tokenizer_dir) when it has one, else the built-in one."""
    if str(spec) == AUTO:
        found = model_tokenizer_dir(init_from)
        if found is None and init_from is not None:  # said, since a real model's ids would be garbage
            print(f"r1jax: {init_from} has no tokenizer.json; using the built-in tokenizer (set data.tokenizer "
                  f"to choose one)", file=sys.stderr)
        spec = "builtin" if found is None else found
    if str(spec) == "builtin":
        return builtin_tokenizer()
    path = paths.as_path(spec)  # local or gs://
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{spec}: no tokenizer.json there")
    try:
        hf = tokenizers.Tokenizer.from_str(file.read_text())
    except Exception as e:  # tokenizers raises plain Exception on malformed files
        raise DataError(f"{file}: not a valid tokenizer.json: {e}") from None
    config_path = file.parent / "tokenizer_config.json"
    config = _read_json(config_path)
    if not config_path.is_file():  # a bare tokenizer.json: the R1 special tokens
        return Tokenizer(hf, name=str(file), extra_stop_ids=_generation_eos_ids(file.parent))
    named = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_NAMES}
    if named["eos_token"] is None:
        raise DataError(f"{config_path}: no eos_token (completions could never end)")
    return Tokenizer(hf, bos=named["bos_token"], eos=named["eos_token"], pad=named["pad_token"], name=str(file),
                     chat_template=_chat_template(file.parent, config), special_tokens=named,
                     extra_stop_ids=_generation_eos_ids(file.parent),
                     config={k: v for k, v in config.items() if k != "chat_template"})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    v = v.get("content") if isinstance(v, Mapping) else v
    return v if isinstance(v, str) else None


def _chat_template(directory: Path, config: Mapping) -> str | None:
    """The default template, where transformers looks for it: chat_template.jinja, else the config's
    `chat_template` (a string, or a list of {name, template})."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    t = config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, Mapping)}
        if "default" not in named:
            raise DataError(f"{directory / 'tokenizer_config.json'}: chat_template: several templates "
                            f"({', '.join(map(str, named))}) and none named default")
        t = named["default"]
    if t is not None and not isinstance(t, str):
        raise DataError(f"{directory / 'tokenizer_config.json'}: chat_template: expected a string, "
                        f"got {type(t).__name__}")
    return t


def _generation_eos_ids(directory: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list of them: all end a completion)."""
    ids = _read_json(directory / "generation_config.json").get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids or []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{directory / 'generation_config.json'}: eos_token_id: expected an id or a list of ids, "
                        f"got {ids!r}")
    return ids


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


def render_chat(messages, *, add_generation_prompt: bool = False, strip_reasoning: bool = False) -> str:
    """Messages → the R1 chat string (bos first, each assistant turn closed by eos)."""
    return R1_TEMPLATE.render(check_messages(messages), add_generation_prompt=add_generation_prompt,
                              keep_reasoning=not strip_reasoning).text


def encode_chat(tok: Tokenizer, messages) -> tuple[list[int], list[int]]:
    """Messages → (ids, loss_mask) by the tokenizer's chat template (reasoning kept).

    The ids are `tok.encode` of the rendered text (transformers' `apply_chat_template`). The mask is 1
    on the `{% generation %}` blocks' tokens (its `return_assistant_tokens_mask`); a template without
    them learns each assistant message's content and the end-of-turn token after it."""
    messages = check_messages(messages)
    rendered = tok.template.render(messages, keep_reasoning=True)
    enc = tok.hf.encode(rendered.text, add_special_tokens=False)
    if tok.template.has_generation_tags:
        return enc.ids, overlap_mask(enc.offsets, rendered.spans)
    spans = content_spans(tok.template, messages, rendered.text, keep_reasoning=True)
    return enc.ids, with_turn_ends(overlap_mask(enc.offsets, spans), enc.ids, tok.stop_ids)


def encode_prompt(tok: Tokenizer, messages) -> list[int]:
    """Prompt messages → ids ending in the template's generation prompt (for R1 `<｜Assistant｜><think>\\n`)."""
    messages = check_messages(messages)
    return tok.encode(tok.template.render(messages, add_generation_prompt=True).text)
