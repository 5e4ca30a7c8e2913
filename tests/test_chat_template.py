"""Chat templates from the model against transformers' own `apply_chat_template`: rendered text,
ids, generation prompts and assistant masks (`return_assistant_tokens_mask`) on ChatML with and
without `{% generation %}` tags and on the R1 template; the Jinja environment (tojson,
raise_exception, loop controls, namespace, trim/lstrip); loading a model's tokenizer files; bad input."""

import json
import pickle

import numpy as np
import pytest

from chatml_fixtures import CHATML, CHATML_GENERATION, write_chatml_tokenizer
from r1jax.data import examples
from r1jax.data.tokenizer import builtin_tokenizer, encode_chat, encode_prompt, load_tokenizer
from r1jax.errors import DataError

transformers = pytest.importorskip("transformers")

SINGLE = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "The answer is 5."}]
SYSTEM = [{"role": "system", "content": "Be brief."}] + SINGLE
MULTI = SYSTEM + [{"role": "user", "content": "And 5+5? héllo  wörld 🙂"},
                  {"role": "assistant", "content": "<think>\n5+5\n</think>\n\n10, hello world."}]
# The user quotes the answer first: the mask must find the assistant's own copy, not the user's.
QUOTED = [{"role": "user", "content": "Say 'yes'."}, {"role": "assistant", "content": "yes"},
          {"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes"}]
CONVERSATIONS = {"single": SINGLE, "system": SYSTEM, "multi_turn": MULTI, "quoted": QUOTED}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {"chatml": write_chatml_tokenizer(root / "chatml", CHATML),
           "chatml_generation": write_chatml_tokenizer(root / "chatml_generation", CHATML_GENERATION)}
    builtin_tokenizer().save(root / "r1")
    out["r1"] = root / "r1"
    return out


def _reference(d, messages, **kw):
    """transformers' ids and assistant mask (its template, or the `{% generation %}` ChatML one)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    out = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True, **kw)
    return hf, list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", ["chatml", "chatml_generation", "r1"])
def test_ids_masks_and_prompts_equal_transformers(dirs, name, conversation):
    messages = CONVERSATIONS[conversation]
    tok = load_tokenizer(dirs[name])
    # r1jax's SFT keeps the reasoning (keep_reasoning=True); the R1 template reads that variable.
    hf, ids, hf_mask = _reference(dirs[name], messages, keep_reasoning=True)
    got_ids, got_mask = encode_chat(tok, messages)
    assert got_ids == ids
    if name == "chatml":  # no tags: the reference is the tagged ChatML template on the same text
        assert tok.decode(ids) == hf.apply_chat_template(messages, tokenize=False,
                                                         chat_template=CHATML_GENERATION)
        _, tagged_ids, hf_mask = _reference(dirs["chatml_generation"], messages)
        assert tagged_ids == ids
    assert got_mask == hf_mask
    assert 0 < sum(got_mask) < len(got_mask)
    # The generation prompt: everything before the last assistant turn, rendered for inference.
    prompt = messages[:-1]
    assert encode_prompt(tok, prompt) == hf.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    for gen in (False, True):
        assert tok.template.render(messages, add_generation_prompt=gen).text == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)


def test_chatml_has_no_bos_and_learns_content_and_im_end(dirs):
    tok = load_tokenizer(dirs["chatml"])
    assert tok.bos_id is None and tok.bos_token is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids, mask = encode_chat(tok, SINGLE)
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "The answer is 5.<|im_end|>"
    assert ids[0] == tok.token_id("<|im_start|>")  # no bos: the template's first token
    ex = examples.pretrain_example(tok, {"text": "hello world"})
    assert ex["inputs"][0] != tok.eos_id and tok.decode(ex["inputs"]) == "hello world"


def test_r1_template_masks_content_and_eos_and_strips_reasoning_for_inference(dirs):
    tok = load_tokenizer(dirs["r1"])
    ids, mask = encode_chat(tok, MULTI)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == ("The answer is 5.<｜end▁of▁sentence｜><think>\n5+5\n</think>\n\n10, hello world."
                       "<｜end▁of▁sentence｜>")
    hf = transformers.AutoTokenizer.from_pretrained(str(dirs["r1"]))
    text = hf.apply_chat_template(MULTI, tokenize=False)  # DeepSeek-R1's behaviour: reasoning dropped
    assert "<think>" not in text and text == tok.template.render(MULTI).text


ENVIRONMENT = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}\n"
    "  {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
    "  {% if loop.index > 3 %}{% break %}{% endif %}\n"
    "  {% set ns.n = ns.n + 1 %}\n"
    "{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}|{{ dict(a=m.role) | tojson(ensure_ascii=true) }}\n"
    "{% endfor %}"
    "{{ ns.n }} {{ bos_token }}{{ eos_token }}{{ strftime_now('%Y') }}"
    "{% for m in messages if m.reasoning_content %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>"
    "{% endfor %}{{ messages[-2] | tojson }}"
)


def test_jinja_environment_renders_as_transformers(tmp_path):
    d = write_chatml_tokenizer(tmp_path, ENVIRONMENT)
    tok = load_tokenizer(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    messages = MULTI + [{"role": "user", "content": "<b>&'\"中文", "name": None},
                        {"role": "assistant", "content": "ok", "reasoning": "because"}]
    text = tok.template.render(messages).text
    assert text == hf.apply_chat_template(messages, tokenize=False)
    assert '"content": "Be brief."' in text and "\\u" not in text.split("|")[0]  # no HTML or ASCII escaping
    assert "<think>because|because</think>" in text and '"中文"}' in text and '"name"' not in text
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(DataError, match="chat_template: bad role tool"):
        tok.template.render(bad)
    with pytest.raises(Exception, match="bad role tool"):
        hf.apply_chat_template(bad, tokenize=False)


def test_template_file_priority_list_form_and_stop_ids(tmp_path):
    d = write_chatml_tokenizer(tmp_path / "a", CHATML)
    (d / "chat_template.jinja").write_text(CHATML_GENERATION)  # transformers: the .jinja file wins
    assert load_tokenizer(d).template.source == CHATML_GENERATION
    assert transformers.AutoTokenizer.from_pretrained(str(d)).chat_template == CHATML_GENERATION
    d = write_chatml_tokenizer(tmp_path / "b")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML_GENERATION}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.template.source == CHATML_GENERATION
    # generation_config.json's eos list: every id ends a completion; eos first.
    endoftext, im_end = tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [endoftext, im_end]}))
    tok = load_tokenizer(d)
    assert tok.stop_ids == (im_end, endoftext) and tok.extra_stop_ids == (endoftext,)
    from r1jax.data.tokenizer import completion_texts

    rows = np.array([[5, 6, endoftext, 0], [5, 6, im_end, 0], [5, 6, 7, 8]])
    texts = completion_texts(tok, rows, [3, 3, 4], [True, True, False])
    assert texts == [tok.decode([5, 6])] * 2 + [tok.decode([5, 6, 7, 8])]
    # Saved and read back: the same template, special tokens and stop ids.
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert (again.template, again.stop_ids, again.bos_id) == (tok.template, tok.stop_ids, None)


def test_tokenizer_pickles_with_its_template(dirs):
    tok = load_tokenizer(dirs["chatml_generation"])
    again = pickle.loads(pickle.dumps(tok))
    assert encode_chat(again, MULTI) == encode_chat(tok, MULTI)


def _edit_config(d, **changes):
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **changes}))


def test_bad_templates_and_configs_name_the_cause(tmp_path):
    d = write_chatml_tokenizer(tmp_path / "syntax", "{% for m in messages %}{{ m.content }")
    with pytest.raises(DataError, match=r"chat_template: not a valid Jinja template \(line 1"):
        load_tokenizer(d)
    d = write_chatml_tokenizer(tmp_path / "noeos")
    _edit_config(d, eos_token=None)
    with pytest.raises(DataError, match="tokenizer_config.json: no eos_token"):
        load_tokenizer(d)
    _edit_config(d, eos_token="<|nope|>")
    with pytest.raises(DataError, match="no eos token '<\\|nope\\|>' in the vocabulary"):
        load_tokenizer(d)
    _edit_config(d, eos_token="<|im_end|>", chat_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(DataError, match="several templates .*tool_use.* none named default"):
        load_tokenizer(d)
    _edit_config(d, chat_template=CHATML)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 100000]}))
    with pytest.raises(DataError, match="stop token id 100000 .* not in the vocabulary"):
        load_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(DataError, match="eos_token_id: expected an id or a list"):
        load_tokenizer(d)


def test_template_changing_the_content_needs_generation_tags(tmp_path):
    upper = CHATML.replace("message['content']", "message['content'] | upper")
    tok = load_tokenizer(write_chatml_tokenizer(tmp_path, upper))
    with pytest.raises(DataError, match=r"messages\[1\]: the chat template does not render .* generation"):
        encode_chat(tok, SINGLE)
    # ...and a bad SFT row says so instead of training on a wrong mask.
    bad = examples.RowFormatter("sft", tok, seq_len=64)(examples.Row("f.jsonl:1", json.dumps({"messages": SINGLE}).encode()))
    assert isinstance(bad, examples.BadRow) and "generation" in bad.reason


def test_auto_takes_the_models_tokenizer(tmp_path):
    d = write_chatml_tokenizer(tmp_path / "model")
    assert load_tokenizer("auto", d).eos_token == "<|im_end|>"
    assert load_tokenizer("auto", tmp_path / "elsewhere").eos_token == "<｜end▁of▁sentence｜>"  # built-in
    assert load_tokenizer("auto", None).vocab_size == 265
    run = tmp_path / "run" / "checkpoints"
    load_tokenizer(d).save(run)
    for spec in (tmp_path / "run", run, run / "100"):  # a run, its checkpoints, one step in them
        assert load_tokenizer("auto", spec).template.source == CHATML


def test_rl_prompts_end_in_the_templates_generation_prompt(dirs):
    tok = load_tokenizer(dirs["chatml"])
    hf = transformers.AutoTokenizer.from_pretrained(str(dirs["chatml"]))
    ex = examples.prompt_example(tok, {"prompt": SYSTEM[:2], "answer": "5"}, seq_len=64)
    want = hf.apply_chat_template(SYSTEM[:2], add_generation_prompt=True, return_dict=False)
    assert ex["tokens"][-len(want):].tolist() == want and ex["prompt_mask"].sum() == len(want)
    assert set(ex["tokens"][:-len(want)].tolist()) == {tok.token_id("<|endoftext|>")}  # left-padded with pad
    assert str(ex["prompt"]).endswith("<|im_start|>assistant\n")
