"""Packing: hand-built rows, documents never cross, packed == unpacked, SFT masks, long examples."""

import json

import grain
import numpy as np
import pytest

from r1jax.config import DataConfig
from r1jax.data.examples import shift
from r1jax.data.packing import ExamplesIterDataset, fit_example, pack, pad_example
from r1jax.data.pipeline import make_iterator
from r1jax.data.tokenizer import builtin_tokenizer
from r1jax.errors import DataError

ONE = dict(shard_index=0, shard_count=1)
PAD = 2


def packed_rows(examples, strategy, seq_len, rows):
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    ds = ExamplesIterDataset(ds, on_bad_row="error", seq_len=seq_len)
    return list(pack(ds, strategy, seq_len=seq_len, rows=rows, pad_id=PAD))


@pytest.mark.parametrize("strategy", ["first_fit", "best_fit"])
def test_pack_hand_built(strategy):
    docs = [[10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35]]
    examples = [shift(d, [1] * len(d)) for d in docs]
    row0, row1 = packed_rows(examples, strategy, seq_len=6, rows=2)
    np.testing.assert_array_equal(row0["inputs"], [10, 11, 20, 21, 22, PAD])
    np.testing.assert_array_equal(row0["targets"], [11, 12, 21, 22, 23, PAD])
    np.testing.assert_array_equal(row0["segment_ids"], [1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(row0["positions"], [0, 1, 0, 1, 2, 0])
    np.testing.assert_array_equal(row0["loss_mask"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(row1["inputs"], [30, 31, 32, 33, 34, PAD])
    np.testing.assert_array_equal(row1["targets"], [31, 32, 33, 34, 35, PAD])
    np.testing.assert_array_equal(row1["segment_ids"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(row1["positions"], [0, 1, 2, 3, 4, 0])
    for row in (row0, row1):
        assert all(v.dtype == np.int32 for v in row.values())


def test_pad_example_hand_built():
    row = pad_example(shift([5, 6, 7], [0, 1, 1]), seq_len=4, pad_id=PAD)
    assert {k: v.tolist() for k, v in row.items()} == {
        "inputs": [5, 6, PAD, PAD], "targets": [6, 7, PAD, PAD], "segment_ids": [1, 1, 0, 0],
        "positions": [0, 1, 0, 0], "loss_mask": [1, 1, 0, 0]}


def test_fit_example_split_and_truncate():
    ex = shift(list(range(12)), [0] * 5 + [1] * 7)  # 11 inputs; the first 4 targets are prompt
    pieces, how = fit_example(ex, 4, "split")
    # pieces [0:4] (targets 1..4: mask 0,0,0,0) is dropped: nothing to learn in it.
    assert how == "split" and [p["inputs"].tolist() for p in pieces] == [[4, 5, 6, 7], [8, 9, 10]]
    assert [p["loss_mask"].tolist() for p in pieces] == [[1, 1, 1, 1], [1, 1, 1]]
    pieces, how = fit_example(ex, 6, "truncate")
    assert how == "truncated" and [p["targets"].tolist() for p in pieces] == [[1, 2, 3, 4, 5, 6]]
    assert fit_example(ex, 4, "truncate") == ([], "truncated")  # only prompt left: nothing to learn
    assert fit_example(ex, 11, "split") == ([ex], "ok")


def docs_from_rows(batches):
    """Every (inputs, targets, loss_mask) segment of packed rows, as tuples."""
    out = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert np.all(np.diff(idx) == 1), "a document is contiguous"
                np.testing.assert_array_equal(b["positions"][r][idx], np.arange(len(idx)))
                out.append((tuple(b["inputs"][r][idx]), tuple(b["targets"][r][idx]), tuple(b["loss_mask"][r][idx])))
            pad = seg == 0
            assert not b["loss_mask"][r][pad].any() and not b["positions"][r][pad].any()
    return out


def write_docs(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return str(path)


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_equals_unpacked(tmp_path, packing):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdef "), size=rng.integers(1, 30))) for _ in range(60)]
    path = write_docs(tmp_path, texts)
    common = dict(sources=(path,), seq_len=32, batch_size=4, shuffle=False, drop_remainder=False, **ONE)
    packed = list(make_iterator(DataConfig(packing=packing, **common)))
    unpacked = list(make_iterator(DataConfig(packing="none", **common)))
    assert len(packed) < len(unpacked)  # packing saves rows
    assert sorted(docs_from_rows(packed)) == sorted(docs_from_rows(unpacked))
    tok = builtin_tokenizer()
    # Targets are the next tokens of the same document: inputs[1:] == targets[:-1], and each
    # document is bos + text + eos.
    want = sorted(tuple([tok.bos_id] + tok.encode(t) + [tok.eos_id]) for t in texts)
    assert sorted(inp + tgt[-1:] for inp, tgt, _ in docs_from_rows(packed)) == want


def test_sft_loss_mask_on_assistant_tokens_only(tmp_path):
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"},
                        {"role": "assistant", "content": "k"}]}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "q", "completion": "ab"}) + "\n")
    cfg = DataConfig(kind="sft", sources=(str(path),), seq_len=16, batch_size=2, packing="first_fit",
                     shuffle=False, **ONE)
    (batch,) = list(make_iterator(cfg))
    tok = builtin_tokenizer()
    e = lambda s: tok.encode(s)  # noqa: E731
    doc1 = [0, *e("S"), 3, *e("hi"), 4, *e("yo"), 1, 3, *e("?"), 4, *e("k"), 1]
    doc2 = [0, 3, *e("q"), 4, *e("ab"), 1]
    # doc1 has 13 targets and doc2 6: 19 > 16, so doc2 opens the second row.
    np.testing.assert_array_equal(batch["inputs"][0][:13], doc1[:-1])
    np.testing.assert_array_equal(batch["targets"][0][:13], doc1[1:])
    #                       S  U  h  i  A  y  o  eos U  ?  A  k  eos   (targets)
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["inputs"][1][:6], doc2[:-1])
    np.testing.assert_array_equal(batch["targets"][1][:6], doc2[1:])
    #                       U  q  A  a  b  eos
    np.testing.assert_array_equal(batch["loss_mask"][1], [0, 0, 0, 1, 1, 1] + [0] * 10)
    np.testing.assert_array_equal(batch["segment_ids"][1], [1] * 6 + [0] * 10)


def test_long_documents_split_or_truncated(tmp_path):
    path = write_docs(tmp_path, ["x" * 50, "short"])
    common = dict(sources=(path,), seq_len=16, batch_size=1, packing="none", shuffle=False, **ONE)
    it = make_iterator(DataConfig(overlong="split", **common))
    rows = list(it)
    # 52 tokens (bos + 50 + eos) → 51 targets → pieces of 16, 16, 16, 3; then "short" (6 targets).
    assert [int(b["segment_ids"].sum()) for b in rows] == [16, 16, 16, 3, 6]
    assert it.stats == {"rows": 2, "skipped_rows": 0, "split_examples": 1, "truncated_examples": 0,
                        "last_skipped": ""}
    it = make_iterator(DataConfig(overlong="truncate", **common))
    assert [int(b["segment_ids"].sum()) for b in it] == [16, 6] and it.stats["truncated_examples"] == 1


def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(DataError, match="best_fit, first_fit, none"):
        pack(grain.MapDataset.source([]).to_iter_dataset(), "greedy", seq_len=4, rows=1, pad_id=0)
