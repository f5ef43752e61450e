"""Files of records (`bloom_jax.records`): the same rows from JSONL, Parquet, Arrow (file and stream), a saved
Hugging Face dataset and `load_dataset`'s cache, locally and in a bucket; the instruction and text data built from
them equal to JSONL's; bad rows, bad files and a dataset's splits as one error each."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

from bloom_jax import storage  # noqa: E402
from bloom_jax.chat import ChatTemplate  # noqa: E402
from bloom_jax.data import expand_files, iter_documents  # noqa: E402
from bloom_jax.errors import BloomJaxError  # noqa: E402
from bloom_jax.recipe import TrainConfig, data_files  # noqa: E402
from bloom_jax.records import records  # noqa: E402
from bloom_jax.sft import Fields, detect_format, iter_examples, load_sft  # noqa: E402
from bloom_jax.tokenizer import train_tokenizer  # noqa: E402

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
ROWS = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f"{2 * i}.", "text": f"Document {i}.",
         "messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
        for i in range(7)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([r["prompt"] + " " + r["completion"] for r in ROWS] * 10, vocab_size=300)


def write(kind: str, directory, rows=ROWS) -> str:
    """`rows` as one file (or directory) of `kind`; tables in row groups (batches) of 3, so reads cross them."""
    table = pa.Table.from_pylist(rows)
    if kind == "jsonl":
        path = directory / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        path = directory / "rows.parquet"
        pq.write_table(table, path, row_group_size=3)
    elif kind in ("arrow file", "arrow stream"):
        path = directory / f"rows-{kind.split()[1]}.arrow"
        opener = pa.ipc.new_file if kind == "arrow file" else pa.ipc.new_stream
        with opener(path, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=3):
                writer.write_batch(batch)
    else:  # a saved dataset, in two shards
        path = directory / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=2)
    return str(path)


KINDS = ["jsonl", "parquet", "arrow file", "arrow stream", "saved dataset"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_file_gives_the_same_records_examples_and_documents(kind, tmp_path, tokenizer):
    path = write(kind, tmp_path)
    files = expand_files([path])
    if kind == "saved dataset":  # its Arrow files, in order, not its metadata
        assert [storage.name_of(f) for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert [row for f in files for _, row in records(f)] == ROWS
    assert [row for f in files for _, row in records(f, ["prompt", "nothing"])] == (
        ROWS if kind == "jsonl" else [{"prompt": r["prompt"]} for r in ROWS])  # tables read only those columns

    fields = detect_format([path], Fields())
    assert fields.format == "chat"  # messages win, as in JSONL
    assert list(iter_examples([path], fields, ChatTemplate(TEMPLATE))) == [
        (f"<|user|>{r['messages'][0]['content']}\n<|assistant|>", r["messages"][1]["content"]) for r in ROWS]
    pairs = Fields(format="prompt_completion")
    assert list(iter_examples([path], pairs)) == [(r["prompt"], r["completion"]) for r in ROWS]
    assert list(iter_documents([path])) == [r["text"] for r in ROWS]

    (tmp_path / "as-jsonl").mkdir()
    jsonl = write("jsonl", tmp_path / "as-jsonl")  # the same rows as JSONL
    ours, theirs = (load_sft([p], tokenizer, 32, tmp_path / f"cache-{i}", pairs, eval_fraction=0, progress=False,
                             packing=True).train for i, p in enumerate((path, jsonl)))
    for key, rows in ours.sequences(np.arange(ours.n_sequences)).items():
        np.testing.assert_array_equal(rows, theirs.sequences(np.arange(theirs.n_sequences))[key])


def test_load_dataset_arguments_in_a_recipe_read_its_cache_files(tmp_path, tokenizer):
    parquet = write("parquet", tmp_path)
    cfg = TrainConfig.from_dict({"hf_dataset": {"path": "parquet", "data_files": [parquet],
                                                "cache_dir": str(tmp_path / "hf-cache")}})
    files = data_files(cfg)
    assert len(files) == 1 and files[0].startswith(str(tmp_path / "hf-cache")) and files[0].endswith(".arrow")
    assert [row for _, row in records(files[0])] == ROWS
    assert data_files(cfg) == files  # the second load reads the same cache
    both = data_files(TrainConfig.from_dict({**cfg.to_dict(), "train_data": [parquet]}))
    assert both == [parquet, *files]  # beside train_data

    for settings, says in [
        ({"hf_dataset.split": "validation"}, r'hf_dataset parquet: Unknown split "validation"'),
        ({"hf_dataset.data_files": [str(tmp_path / "none.parquet")]}, "hf_dataset parquet: Unable to find"),
    ]:
        with pytest.raises(BloomJaxError, match=says):
            data_files(TrainConfig.from_dict({**cfg.to_dict(), **settings}))


def test_bad_rows_bad_files_and_a_dataset_of_splits_are_one_error_each(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1], completion=None), dict(ROWS[2])]
    path = write("parquet", tmp_path, rows)
    with pytest.raises(BloomJaxError, match=r"rows.parquet: row 2: no string field 'completion'"):
        list(iter_examples([path], Fields(format="prompt_completion")))
    with pytest.raises(BloomJaxError, match=r"rows.parquet: row 1: no string field 'body'"):
        list(iter_documents([path], "body"))

    fake = tmp_path / "fake.parquet"
    fake.write_text("prompt,completion\na,b\n")
    with pytest.raises(BloomJaxError, match=r"fake.parquet: not a readable parquet file \(.*magic"):
        list(iter_examples([fake], Fields(format="prompt_completion")))
    (tmp_path / "fake.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(BloomJaxError, match=r"fake.arrow: not a readable arrow file"):
        list(iter_documents([tmp_path / "fake.arrow"]))

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(splits))
    with pytest.raises(BloomJaxError, match=rf"{splits} holds a dataset's splits \(train, test\): name one, as "
                                            rf"{splits}/train"):
        expand_files([splits])
    assert [storage.name_of(f) for f in expand_files([splits / "test"])] == ["data-00000-of-00001.arrow"]


def test_tables_and_saved_datasets_in_a_bucket_read_as_local_ones(bucket, tmp_path):
    for kind in ("parquet", "arrow stream", "saved dataset"):
        local = write(kind, tmp_path)
        files = expand_files([local])
        for f in files:
            storage.write_bytes(storage.join(bucket, kind, f[len(local):].lstrip("/") or storage.name_of(f)),
                                open(f, "rb").read())
        if kind == "saved dataset":
            for meta in ("state.json", "dataset_info.json"):
                storage.write_bytes(storage.join(bucket, kind, meta), (tmp_path / "saved" / meta).read_bytes())
        remote = expand_files([storage.join(bucket, kind)])
        assert [storage.name_of(f) for f in remote] == [storage.name_of(f) for f in files], kind
        assert [row for f in remote for _, row in records(f)] == ROWS, kind


def test_without_pyarrow_or_datasets_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = write("parquet", tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(BloomJaxError, match=r"Parquet and Arrow data need pyarrow: pip install 'bloom-jax\[datasets\]'"):
        list(iter_documents([path]))
    with pytest.raises(BloomJaxError, match=r"hf_dataset needs the datasets package: pip install"):
        data_files(TrainConfig.from_dict({"hf_dataset.path": "parquet", "hf_dataset.data_files": [path]}))
    assert list(iter_documents([write("jsonl", tmp_path)])) == [r["text"] for r in ROWS]  # JSONL needs neither
