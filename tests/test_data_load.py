"""Ingestion: every local file format, HF datasets on disk, the reference schemas."""

import json
import os

import numpy as np
import pytest

from jbilevel.data import DataError, load_sft

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
ORCA = os.path.join(FIXTURES, "openorca.jsonl")


def _orca_rows():
    with open(ORCA) as f:
        return [json.loads(line) for line in f]


def _same(a, b):
    np.testing.assert_array_equal(a.tokens_T, b.tokens_T)
    np.testing.assert_array_equal(a.offsets_N1, b.offsets_N1)
    np.testing.assert_array_equal(a.prompt_len_N, b.prompt_len_N)
    assert a.rows == b.rows


def test_all_file_formats_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _orca_rows()
    ref = load_sft(ORCA, max_len=128)
    assert ref.report.as_dict()["n_kept"] == 3 and ref.report.n_skipped == 0
    json.dump(rows, open(tmp_path / "o.json", "w"))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "o.parquet")
    with pa.OSFile(str(tmp_path / "o.arrow"), "wb") as sink, pa.ipc.new_file(
        sink, table.schema
    ) as writer:
        writer.write_table(table)
    hf = datasets.Dataset.from_list(rows)
    hf.save_to_disk(str(tmp_path / "o_hf"))
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "o_dd"))
    for src in ("o.json", "o.parquet", "o.arrow", "o_hf", "o_dd"):
        _same(load_sft(str(tmp_path / src), max_len=128), ref)
    _same(load_sft(hf, max_len=128), ref)
    _same(load_sft(rows, max_len=128), ref)
    assert ref.where == ["openorca.jsonl line 1", "openorca.jsonl line 2",
                         "openorca.jsonl line 3"]


def test_a_glob_pattern_reads_every_shard_in_order(tmp_path):
    """data.train=/data/train-*.parquet: a dataset's shards read in sorted order, each row
    located in its own file; a pattern matching nothing or a non-data file, and a directory
    save_to_disk did not write, are refused naming the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _orca_rows()
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "data" / "train-1.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "train-0.parquet")
    got = load_sft(str(tmp_path / "data" / "train-*.parquet"), max_len=128)
    _same(got, load_sft(ORCA, max_len=128))
    assert got.where == ["train-0.parquet row 0", "train-1.parquet row 0", "train-1.parquet row 1"]
    assert [w.source for w in got.where] == [str(tmp_path / "data" / f"train-{i}.parquet")
                                             for i in (0, 1, 1)]
    with pytest.raises(DataError, match=r"valid-\*.parquet: no file matches the pattern"):
        load_sft(str(tmp_path / "data" / "valid-*.parquet"))
    (tmp_path / "data" / "README.md").write_text("shards")
    with pytest.raises(DataError, match=r"matches .*README.md, not a data file"):
        load_sft(str(tmp_path / "data" / "*"))
    with pytest.raises(DataError, match=r"data: a directory that datasets' save_to_disk did not "
                                        r"write .* give a pattern, e.g. .*data/\*\*/\*.parquet"):
        load_sft(str(tmp_path / "data"))
    assert len(load_sft(str(tmp_path / "**" / "*.parquet"), max_len=128)) == 3


def test_csv_with_quoted_commas():
    ds = load_sft(os.path.join(FIXTURES, "qa.csv"), max_len=64)
    assert len(ds) == 2
    assert ds.rows[0] == {"question": "What is 1, 2?", "response": "a list"}
    assert ds.response_text(1) == "Hello"
    assert ds.where == ["qa.csv line 2", "qa.csv line 3"]


def test_schema_autodetect_and_explicit_agree():
    for name, schema in (("openorca.jsonl", "openorca"), ("alpaca_cleaned.json", "alpaca"),
                         ("chat.jsonl", "chat"), ("redorca.jsonl", "openorca"),
                         ("qa.csv", "qa"), ("sharegpt.jsonl", "sharegpt")):
        path = os.path.join(FIXTURES, name)
        _same(load_sft(path, max_len=256), load_sft(path, schema=schema, max_len=256))


def test_unknown_schema_says_how_to_fix():
    with pytest.raises(ValueError, match=r"row 0: cannot detect the schema from keys \(a, b\); "
                                         r"set schema="):
        load_sft([{"a": "x", "b": "y"}])
