"""Rejection sampling resumes after a kill: finished batches are kept, the rest sampled again, and
the dataset equals an uninterrupted run's."""

import json

import jax
import pytest

from r1jax import config
from r1jax.config import RejectionConfig
from r1jax.data.tokenizer import load_tokenizer
from r1jax.demo import tiny_config
from r1jax.model.params import init_params
from r1jax.infer import sampler
from r1jax.rl import rejection


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return init_params(cfg, jax.random.key(0)), cfg  # the order rejection_sample takes


def rcfg():
    return config.from_dict(RejectionConfig, dict(
        num_samples=2, temperature=1.0, max_new_tokens=6, max_prompts=12, require_format=False,
        prompts=dict(kind="prompts", sources=["task:train"], seq_len=32, batch_size=4, shuffle=False)))


def test_killed_rejection_run_resumes_to_the_uninterrupted_result(tmp_path, model, monkeypatch):
    # A random model is never correct: keep completions by a fixed property instead, so rows get written.
    monkeypatch.setattr(rejection, "_keep", lambda prompt, text, *a: None if len(text) % 2 else "incorrect")
    tok = load_tokenizer("builtin")
    ref = rejection.rejection_sample(*model, rcfg(), tok, tmp_path / "ref" / "data.jsonl")
    assert ref["prompts"] == 12 and 0 < ref["kept"] < 24

    real, calls = sampler.sample, []

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*a, **k)

    out = tmp_path / "run" / "data.jsonl"
    monkeypatch.setattr(sampler, "sample", dies_on_third_batch)
    with pytest.raises(Killed):
        rejection.rejection_sample(*model, rcfg(), tok, out)
    assert not out.exists()  # the dataset appears only when complete
    progress = json.loads(out.with_name("data.jsonl.progress.json").read_text())
    assert progress["stats"]["prompts"] == 8
    with open(out.with_name("data.jsonl.tmp"), "a") as f:  # half a batch written when the kill came
        f.write('{"partial": ')
    calls.clear()
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = rejection.rejection_sample(*model, rcfg(), tok, out)
    assert len(calls) == 1  # only the third batch was sampled again
    assert out.read_text() == (tmp_path / "ref" / "data.jsonl").read_text()
    assert resumed == ref
    assert not out.with_name("data.jsonl.progress.json").exists() and not out.with_name("data.jsonl.tmp").exists()
