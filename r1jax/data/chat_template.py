"""Chat templates: Jinja rendered exactly as transformers' `apply_chat_template` renders them, and
the SFT loss mask of a rendered conversation (docs/chat_templates.md).

The environment is the one transformers builds for a template (a sandbox with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML and takes `ensure_ascii`/`indent`/`separators`/`sort_keys`), and the template
sees the same variables: `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's
named special tokens (`bos_token`, `eos_token`, ... where set) and any extra keyword.

`{% generation %}…{% endgeneration %}` marks text the assistant writes; rendering records the
character span of each such block, and a token is learned when its character offsets overlap a span
(transformers' `return_assistant_tokens_mask` rule). A template without the tag gets the spans of
each assistant message's content found in the rendered text, plus the end-of-turn token that
follows it (the model must learn to stop).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1jax.errors import DataError

# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Names a message's reasoning may come under; transformers fills `reasoning_content` (and `thinking`,
# for templates that read that) from the first one set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# The spans of the render in progress in this thread (grain formats rows in several threads).
_TRACKING: ContextVar = ContextVar("r1jax_generation_spans", default=None)


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders body and records its character span."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

    def _span(self, caller) -> str:
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore attributes, as transformers' sandbox does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template; a syntax error is a DataError naming the line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, dict=dict, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character spans of the {% generation %} blocks


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token variables it is rendered with. Picklable (the compiled
    template is cached per process, not stored)."""

    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, token) pairs, e.g. ("eos_token", "<|im_end|>")

    @property
    def has_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.source))

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = False, **variables) -> Rendered:
        """Messages -> text and generation spans, as `apply_chat_template(tokenize=False)` renders them
        (keys whose value is None dropped and the reasoning fields aliased first, as transformers does)."""
        messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        blocks, spans = [], []
        token = _TRACKING.set((blocks, spans))
        try:
            for block in compile_template(self.source).generate(
                    messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                    **{**dict(self.special_tokens), **variables}):
                blocks.append(block)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"chat_template: {e}") from None
        finally:
            _TRACKING.reset(token)
        return Rendered("".join(blocks), tuple(spans))


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def content_spans(template: ChatTemplate, messages: Sequence[Mapping], text: str, **variables) -> list[tuple[int, int]]:
    """Character spans of each (non-empty) assistant message's content in `text`, the rendering of
    `messages`. A message is looked for after the rendering of the messages before it (when that is a
    prefix of `text`) and after the previous match, so an earlier turn quoting it does not count."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["content"]:
            continue
        before = template.render(messages[:i], **variables).text if i else ""
        start = max(cursor, len(before) if text.startswith(before) else 0)
        at = text.find(m["content"], start)
        if at < 0:
            raise DataError(f"messages[{i}]: the chat template does not render this assistant message's content "
                            f"verbatim, so its tokens cannot be located; mark them with {{% generation %}} in the "
                            f"template")
        spans.append((at, at + len(m["content"])))
        cursor = at + len(m["content"])
    return spans


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character offsets overlap a span (spans and offsets both in order)."""
    mask, s = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[t] = 1
    return mask


def with_turn_ends(mask: list[int], ids: Sequence[int], stop_ids) -> list[int]:
    """Also learn the end-of-turn token right after each learned run (content spans hold no stop token)."""
    out = list(mask)
    for t in range(1, len(ids)):
        if mask[t - 1] and not mask[t] and ids[t] in stop_ids:
            out[t] = 1
    return out
