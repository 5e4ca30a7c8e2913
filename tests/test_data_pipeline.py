"""The pipeline: deterministic shuffling, exact resume from saved state, sharding, mixing, prompts,
DataConfig errors."""

import dataclasses
import json

import grain
import numpy as np
import pytest

from r1jax.config import ConfigError, DataConfig, TaskConfig, apply_overrides, from_dict
from r1jax.data.pipeline import make_iterator, make_prompt_iterator
from r1jax.data.tasks import verify
from r1jax.errors import DataError

ONE = dict(shard_index=0, shard_count=1)


def write_docs(tmp_path, n, name="docs.jsonl", bad_every=0):
    lines = []
    for i in range(n):
        bad = bad_every and i % bad_every == bad_every - 1
        lines.append("{broken" if bad else json.dumps({"text": f"document {i} " + "z" * (i % 23)}))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def doc_ids(batch):
    """The document number of each packed document (read back from the bytes of 'document N')."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        text = bytes(int(t) - 9 for t in batch["inputs"][r] if 9 <= t < 265).decode(errors="replace")
        out += [int(w) for w in text.replace("document", " ").split() if w.isdigit()]
    return out


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_shuffle_is_deterministic_by_seed_and_per_epoch(tmp_path):
    path = write_docs(tmp_path, 40)
    cfg = DataConfig(sources=(path,), seq_len=48, batch_size=1, packing="none", num_epochs=2, **ONE)
    first = list(make_iterator(cfg))
    assert same(first, list(make_iterator(cfg)))
    other = list(make_iterator(dataclasses.replace(cfg, seed=1)))
    assert not same(first, other)
    order = [doc_ids(b)[0] for b in first]
    # Each epoch is a permutation of all documents, and the two epochs differ.
    assert sorted(order[:40]) == sorted(order[40:]) == list(range(40))
    assert order[:40] != order[40:] and order[:40] != list(range(40))


@pytest.mark.parametrize("kind, packing, workers, threads", [
    ("pretrain", "first_fit", 0, 2), ("pretrain", "none", 0, 0), ("sft", "best_fit", 0, 2),
    pytest.param("pretrain", "first_fit", 1, 1, marks=pytest.mark.slow),  # starts worker processes
])
def test_resume_mid_epoch_gives_identical_batches(tmp_path, kind, packing, workers, threads):
    if kind == "pretrain":
        sources = (write_docs(tmp_path, 120, bad_every=17),)  # bad rows skipped and counted
    else:
        sources = ("task:train",)
    cfg = DataConfig(kind=kind, sources=sources, seq_len=24, batch_size=3, packing=packing, num_epochs=None,
                     on_bad_row="skip", worker_count=workers, read_threads=threads, seed=3, **ONE)
    cfg = dataclasses.replace(cfg, task=TaskConfig(num_train=50))
    it = make_iterator(cfg)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    stats = it.stats
    expected = [next(it) for _ in range(30)]  # crosses epoch boundaries (num_epochs: null)
    it.close()
    resumed = make_iterator(cfg)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(30)]
    resumed.close()
    assert same(expected, got)
    if kind == "pretrain":
        assert stats["skipped_rows"] > 0
    assert it.stats == resumed.stats


def test_shards_partition_the_data(tmp_path):
    path = write_docs(tmp_path, 41)  # 41 rows: one dropped so both processes read 20
    seen = []
    for index in range(2):
        cfg = DataConfig(sources=(path,), seq_len=48, batch_size=2, packing="none", shard_index=index, shard_count=2)
        batches = list(make_iterator(cfg))
        assert all(b["inputs"].shape == (1, 48) for b in batches)  # batch_size is global
        seen.append({d for b in batches for d in doc_ids(b)})
        assert len(batches) == 20
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40
    # Grain's ShardOptions can be passed directly (multi-host launchers compute them).
    shard = grain.sharding.ShardOptions(shard_index=1, shard_count=2, drop_remainder=True)
    cfg = DataConfig(sources=(path,), seq_len=48, batch_size=2, packing="none")
    assert {d for b in make_iterator(cfg, shard=shard) for d in doc_ids(b)} == seen[1]
    with pytest.raises(ConfigError, match="batch_size: 3"):
        make_iterator(DataConfig(sources=(path,), batch_size=3, shard_index=0, shard_count=2))
    with pytest.raises(DataError, match="no rows for process 40 of 50"):
        make_iterator(DataConfig(sources=(path,), batch_size=50, shard_index=40, shard_count=50))


def test_default_shard_is_the_jax_process(tmp_path):
    path = write_docs(tmp_path, 5)
    batches = list(make_iterator(DataConfig(sources=(path,), seq_len=48, batch_size=1, packing="none")))
    assert len(batches) == 5  # one process: everything


def test_last_partial_batch_filled_or_dropped(tmp_path):
    path = write_docs(tmp_path, 5)
    common = dict(sources=(path,), seq_len=48, batch_size=2, packing="none", shuffle=False, **ONE)
    assert len(list(make_iterator(DataConfig(**common)))) == 2
    batches = list(make_iterator(DataConfig(drop_remainder=False, **common)))
    assert len(batches) == 3 and batches[-1]["inputs"].shape == (2, 48)
    assert batches[-1]["segment_ids"][1].sum() == 0 and batches[-1]["loss_mask"][1].sum() == 0


def test_mixing_follows_weights(tmp_path):
    a = write_docs(tmp_path, 400, "a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"text": "B"}) for _ in range(400)))
    cfg = DataConfig(sources=(a, str(b)), weights=(3.0, 1.0), seq_len=48, batch_size=1, packing="none",
                     num_epochs=None, **ONE)
    it = make_iterator(cfg)
    rows = [next(it) for _ in range(400)]
    from_b = sum(bool(r["inputs"][0][1] == ord("B") + 9 and r["segment_ids"][0].sum() == 2) for r in rows)
    assert from_b == 100  # grain mixes in exact proportion


def test_prompts_from_task_and_jsonl(tmp_path):
    cfg = DataConfig(sources=("task:eval",), seq_len=20, batch_size=4, shuffle=False, **ONE)
    batch = next(make_prompt_iterator(cfg))
    assert batch["tokens"].shape == batch["prompt_mask"].shape == (4, 20) and batch["tokens"].dtype == np.int32
    for r in range(4):
        n = batch["prompt_mask"][r].sum()
        assert np.all(batch["tokens"][r][: 20 - n] == 2)  # left padding with pad
        assert batch["prompt"][r].endswith("=?<｜Assistant｜><think>\n") and batch["tokens"][r][-1] == 19
        assert verify(str(batch["answer"][r]), f"</think>\n\n<answer>{batch['answer'][r]}</answer>")
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 2+2?", "answer": 4}),
        json.dumps({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}], "answer": "y"}),
        json.dumps({"prompt": "no answer"}),
        json.dumps({"prompt": "p" * 50, "answer": "1"}),
    ]))
    cfg = DataConfig(kind="prompts", sources=(str(path),), seq_len=24, batch_size=2, shuffle=False,
                     on_bad_row="skip", **ONE)
    it = make_iterator(cfg)
    (batch,) = list(it)
    assert batch["answer"].tolist() == ["4", "y"]
    assert batch["prompt"][1] == "<｜begin▁of▁sentence｜>S<｜User｜>x<｜Assistant｜><think>\n"
    assert it.stats["skipped_rows"] == 2 and "longer than data.seq_len=24" in it.stats["last_skipped"]


def test_data_config_errors_name_the_key_path():
    cases = [
        ({"sequence_len": 8}, r"^data\.sequence_len: unknown key for DataConfig"),
        ({"seq_len": "long"}, r"^data\.seq_len: expected int, got 'long'"),
        ({"seq_len": 1}, r"^data\.seq_len: must be >= 2"),
        ({"packing": "greedy"}, r"^data\.packing: must be one of"),
        ({"on_bad_row": "ignore"}, r"^data\.on_bad_row: must be one of"),
        ({"task": {"max_operand": "9"}}, r"^data\.task\.max_operand: expected int"),
        ({"task": {"digits": 2}}, r"^data\.task\.digits: unknown key for TaskConfig"),
        ({"sources": "a.jsonl"}, r"^data\.sources: expected a list"),
        ({"sources": ["a.jsonl", 3]}, r"^data\.sources\[1\]: expected str"),
        ({"sources": ["task:test"]}, r"^data\.sources\[0\]: the built-in tasks are task:train, task:eval, task:code:train"),
        ({"sources": ["a", "b"], "weights": [1.0]}, r"^data\.weights: one weight per source"),
        ({"sources": ["a"], "weights": [0]}, r"^data\.weights\[0\]: must be positive"),
        ({"shard_index": 0}, r"^data\.shard_index: shard_index and shard_count"),
        ({"shard_index": 2, "shard_count": 2}, r"^data\.shard_index: must be in"),
        ({"num_epochs": 0}, r"^data\.num_epochs:"),
    ]
    for d, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            from_dict(DataConfig, d, "data")
    cfg = from_dict(DataConfig, apply_overrides({}, ["sources=[a.jsonl,task:train]", "weights=[1,2]",
                                                     "task.ops=+", "num_epochs=null"]))
    assert cfg.sources == ("a.jsonl", "task:train") and cfg.weights == (1.0, 2.0)
    assert cfg.task.ops == "+" and cfg.num_epochs is None
    with pytest.raises(ConfigError, match="^sources: no data sources"):
        make_iterator(DataConfig(**ONE))
