"""Tokenizer and R1 chat format: round trips, the exact chat string, SFT loss masks, HF export."""

import json
import re

import pytest

from r1jax.data.tokenizer import (
    ASSISTANT, BOS, EOS, PAD, USER, builtin_tokenizer, encode_chat, encode_prompt, load_tokenizer, render_chat,
)
from r1jax.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+1=?"},
    {"role": "assistant", "content": "<think>\n1+1\n=2\n</think>\n\n<answer>2</answer>"},
    {"role": "user", "content": "and 2*3?"},
    {"role": "assistant", "content": "<think>\n2*3\n=6\n</think>\n\n6"},
]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def test_builtin_vocab_and_special_ids(tok):
    assert tok.vocab_size == 265 <= 512
    # docs/deepseek_v3.md §9: bos id 0, eos id 1 (ModelConfig's defaults too).
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.token_id(USER) == 3 and tok.token_id(ASSISTANT) == 4
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok.encode(tag)) == 1


@pytest.mark.parametrize("text", [
    "", "12+7*3=?", "  two  spaces\nnew\tline\r\n", "unicode: é 中文 🙂",
    f"{BOS}{USER}hi{ASSISTANT}<think>\nx\n</think>\n\n<answer>3</answer>{EOS}",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_one_token_per_byte_and_special_strings(tok):
    assert len(tok.encode("abc 12")) == 6
    assert len(tok.encode("é")) == 2  # two UTF-8 bytes
    assert tok.encode(f"{BOS}a{EOS}") == [0, tok.encode("a")[0], 1]
    # Reasoning tags survive skip_special_tokens (as in R1), role markers and bos/eos do not.
    ids = tok.encode(f"{BOS}{USER}q{ASSISTANT}<think>\nr\n</think>\n\nA{EOS}")
    assert tok.decode(ids, skip_special_tokens=True) == "q<think>\nr\n</think>\n\nA"


def test_chat_template_string_exact():
    expected = (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>1+1=?<｜Assistant｜><think>\n1+1\n=2\n</think>\n\n"
        "<answer>2</answer><｜end▁of▁sentence｜><｜User｜>and 2*3?<｜Assistant｜><think>\n2*3\n=6\n</think>\n\n6"
        "<｜end▁of▁sentence｜>"
    )
    assert render_chat(CONVERSATION) == expected


def test_generation_prompt_and_reasoning_stripped_for_inference():
    msgs = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}] + CONVERSATION[1:4]
    assert render_chat(msgs, add_generation_prompt=True, strip_reasoning=True) == (
        "<｜begin▁of▁sentence｜>A\n\nB<｜User｜>1+1=?<｜Assistant｜>\n\n<answer>2</answer><｜end▁of▁sentence｜>"
        "<｜User｜>and 2*3?<｜Assistant｜><think>\n"
    )


def test_encode_chat_mask_exactly_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"},
            {"role": "assistant", "content": "k"}]
    ids, mask = encode_chat(tok, msgs)
    e = lambda s: tok.encode(s)  # noqa: E731
    assert ids == [0, *e("S"), 3, *e("hi"), 4, *e("yo"), 1, 3, *e("?"), 4, *e("k"), 1]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    # Piecewise encoding equals encoding the rendered string.
    assert ids == tok.encode(render_chat(msgs))


def test_encode_prompt_ends_with_generation_prompt(tok):
    ids = encode_prompt(tok, [{"role": "user", "content": "2+2=?"}])
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜><｜User｜>2+2=?<｜Assistant｜><think>\n"


@pytest.mark.parametrize("bad, where", [
    ([], "messages"), ("hi", "messages"), ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"), (["x"], "messages[0]"),
])
def test_bad_messages(tok, bad, where):
    with pytest.raises(DataError, match="^" + re.escape(where)):
        encode_chat(tok, bad)


def test_save_and_load(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    for spec in (path, tmp_path / "tok"):
        t2 = load_tokenizer(spec)
        assert (t2.bos_id, t2.eos_id, t2.pad_id, t2.vocab_size) == (0, 1, 2, 265)
        assert t2.encode(render_chat(CONVERSATION)) == tok.encode(render_chat(CONVERSATION))
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == BOS and cfg["eos_token"] == EOS and cfg["pad_token"] == PAD


@pytest.mark.slow  # importing transformers takes seconds
def test_transformers_reads_the_export(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for gen in (False, True):
        text = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert text == render_chat(CONVERSATION, add_generation_prompt=gen, strip_reasoning=True)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_load_errors(tmp_path, tok):
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    # A tokenizer without the R1 bos token.
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no bos token"):
        load_tokenizer(tmp_path)
