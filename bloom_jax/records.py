"""Files of records: the rows of JSONL, Parquet and Arrow files as dicts, for text and instruction data alike.

- `is_records`: whether a file holds records, by its suffix: `.jsonl`/`.json` (one JSON object per line),
  `.parquet`, `.arrow` (Arrow IPC, stream or file: what Hugging Face `datasets` writes).
- `records`: (where, row) of each record of a file, a local path or a URL, streamed; `where` names the file and
  the line (JSONL, "data.jsonl:7") or the row (tables, "data.parquet: row 7"), for one-line errors.
- `saved_dataset_files`: a directory that Hugging Face `Dataset.save_to_disk` wrote, as its Arrow files.
- `load_dataset_files`: `datasets.load_dataset(**args)` (offline with `HF_DATASETS_OFFLINE=1` and a filled
  cache), as the Arrow files of its cache; the data then takes the files' path (cache keys, splits) as any other.

Parquet and Arrow need pyarrow, `load_dataset` the `datasets` package (`pip install 'bloom-jax[datasets]'`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError

JSONL_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
_ROWS_PER_BATCH = 1024  # rows converted to Python at a time from a table
_ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format's; the stream format (datasets' files) starts otherwise
_SAVED_DATASET = "state.json"  # what `Dataset.save_to_disk` writes beside its Arrow files
_SAVED_DATASET_DICT = "dataset_dict.json"


def suffix(path: str) -> str:
    return os.path.splitext(storage.name_of(path))[1].lower()


def is_records(path: str) -> bool:
    """Whether a file holds records (see the module's docstring), by its suffix."""
    return suffix(path) in JSONL_SUFFIXES + TABLE_SUFFIXES


def records(path: str, columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) of each record of `path` in order. JSONL: each non-blank line, an object (a line that is not
    UTF-8, not JSON or not an object is an error naming the file and line). Parquet and Arrow: each row, with only
    `columns` where given (those the table has: a missing field is the caller's error, by row)."""
    kind = suffix(path)
    if kind in JSONL_SUFFIXES:
        yield from _jsonl(path)
    elif kind in TABLE_SUFFIXES:
        yield from _table(path, columns)
    else:
        raise BloomJaxError(f"{path}: not a file of records (.jsonl, .json, .parquet or .arrow)")


def _jsonl(path: str) -> Iterator[tuple[str, dict]]:
    with storage.open_read(path) as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BloomJaxError(f"{where}: not UTF-8 (invalid byte at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BloomJaxError(f"{where}: not a JSON line ({e.msg}); expected one JSON object per line"
                                    ) from None
            if not isinstance(record, dict):
                raise BloomJaxError(f"{where}: not a JSON object")
            yield where, record


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise BloomJaxError("Parquet and Arrow data need pyarrow: pip install 'bloom-jax[datasets]'") from None
    return pyarrow


def _table(path: str, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    pa = _pyarrow()
    row = 0
    with storage.open_read(path) as f:
        try:
            for batch in _batches(pa, f, path, columns):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{path}: row {row}", record
        except pa.ArrowException as e:  # not Parquet or Arrow, or damaged; the storage's own errors pass
            raise BloomJaxError(f"{path}: not a readable {suffix(path)[1:]} file ({_first_line(e)})") from None


def _batches(pa, f, path: str, columns: Sequence[str] | None):
    """The record batches of a Parquet or Arrow file object, `columns` only (those it has) where given."""
    if suffix(path) == ".parquet":
        table = pa.parquet.ParquetFile(f)
        names = table.schema_arrow.names
        wanted = None if columns is None else [c for c in columns if c in names]
        yield from table.iter_batches(batch_size=_ROWS_PER_BATCH, columns=wanted)
        return
    magic = f.read(len(_ARROW_FILE_MAGIC))
    f.seek(0)
    if magic == _ARROW_FILE_MAGIC:
        reader = pa.ipc.open_file(f)
        stream = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        reader = pa.ipc.open_stream(f)
        stream = iter(reader)
    names = reader.schema.names
    keep = None if columns is None else [c for c in columns if c in names]
    for batch in stream:
        batch = batch if keep is None else batch.select(keep)
        for start in range(0, batch.num_rows, _ROWS_PER_BATCH):
            yield batch.slice(start, _ROWS_PER_BATCH)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def saved_dataset_files(directory: str) -> list[str] | None:
    """The Arrow files, in order, of a directory (a path or URL) that `Dataset.save_to_disk` wrote; None for any
    other directory. A `DatasetDict`'s directory is an error naming its splits (each split is a saved dataset:
    name one)."""
    splits = storage.read_bytes(storage.join(directory, _SAVED_DATASET_DICT))
    if splits is not None:
        try:
            names = json.loads(splits)["splits"]
        except (ValueError, KeyError, TypeError):
            names = []
        listed = ", ".join(map(str, names)) or "unknown"
        raise BloomJaxError(f"{directory} holds a dataset's splits ({listed}): name one, as "
                            f"{storage.join(directory, str(names[0]) if names else 'SPLIT')}")
    state = storage.read_bytes(storage.join(directory, _SAVED_DATASET))
    if state is None:
        return None
    try:
        files = [entry["filename"] for entry in json.loads(state)["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise BloomJaxError(f"{storage.join(directory, _SAVED_DATASET)}: not the state of a saved dataset (no "
                            "_data_files)") from None
    if not files:
        raise BloomJaxError(f"{directory}: a saved dataset without data files")
    return [storage.join(directory, name) for name in files]


def load_dataset_files(arguments: dict) -> list[str]:
    """The Arrow cache files of `datasets.load_dataset(**arguments)` (a split of a dataset: `split` is needed;
    `streaming` is not taken). Offline (`HF_DATASETS_OFFLINE=1`) it reads what the cache holds."""
    if not isinstance(arguments, dict) or not isinstance(arguments.get("path"), str):
        raise BloomJaxError("hf_dataset: load_dataset's arguments, a mapping with at least path (and split)")
    if "split" not in arguments:
        raise BloomJaxError("hf_dataset: give the split to train on (split: train)")
    if arguments.get("streaming"):
        raise BloomJaxError("hf_dataset: streaming datasets are not read (the data is tokenized and cached whole)")
    try:
        import datasets
    except ImportError:
        raise BloomJaxError("hf_dataset needs the datasets package: pip install 'bloom-jax[datasets]'") from None
    try:
        dataset = datasets.load_dataset(**arguments)
    except (FileNotFoundError, ValueError, ConnectionError, TypeError) as e:
        raise BloomJaxError(f"hf_dataset {arguments['path']}: {_first_line(e)}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise BloomJaxError(f"hf_dataset {arguments['path']}: split {arguments['split']!r} is not one dataset")
    files = [entry["filename"] for entry in dataset.cache_files]
    if not files:
        raise BloomJaxError(f"hf_dataset {arguments['path']}: the dataset is in memory, with no cache files to read")
    return files


__all__ = ["is_records", "load_dataset_files", "records", "saved_dataset_files"]
