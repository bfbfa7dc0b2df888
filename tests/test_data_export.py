"""Export of a curated dataset: rows + weights round trip, subsets by top fraction/threshold."""

import json
import os

import numpy as np
import pytest

from jbilevel.data import export_curated, load_sft, select_ids

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def test_select_ids():
    w = np.array([0.5, 2.0, 1.0, 2.0, 0.1])
    np.testing.assert_array_equal(select_ids(w, top_frac=0.4), [1, 3])
    np.testing.assert_array_equal(select_ids(w, top_frac=0.5), [1, 2, 3])  # ceil(2.5) = 3
    np.testing.assert_array_equal(select_ids(w, top_frac=0.2), [1])  # tie: lower id first
    np.testing.assert_array_equal(select_ids(w, threshold=1.0), [1, 2, 3])
    np.testing.assert_array_equal(select_ids(w), np.arange(5))
    with pytest.raises(ValueError, match="not both"):
        select_ids(w, top_frac=0.5, threshold=1.0)


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_export_round_trip(tmp_path, fmt):
    src = os.path.join(FIXTURES, "openorca.jsonl")
    ds = load_sft(src, max_len=128)
    w = np.array([0.25, 1.5, 3.0])
    out = str(tmp_path / ("curated.jsonl" if fmt == "jsonl" else "curated_hf"))
    assert export_curated(ds, w, out, format=fmt) == 3
    back = load_sft(out, max_len=128)
    np.testing.assert_array_equal(back.tokens_T, ds.tokens_T)
    np.testing.assert_array_equal(back.prompt_len_N, ds.prompt_len_N)
    added = ("weight", "example_id", "source_file", "source_line", "source_row")
    for row, orig, wi, i in zip(back.rows, ds.rows, w, range(3), strict=True):
        assert row["weight"] == wi and row["example_id"] == i
        assert (row["source_file"], row["source_line"], row["source_row"]) == (src, i + 1, i)
        assert {k: v for k, v in row.items() if k not in added} == orig
    sub = str(tmp_path / ("top.jsonl" if fmt == "jsonl" else "top_hf"))
    assert export_curated(ds, w, sub, format=fmt, top_frac=0.5) == 2
    top = load_sft(sub, max_len=128)
    assert [r["example_id"] for r in top.rows] == [1, 2]
    assert top.rows[0]["question"] == ds.rows[1]["question"]


def test_export_jsonl_is_plain_rows(tmp_path):
    ds = load_sft([{"question": "a", "response": "b"}], max_len=32)
    export_curated(ds, [0.5], str(tmp_path / "x.jsonl"))
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"question": "a", "response": "b", "weight": 0.5, "example_id": 0}]


def test_export_errors(tmp_path):
    ds = load_sft([{"question": "a", "response": "b", "weight": "x"}], max_len=32)
    with pytest.raises(ValueError, match="2 weights for 1 examples"):
        export_curated(ds, [1.0, 2.0], str(tmp_path / "x.jsonl"))
    with pytest.raises(ValueError, match="row 0: row already has key 'weight'; pass weight_key="):
        export_curated(ds, [1.0], str(tmp_path / "x.jsonl"))
    assert export_curated(ds, [1.0], str(tmp_path / "x.jsonl"), weight_key="w") == 1


def test_the_weights_preview_shows_the_texts_of_every_schema():
    """weights.csv's preview column: a row's texts, a conversation's messages included."""
    from jbilevel.inputs import preview

    chat = {"messages": [{"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello\nthere."}]}
    assert preview(chat) == "Hi? | Hello there."
    sharegpt = {"id": "a1", "conversations": [{"from": "human", "value": "Hi?"},
                                              {"from": "gpt", "value": "Yo"}]}
    assert preview(sharegpt) == "a1 | Hi? | Yo"
    assert preview({"question": "2+2?", "response": "4"}) == "2+2? -> 4"
    assert preview({"instruction": "x" * 100, "output": "y"}) == "x" * 80
