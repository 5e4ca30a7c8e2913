"""Bring your own model and tokenizer: SFT of a tiny Qwen2 student (transformers' Qwen2ForCausalLM,
random weights) from its Hugging Face directory with its own ChatML tokenizer and template, through
`r1jax train`; the `orbax-to-hf` export of the run's checkpoint loads in transformers with
AutoTokenizer and AutoModelForCausalLM, renders the ids r1jax trained on, and gives r1jax's logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from chatml_fixtures import CHATML, write_chatml_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "The answer is 5."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "And 1+1?"},
                  {"role": "assistant", "content": "Let me think. 2."}]},
    {"prompt": [{"role": "user", "content": "Who are you?"}], "completion": "You are a helpful assistant."},
]
VOCAB = 320


def _qwen2_dir(path, vocab_size=VOCAB):
    """A tiny fp32 Qwen2 (GQA, q/k/v biases) saved by transformers, with the ChatML tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok_dir = write_chatml_tokenizer(path, CHATML)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] if t["id"] < vocab_size else 0 for t in vocab}  # a too small model: any id
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]  # as Qwen2.5-Instruct's
    model.save_pretrained(path)
    return path


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "r1jax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _sft_config(tmp_path, init_from, name):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = {"stage": "sft", "init_from": str(init_from), "out_dir": str(tmp_path / name), "steps": 3,
           "log_every": 1, "progress": False,
           "data": {"kind": "sft", "sources": [str(data)], "seq_len": 64, "batch_size": 2, "num_epochs": None},
           "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0},
           "checkpoint": {"save_interval_steps": 3}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_qwen2_sft_with_its_chatml_template_exports_to_transformers(tmp_path):
    from r1jax import api
    from r1jax.data.examples import RowFormatter
    from r1jax.data.sources import Row
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.model import forward_jit

    hf_dir = _qwen2_dir(tmp_path / "qwen2")
    out = _cli("train", _sft_config(tmp_path, hf_dir, "run"))
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (run / "checkpoints" / f).is_file(), f
    export = tmp_path / "export"
    out = _cli("convert", "orbax-to-hf", run / "checkpoints", export)
    assert out.returncode == 0, out.stdout + out.stderr

    # What r1jax trained on: each row as the data pipeline formats it, with the tokenizer it took from
    # init_from (the run's own copy reads back the same).
    tok = load_tokenizer("auto", hf_dir)
    assert tok.bos_id is None and tok.eos_token == "<|im_end|>" and tok.template.source == CHATML
    assert load_tokenizer("auto", run / "checkpoints").template == tok.template
    fmt = RowFormatter("sft", tok, seq_len=64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    assert hf_tok.chat_template == CHATML and hf_tok.bos_token is None and hf_tok.eos_token == "<|im_end|>"
    original = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert (type(hf_tok), hf_tok.special_tokens_map) == (type(original), original.special_tokens_map)
    rendered = []
    for i, row in enumerate(ROWS):
        ex = fmt(Row(f"sft.jsonl:{i + 1}", json.dumps(row).encode()))
        ids = [*ex["inputs"].tolist(), int(ex["targets"][-1])]
        messages = row.get("messages") or row["prompt"] + [{"role": "assistant", "content": row["completion"]}]
        assert hf_tok.apply_chat_template(messages, return_dict=False) == ids
        learned = hf_tok.decode([t for t, m in zip(ex["targets"], ex["loss_mask"]) if m])
        assert learned == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        rendered.append(ids)
    prompt = hf_tok.apply_chat_template(ROWS[0]["messages"][:1], add_generation_prompt=True, return_dict=False)
    assert hf_tok.decode(prompt).endswith("<|im_start|>assistant\n")
    # Completions end at <|im_end|> and at <|endoftext|>, the export's generation_config says.
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]

    # The export's logits equal r1jax's on the trained checkpoint, and training moved the weights.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    before = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    cfg, params = api.load_pretrained(run / "checkpoints")
    ids = np.array(rendered[1])[None]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
        old = before(torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward_jit(params, ids, cfg), np.float32)
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want)) + 1e-5
    assert np.max(np.abs(want - old)) > 1e-2

    # `r1jax sample` on the checkpoint renders chat rows with the template's generation prompt and
    # stops where transformers' greedy generate stops (the export's eos list).
    prompts = tmp_path / "prompts.jsonl"
    chats = [ROWS[0]["messages"][:1], ROWS[1]["messages"][:4]]
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    out = _cli("sample", "--ckpt", run / "checkpoints", "--prompts", prompts, "--out", tmp_path / "s.jsonl",
               "--max-new-tokens", 12, "--temperature", 0)
    assert out.returncode == 0, out.stdout + out.stderr
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    for chat, s in zip(chats, samples):
        ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            full = model.generate(**ids, max_new_tokens=12, do_sample=False)
        assert s["completion_ids"] == full[0, ids["input_ids"].shape[1]:].tolist()


def test_tokenizer_larger_than_the_model_is_an_error_before_compiling(tmp_path):
    hf_dir = _qwen2_dir(tmp_path / "small", vocab_size=300)  # the tokenizer has 320 ids
    out = _cli("train", _sft_config(tmp_path, hf_dir, "run"))
    assert out.returncode == 2
    assert ("model.vocab_size: 300 is smaller than the tokenizer's 320 tokens (the tokenizer "
            f"{hf_dir / 'tokenizer.json'} has ids up to 319; the model {hf_dir} has 300 embedding rows)") in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
