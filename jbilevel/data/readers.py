"""Read raw rows from local files (jsonl/json/csv/parquet/arrow), HF datasets, or lists.

Each reader yields ``(where, row)`` where ``where`` is a :class:`Location` naming the file and
line/row (for error messages, and in a run's weights.csv and curated files) and ``row`` is a
dict, or a ``DataError`` instance for an unreadable row (the caller decides whether to raise or
skip and count it).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterator

from jbilevel.data.report import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class Location(str):
    """Where a row came from: reads as ``"train.jsonl line 5"`` (a message prefix), and keeps
    the parts for joining results back to the source.

    Attributes:
      source: the path as given (or a dataset's name; "" for in-memory rows).
      row: 0-based index of the record among the ones the source holds, in reading order (the
        n-th non-blank line of a .jsonl, the n-th data row of a .csv, list/table index).
      line: 1-based line number in a .jsonl/.csv file; None for other formats.
    """

    source: str
    row: int
    line: int | None

    def __new__(cls, source: str, name: str, row: int, line: int | None = None):
        text = f"{name} line {line}" if line is not None else f"{name} row {row}".lstrip()
        self = super().__new__(cls, text)
        self.source, self.row, self.line, self._name = source, row, line, name
        return self

    def __getnewargs__(self):
        return (self.source, self._name, self.row, self.line)


def looks_like_hub_name(path: str) -> bool:
    """Args: a source string that is not an existing path. Returns: whether to try the hub."""
    return bool(_HUB_NAME.match(path)) and not path.endswith(SUFFIXES)


def iter_rows(source, *, split: str = "train") -> Iterator[tuple[str, dict | DataError]]:
    """Yield ``(where, row_or_error)`` from a path, an HF dataset, or a list of dicts.

    Args:
      source: a local file (suffix in ``SUFFIXES``), a glob pattern of such files (e.g. a
        dataset's shards, ``/data/sft/train-*.parquet``: read in sorted order, each row
        located in its own file), a ``save_to_disk`` directory, a hub name (only when a hub is
        reachable), a ``datasets.Dataset``, or a list of dicts.
      split: the split to take from hub names and ``DatasetDict`` directories.
    """
    if isinstance(source, list | tuple):
        for i, row in enumerate(source):
            where = Location("", "", i)
            yield where, row if isinstance(row, dict) else _not_object(where, row)
        return
    if not isinstance(source, str | os.PathLike):
        yield from _iter_hf(source, "dataset", "dataset")
        return
    path = os.fspath(source)
    name = os.path.basename(path.rstrip("/"))
    if not os.path.exists(path) and glob.has_magic(path):
        for file in _matches(path):
            yield from iter_rows(file, split=split)
        return
    if os.path.isdir(path):
        yield from _iter_hf(_load_from_disk(path, split), path, name)
        return
    if not os.path.exists(path):
        if not looks_like_hub_name(path):
            raise DataError(f"{path}: file not found (working directory {os.getcwd()})",
                            "not_found")
        yield from _iter_hub(path, split)
        return
    if os.path.getsize(path) == 0:
        raise DataError(f"{name}: empty file (0 bytes); expected {_expected(path)}")
    if path.endswith(".jsonl"):
        yield from _iter_jsonl(path, name)
    elif path.endswith(".json"):
        yield from _iter_json(path, name)
    elif path.endswith(".csv"):
        yield from _iter_csv(path, name)
    elif path.endswith((".parquet", ".arrow")):
        yield from _iter_arrow(path, name)
    else:
        raise DataError(f"{name}: unknown file type; use one of {', '.join(SUFFIXES)}")


def _matches(pattern: str) -> list[str]:
    """The data files a glob pattern names, sorted; none, or one of an unknown type, is an
    error naming the pattern."""
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"{pattern}: no file matches the pattern (working directory "
                        f"{os.getcwd()})", "not_found")
    odd = [f for f in files if not f.endswith(SUFFIXES)]
    if odd:
        raise DataError(f"{pattern}: matches {odd[0]}, not a data file ({', '.join(SUFFIXES)}); "
                        "narrow the pattern, e.g. to *.parquet", "not_found")
    return files


def _load_from_disk(path: str, split: str):
    """A ``save_to_disk`` directory's dataset (its ``split`` of a DatasetDict); any other
    directory is refused, naming its data files as a pattern to read instead."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        found = sorted({os.path.splitext(f)[1] for _, _, fs in os.walk(path) for f in fs
                        if f.endswith(SUFFIXES)})
        hint = (f"; to read its data files give a pattern, e.g. "
                f"{os.path.join(path, '**', '*' + found[0])}" if found else "")
        raise DataError(f"{path}: a directory that datasets' save_to_disk did not write (no "
                        f"dataset_info.json / dataset_dict.json){hint}", "not_found") from None
    return ds[split] if isinstance(ds, datasets.DatasetDict) else ds


def _expected(path: str) -> str:
    return "one JSON object per line" if path.endswith(".jsonl") else "rows"


def _not_object(where: str, row) -> DataError:
    return DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "bad_json")


def _iter_jsonl(path: str, name: str):
    with open(path, encoding="utf-8") as f:
        row_index = 0
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = Location(path, name, row_index, lineno)
            row_index += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(
                    f"{where}: broken JSON ({e.msg} at column {e.colno}); fix or delete the line",
                    "bad_json",
                )
                continue
            yield where, row if isinstance(row, dict) else _not_object(where, row)


def _iter_json(path: str, name: str):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {e.lineno}: broken JSON ({e.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of objects (or use .jsonl)")
    for i, row in enumerate(data):
        where = Location(path, name, i)
        yield where, row if isinstance(row, dict) else _not_object(where, row)


def _iter_csv(path: str, name: str):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{name}: no header row; the first line must name the columns")
        for i, row in enumerate(reader):
            where = Location(path, name, i, reader.line_num)
            if None in row:
                yield where, DataError(
                    f"{where}: more fields than the {len(reader.fieldnames)} header columns; "
                    "quote fields that contain commas",
                    "bad_csv",
                )
                continue
            yield where, row


def _iter_arrow(path: str, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        table = pq.read_table(path)
    else:
        with pa.memory_map(path) as src:
            try:
                table = pa.ipc.open_file(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                table = pa.ipc.open_stream(src).read_all()
    for i, row in enumerate(table.to_pylist()):
        yield Location(path, name, i), row


def _iter_hf(ds, source: str, name: str):
    for i, row in enumerate(ds):
        yield Location(source, name, i), row


def _iter_hub(name: str, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types; name the cause and the fix
        raise DataError(
            f"{name}: not a local file and could not be loaded from the dataset hub ({e}); "
            "pass a local .jsonl/.json/.csv/.parquet/.arrow path"
        ) from e
    yield from _iter_hf(ds, name, name)
