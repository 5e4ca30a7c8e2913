"""A user's data as TRL reads it: the same rows from jsonl, parquet, an Arrow file and a
`datasets.save_to_disk` directory (written by `datasets` itself) give the same batches; column names
mapped in the config; TRL's conversational formats (prompt-only, prompt-completion, messages); and
bad data found when the iterator is made, before anything compiles, naming the file, the row, the
column and the key to set."""

import json
import time

import numpy as np
import pytest

from r1jax.config import DataConfig
from r1jax.data.pipeline import make_iterator, make_prompt_iterator
from r1jax.errors import DataError

ROWS = [
    {"question": [{"role": "user", "content": f"What is {a}+{b}?"}], "solution": str(a + b), "tests": [{"input": "1"}]}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
]


def _write_all(tmp_path, rows) -> dict[str, str]:
    """The rows in every format r1jax reads, each written by the library a user would use."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": tmp_path / "d.jsonl", "parquet": tmp_path / "d.parquet", "arrow": tmp_path / "d.arrow",
             "save_to_disk": tmp_path / "saved"}
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, paths["parquet"])
    with pa.ipc.new_file(str(paths["arrow"]), table.schema) as w:  # the IPC file format (feather v2)
        w.write_table(table)
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["save_to_disk"]), num_shards=2)  # IPC streams
    return {k: str(v) for k, v in paths.items()}


def _prompts(source: str, **kw):
    cfg = DataConfig(kind="prompts", sources=(source,), seq_len=48, batch_size=4, shuffle=False,
                     prompt_field="question", answer_field="solution", **kw)
    return next(make_prompt_iterator(cfg))


def test_every_format_gives_the_same_prompt_batch(tmp_path):
    paths = _write_all(tmp_path, ROWS)
    want = _prompts(paths["jsonl"])
    assert want["answer"].tolist() == ["3", "7", "11", "15"]
    assert want["prompt"][0] == "<｜begin▁of▁sentence｜><｜User｜>What is 1+2?<｜Assistant｜><think>\n"
    assert list(want["raw_prompt"][1]) == ROWS[1]["question"]  # conversational, as given
    assert want["columns"][2] == {"solution": "11", "tests": [{"input": "1"}], "answer": "11"}
    for fmt in ("parquet", "arrow", "save_to_disk"):
        got = _prompts(paths[fmt])
        for k in ("tokens", "prompt_mask", "answer", "prompt", "messages"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{fmt}: {k}")
        assert list(got["columns"]) == list(want["columns"]) and list(got["raw_prompt"]) == list(want["raw_prompt"])
    # in grain worker processes too: the Arrow source maps its file again there, the columns are pickled
    got = _prompts(paths["save_to_disk"], worker_count=1)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert list(got["columns"]) == list(want["columns"])
    # the Arrow files of a save_to_disk directory, named one by one or by a glob, are a source too
    got = _prompts(f"{paths['save_to_disk']}/*.arrow")
    np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_sft_reads_trls_formats_alike(tmp_path):
    """TRL's conversational prompt-completion (completion a list of assistant messages), its
    standard prompt-completion (strings) and the messages form give the same tokens; mapped
    column names give them too."""
    q, a = "What is 2+2?", "<think>\n2+2=4\n</think>\n\n<answer>4</answer>"
    forms = {
        "conversational": {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]},
        "standard": {"prompt": q, "completion": a},
        "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    }
    batches = {}
    for name, row in forms.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        cfg = DataConfig(kind="sft", sources=(str(path),), seq_len=64, batch_size=1, shuffle=False, packing="none")
        batches[name] = next(make_iterator(cfg))
    path = tmp_path / "mapped.jsonl"
    path.write_text(json.dumps({"instruction": q, "response": a}) + "\n")
    cfg = DataConfig(kind="sft", sources=(str(path),), seq_len=64, batch_size=1, shuffle=False, packing="none",
                     prompt_field="instruction", completion_field="response")
    batches["mapped"] = next(make_iterator(cfg))
    for name, b in batches.items():
        for k in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(b[k], batches["messages"][k], err_msg=f"{name}: {k}")
    from r1jax.data.tokenizer import load_tokenizer

    assert batches["messages"]["loss_mask"].sum() == len(load_tokenizer().encode(a)) + 1  # the answer and its eos


@pytest.mark.parametrize("fmt, where", [("jsonl", ":1"), ("parquet", ":row 0"), ("arrow", ":row 0"),
                                        ("save_to_disk", "/data-00000-of-00002.arrow:row 0")])
def test_a_wrong_column_is_named_with_the_key_before_iterating(tmp_path, fmt, where):
    paths = _write_all(tmp_path, ROWS)
    cfg = DataConfig(kind="prompts", sources=(paths[fmt],), seq_len=48, batch_size=4, answer_field="solution")
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        make_prompt_iterator(cfg)  # no batch asked for: the check runs when the iterator is made
    assert time.perf_counter() - t0 < 5
    assert str(e.value).startswith(f"{paths[fmt]}{where}: missing column 'prompt' (columns: question, solution, tests); "
                                   "set prompts.prompt_field to the column that holds it")
    with pytest.raises(DataError, match=r"missing column 'answer' .*set prompts\.answer_field \(null if the data has "
                                        r"no gold answer\)"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(paths[fmt],), seq_len=48, batch_size=4,
                                        prompt_field="question"))
    with pytest.raises(DataError, match=r"missing column 'completion' .*set data\.completion_field"):
        make_iterator(DataConfig(kind="sft", sources=(paths[fmt],), seq_len=48, batch_size=4, prompt_field="question"))


def test_skip_still_refuses_a_source_whose_first_rows_are_all_bad(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"question": f"{i}?", "answer": "1"}) for i in range(20)) + "\n")
    cfg = DataConfig(kind="prompts", sources=(str(good),), seq_len=32, batch_size=1, on_bad_row="skip")
    assert next(make_prompt_iterator(cfg))["answer"].tolist() == ["2"]
    with pytest.raises(DataError, match=rf"the first 8 rows of JsonlSource\('{bad}', rows=20\) are all unusable; "
                                        rf"the first: {bad}:1: missing column 'prompt'"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(str(good), str(bad)), seq_len=32, batch_size=1,
                                        on_bad_row="skip"))
    # the hint names the section the data config is in
    with pytest.raises(DataError, match=r"\(prompts\.on_bad_row=skip skips such rows\)"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(str(bad),), seq_len=32, batch_size=1))


def test_dataset_directories_and_reserved_columns_are_named(tmp_path):
    import datasets

    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'dd'}: a DatasetDict with splits train, test; name one, "
                                        rf"e.g. {tmp_path / 'dd' / 'train'}"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(str(tmp_path / "dd"),)))
    got = _prompts(str(tmp_path / "dd" / "train"))
    assert got["answer"].tolist() == ["3", "7", "11", "15"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one `datasets.save_to_disk` wrote"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(str(tmp_path / "plain"),)))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "1", "truncated": True}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: column 'truncated' has the name of a reward argument"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(str(path),), seq_len=32, batch_size=1))
    path.write_text(json.dumps({"prompt": "p", "answer": "1", "solution": "2"}) + "\n")
    with pytest.raises(DataError, match=r"column 'answer' and prompts\.answer_field='solution'"):
        make_prompt_iterator(DataConfig(kind="prompts", sources=(str(path),), seq_len=32, batch_size=1,
                                        answer_field="solution"))
