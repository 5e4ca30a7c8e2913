"""Sources (jsonl, parquet, ArrayRecord, the task) and bad rows: file:line errors or skip counts."""

import json
import pickle

import pytest

from r1jax.config import DataConfig, TaskConfig
from r1jax.data.pipeline import make_iterator
from r1jax.data.sources import ArrayRecordSource, JsonlSource, ParquetSource, TaskSource, open_source
from r1jax.errors import DataError

ONE = dict(shard_index=0, shard_count=1)  # no JAX process lookup in these tests


def write_lines(path, lines, end="\n"):
    path.write_bytes(end.join(lines).encode())
    return str(path)


def test_jsonl_index_random_access_and_line_numbers(tmp_path):
    lines = ['{"text": "a"}', "", '{"text": "b"}', " ", "", '{"text": "c"}']
    for end, trailing in (("\n", ""), ("\r\n", ""), ("\r\n", "\r\n"), ("\n", "\n")):
        path = str(tmp_path / "d.jsonl")
        (tmp_path / "d.jsonl").write_bytes((end.join(lines) + trailing).encode())
        src = JsonlSource(path)
        assert len(src) == 3  # blank lines are not rows
        assert [src[i].where for i in range(3)] == [f"{path}:1", f"{path}:3", f"{path}:6"]
        assert [json.loads(src[i].record)["text"] for i in (2, 0, 1)] == ["c", "a", "b"]
    clone = pickle.loads(pickle.dumps(src))  # grain workers get a copy without the open fd
    assert clone[1] == src[1]


def test_whitespace_lines_are_not_bad_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "   \t  ", '{"text": "b"}'], end="\r\n")
    it = make_iterator(DataConfig(sources=(path,), seq_len=8, batch_size=1, packing="none", shuffle=False, **ONE))
    assert len(list(it)) == 2 and it.stats["skipped_rows"] == 0


def test_jsonl_large_file_spans_blocks(tmp_path, monkeypatch):
    import r1jax.data.sources as sources
    monkeypatch.setattr(sources, "_BLOCK", 7)  # lines straddle read blocks
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"i": i}) for i in range(100)])
    src = JsonlSource(path)
    assert [json.loads(src[i].record)["i"] for i in range(100)] == list(range(100))


def test_open_source_globs_and_errors(tmp_path):
    for i in range(3):
        write_lines(tmp_path / f"part-{i}.jsonl", ['{"text": "x"}'] * (i + 1))
    srcs = open_source(str(tmp_path / "part-*.jsonl"))
    assert [len(s) for s in srcs] == [1, 2, 3]
    with pytest.raises(DataError, match="no files match"):
        open_source(str(tmp_path / "nope-*.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        open_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"x\.txt: unknown file type"):
        open_source(str(tmp_path / "x.txt"))
    assert len(open_source(str(tmp_path / "x.txt"), fmt="jsonl")[0]) == 1
    (tmp_path / "x.jsonl.gz").write_bytes(b"")
    with pytest.raises(DataError, match="no random access"):
        open_source(str(tmp_path / "x.jsonl.gz"))


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"text": [f"doc {i}" for i in range(10)], "n": list(range(10))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)
    src = ParquetSource(str(tmp_path / "d.parquet"))
    assert len(src) == 10
    assert [src[i].record["n"] for i in (9, 0, 4, 3)] == [9, 0, 4, 3]
    assert src[4].where.endswith("d.parquet:row 4")
    assert pickle.loads(pickle.dumps(src))[7].record == {"text": "doc 7", "n": 7}
    it = make_iterator(DataConfig(sources=(str(tmp_path / "d.parquet"),), seq_len=16, batch_size=2,
                                  shuffle=False, **ONE))
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in it) >= 8


def test_arrayrecord_source(tmp_path):
    writer_module = pytest.importorskip("array_record.python.array_record_module")
    path = str(tmp_path / "d.array_record")
    w = writer_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(5):
        w.write(json.dumps({"text": f"doc {i}"}).encode())
    w.close()
    src = open_source(path)[0]
    assert isinstance(src, ArrayRecordSource) and len(src) == 5
    assert json.loads(src[3].record) == {"text": "doc 3"} and src[3].where == f"{path}:record 3"


def test_task_source_rows():
    src = TaskSource(TaskConfig(num_train=7), "train")
    assert len(src) == 7
    row = src[2]
    assert row.where == "task:train:2"
    r = row.record
    assert r["messages"][-1]["content"] == r["completion"] and r["prompt"].endswith("=?")
    assert r["text"] == f"<｜User｜>{r['prompt']}<｜Assistant｜>{r['completion']}<｜end▁of▁sentence｜>"


BAD_ROWS = [
    '{"text": "good one"}',
    '{"text": "unterminated',  # line 2: not JSON
    '{"body": "no text field"}',  # line 3
    '{"text": ""}',  # line 4: empty after tokenization
    '["a list"]',  # line 5
    '{"text": 7}',  # line 6
    '{"text": "good two"}',
]


@pytest.mark.parametrize("line, reason", [
    (2, "not valid JSON"), (3, "missing column 'text'"), (4, "column 'text' is empty after tokenization"),
    (5, "expected a JSON object, got list"), (6, "column 'text': expected a string, got int"),
])
def test_bad_row_errors_name_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path / "d.jsonl", [BAD_ROWS[0], BAD_ROWS[line - 1]])
    cfg = DataConfig(sources=(path,), seq_len=16, batch_size=1, shuffle=False, **ONE)
    with pytest.raises(DataError, match=rf"^{path}:2: {reason}"):
        list(make_iterator(cfg))


def test_bad_rows_skipped_and_counted(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", BAD_ROWS)
    cfg = DataConfig(sources=(path,), seq_len=16, batch_size=1, shuffle=False, on_bad_row="skip",
                     packing="none", **ONE)
    it = make_iterator(cfg)
    batches = list(it)
    assert len(batches) == 2
    assert it.stats["rows"] == 2 and it.stats["skipped_rows"] == 5
    assert it.stats["last_skipped"] == f"{path}:6: column 'text': expected a string, got int"


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "the assistant content is empty after tokenization"),
    ({"messages": [{"role": "robot", "content": "q"}]}, r"messages\[0\]\.role: expected one of"),
    ({"messages": "hello"}, "messages: expected a non-empty list"),
    ({"prompt": "q"}, "missing column 'completion'"),
    ({"prompt": 3, "completion": "a"}, "column 'prompt': expected a string or a list of messages"),
])
def test_sft_bad_rows(tmp_path, row, reason):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "q", "completion": "a"}', json.dumps(row)])
    cfg = DataConfig(kind="sft", sources=(path,), seq_len=32, batch_size=1, shuffle=False, **ONE)
    with pytest.raises(DataError, match=rf"^{path}:2: {reason}"):
        list(make_iterator(cfg))
