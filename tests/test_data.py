"""The training data pipeline: documents from files, cached tokens, document split, packing, batches by step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bloom_jax import BloomJaxError
from bloom_jax.data import expand_files, iter_documents, load_corpus
from bloom_jax.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the model reads text and learns to predict the next token, one byte pair at a time. "
         "Le modèle lit du texte… ¿y luego? 大型语言模型。 हिन्दी भी। العربية، 🌍").split()
SEQ_LEN = 15


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 40))) for _ in range(n)]


def write_jsonl(path, documents, field="text"):
    lines = [json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(documents)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 documents: 30 in a JSONL file, 10 as text files in a subdirectory."""
    directory = tmp_path_factory.mktemp("corpus")
    documents = make_documents(40)
    write_jsonl(directory / "a.jsonl", documents[:30])
    (directory / "texts").mkdir()
    for i, document in enumerate(documents[30:]):
        (directory / "texts" / f"{i:02d}.txt").write_text(document, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tokenizer(corpus_dir):
    return train_tokenizer(iter_documents([corpus_dir]), vocab_size=320)


@pytest.fixture(scope="module")
def corpus(corpus_dir, tokenizer, tmp_path_factory):
    return load_corpus([corpus_dir], tokenizer, SEQ_LEN, tmp_path_factory.mktemp("cache"), eval_fraction=0.25)


def packed_reference(documents, tokenizer, indices):
    """encode(doc) + [eos] over the documents `indices`, in that order."""
    return np.array([t for i in indices for t in tokenizer.encode(documents[i]) + [tokenizer.eos_token_id]])


def test_jsonl_field_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"content": "first", "text": 1}\n\n{"content": "sécond\\nline"}\n', encoding="utf-8")
    assert list(iter_documents([path], jsonl_field="content")) == ["first", "sécond\nline"]
    with pytest.raises(BloomJaxError, match=r"data.jsonl:1: no string field 'text'"):
        list(iter_documents([path]))
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(BloomJaxError, match=r"data.jsonl:2: not a JSON line"):
        list(iter_documents([path]))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(BloomJaxError, match=r"bad.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        list(iter_documents([tmp_path / "bad.txt"]))


def test_directories_and_globs_expand_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/d.jsonl"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name if name.endswith(".txt") else '{"text": "d"}\n', encoding="utf-8")
    assert list(iter_documents([tmp_path])) == ["a.txt", "b.txt", "sub/c.txt", "d"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["a.txt", "b.txt"]
    assert list(iter_documents([tmp_path / "sub" / "c.txt", str(tmp_path / "**" / "*.txt")])) == [
        "sub/c.txt", "a.txt", "b.txt"]  # each file once, at its first mention
    with pytest.raises(BloomJaxError, match="no such file or directory: .*missing.txt"):
        expand_files([tmp_path / "missing.txt"])
    with pytest.raises(BloomJaxError, match=r"no file matches .*\*.csv"):
        expand_files([str(tmp_path / "*.csv")])


def test_packed_splits_are_documents_with_eos_cut_in_windows(corpus, corpus_dir, tokenizer):
    documents = list(iter_documents([corpus_dir]))
    for split in (corpus.train, corpus.eval):
        stream = packed_reference(documents, tokenizer, split.documents)
        np.testing.assert_array_equal(split.tokens(), stream)
        assert split.n_tokens == len(stream) and split.n_sequences == len(stream) // (SEQ_LEN + 1) > 0
        assert (stream == tokenizer.eos_token_id).sum() == len(split.documents)
        for i in (0, 1, split.n_sequences - 1):
            window = split.sequence(i)
            assert window.shape == (SEQ_LEN + 1,) and window.dtype == np.int32
            np.testing.assert_array_equal(window, stream[i * (SEQ_LEN + 1):(i + 1) * (SEQ_LEN + 1)])
    batches = corpus.train.train_batches(4)
    batch = batches.get(3)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert batch.shape == (4, SEQ_LEN + 1) and batch.dtype == np.int32
    stream = corpus.train.tokens()
    for row, index in enumerate(batches.indices(3)):
        start = index * (SEQ_LEN + 1)
        np.testing.assert_array_equal(inputs[row], stream[start:start + SEQ_LEN])
        np.testing.assert_array_equal(targets[row], stream[start + 1:start + SEQ_LEN + 1])


def test_split_is_disjoint_by_document_and_deterministic(corpus, corpus_dir, tokenizer, tmp_path):
    train, held_out = corpus.train.documents, corpus.eval.documents
    assert len(held_out) == 10 and not set(train) & set(held_out) and sorted([*train, *held_out]) == list(range(40))
    cache = corpus_dir.parent / "split-cache"
    again = load_corpus([corpus_dir], tokenizer, SEQ_LEN, cache, eval_fraction=0.25)
    np.testing.assert_array_equal(again.eval.documents, held_out)
    other = load_corpus([corpus_dir], tokenizer, SEQ_LEN, cache, eval_fraction=0.25, seed=1)
    assert set(other.eval.documents) != set(held_out)
    stats = corpus.stats()
    assert stats["documents"] == 40 and stats["train"]["documents"] == 30 and stats["eval"]["documents"] == 10
    assert stats["train"]["tokens"] + stats["eval"]["tokens"] == stats["tokens"]
    no_eval = load_corpus([corpus_dir], tokenizer, SEQ_LEN, cache, eval_fraction=0)
    assert len(no_eval.train.documents) == 40 and no_eval.eval.n_sequences == 0


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, tokenizer):
    class NoEncoding:
        """A tokenizer that can be hashed into the cache key but fails if asked to tokenize."""

        def __init__(self, hf):
            self.hf = hf

        def to_str(self):
            return self.hf.to_str()

        def encode_batch(self, texts):
            raise AssertionError("tokenized again")

    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_jsonl(data / "docs.jsonl", make_documents(6))
    first = load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0)
    assert first.tokens.tokenized and sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy", ".npy"]
    second = load_corpus([data], Tokenizer(NoEncoding(tokenizer.tokenizer)), SEQ_LEN, cache, eval_fraction=0)
    assert not second.tokens.tokenized and isinstance(second.tokens.tokens_t, np.memmap)
    np.testing.assert_array_equal(second.tokens.tokens_t, first.tokens.tokens_t)
    np.testing.assert_array_equal(second.train.train_batches(2).get(5), first.train.train_batches(2).get(5))
    with open(data / "docs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    third = load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0)
    assert third.tokens.tokenized and third.tokens.n_documents == 7
    os.utime(data / "docs.jsonl", ns=(0, 0))  # same bytes, another mtime: tokenized again
    assert load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0).tokens.tokenized
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())


def test_shuffle_is_seeded_and_reshuffled_each_epoch(corpus, corpus_dir, tokenizer, tmp_path):
    n = corpus.train.n_sequences
    batches = corpus.train.train_batches(1)
    epochs = [[int(batches.indices(step)[0]) for step in range(e * n, (e + 1) * n)] for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)  # every window once per epoch
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    assert batches.epoch(n) == 1.0
    for step in (0, n - 1, 2 * n + 1):
        np.testing.assert_array_equal(batches.get(step), corpus.train.sequence(epochs[(step // n) % 3][step % n])[None])

    same = load_corpus([corpus_dir], tokenizer, SEQ_LEN, tmp_path, eval_fraction=0.25).train.train_batches(4)
    reseeded = load_corpus([corpus_dir], tokenizer, SEQ_LEN, tmp_path, eval_fraction=0.25, seed=1)
    a, b = corpus.train.train_batches(4), reseeded.train.train_batches(4)
    for step in range(3):
        np.testing.assert_array_equal(same.get(step), a.get(step))
    assert not np.array_equal(np.stack([a.get(s) for s in range(3)]), np.stack([b.get(s) for s in range(3)]))


def test_random_access_equals_iteration_and_process_shares(corpus):
    batches = corpus.train.train_batches(6)
    iterator = batches.iterate()
    for step in range(5):
        np.testing.assert_array_equal(next(iterator), batches[step])
    resumed = batches.iterate(start_step=3)
    for step in (3, 4):
        np.testing.assert_array_equal(next(resumed), batches.get(step))
    for step in (0, 7):
        shares = [batches.local(step, p, 2) for p in range(2)]
        assert all(s.shape == (3, SEQ_LEN + 1) for s in shares)
        np.testing.assert_array_equal(np.concatenate(shares), batches.get(step))
        np.testing.assert_array_equal(np.concatenate([batches.local(step, p, 3) for p in range(3)]), batches.get(step))
    mine = batches.iterate(start_step=2, process_index=1, process_count=2)
    for step in (2, 3):
        np.testing.assert_array_equal(next(mine), batches.local(step, 1, 2))
    with pytest.raises(BloomJaxError, match="batch size 6 does not divide among 4 processes"):
        batches.local(0, 0, 4)


def test_eval_batches_are_the_first_windows_in_order(corpus):
    held_out = corpus.eval
    n = held_out.n_sequences
    expected = np.stack([held_out.sequence(i) for i in range(n)])
    batches = list(held_out.eval_batches(2, 2))
    assert len(batches) == 2 and all(b.shape == (2, SEQ_LEN + 1) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), expected[:4])
    everything = list(held_out.eval_batches(10_000, 2))  # fewer batches when the split is short
    assert len(everything) == n // 2
    np.testing.assert_array_equal(np.concatenate(everything), expected[:n // 2 * 2])
    np.testing.assert_array_equal(next(held_out.eval_batches(1, 2, process_index=1, process_count=2)), expected[1:2])
    with pytest.raises(BloomJaxError, match=f"eval split has {n} sequences .* fewer than one eval batch of {n + 1}"):
        held_out.eval_batches(1, n + 1)


def test_too_little_text_and_missing_files_are_clear_errors(tmp_path, tokenizer):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, ["a short text", "another one"])
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in ["a short text", "another one"])
    with pytest.raises(BloomJaxError, match=f"too little text: the train split has {tokens} tokens in 2 documents, "
                                            "fewer than one sequence of seq_len \\+ 1 = 1001"):
        load_corpus([data], tokenizer, 1000, tmp_path / "cache", eval_fraction=0)
    write_jsonl(data, ["a short text"] * 10)  # 9 train documents make a window of one more token than each has
    length = len(tokenizer.encode("a short text")) + 1
    with pytest.raises(BloomJaxError, match=f"too little eval text: the eval split has {length} tokens in 1 of 10 "
                                            f"documents, fewer than one sequence of seq_len \\+ 1 = {length + 1}"):
        load_corpus([data], tokenizer, length, tmp_path / "cache", eval_fraction=0.1)
    (tmp_path / "one.txt").write_text("a single long text file is a single document", encoding="utf-8")
    with pytest.raises(BloomJaxError, match="cannot hold out eval documents from 1 document"):
        load_corpus([tmp_path / "one.txt"], tokenizer, 3, tmp_path / "cache", eval_fraction=0.5)
    with pytest.raises(BloomJaxError, match="no such file or directory: .*nowhere.jsonl"):
        load_corpus([tmp_path / "nowhere.jsonl"], tokenizer, 3, tmp_path / "cache")


def test_train_tokenizer_special_ids_round_trip_and_save(tmp_path, tokenizer, corpus_dir):
    hf = tokenizer.tokenizer
    assert [hf.token_to_id(t) for t in ["<unk>", "<s>", "</s>", "<pad>"]] == [0, 1, 2, 3]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3) and tokenizer.vocab_size <= 320
    for text in make_documents(5, seed=7) + ["unseen: Zürich, 東京! ✨"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    loaded = Tokenizer.from_dir(Path(tokenizer.save(tmp_path / "tok")).parent)
    text = " ".join(WORDS)
    assert loaded.encode(text) == tokenizer.encode(text) and len(tokenizer.encode(text)) < len(text.encode())
    with pytest.raises(BloomJaxError, match="vocab_size must be at least 260"):
        train_tokenizer(iter_documents([corpus_dir]), vocab_size=100)


@pytest.mark.parametrize("damage", ["tokens_cut_short", "tokens_header", "offsets_overwritten", "offsets_backwards",
                                    "tokens_bit_flipped", "checksums_cut_short"])
def test_a_damaged_cache_entry_is_detected_and_tokenized_again(tmp_path, tokenizer, caplog, damage):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_jsonl(data / "docs.jsonl", make_documents(6))
    first = load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0)
    tokens_file = next(cache.glob("*.tokens.npy"))
    offsets_file = next(cache.glob("*.offsets.npy"))
    if damage == "tokens_cut_short":  # a copy or a disk that stopped part-way
        os.truncate(tokens_file, tokens_file.stat().st_size // 2)
    elif damage == "tokens_header":
        tokens_file.write_bytes(b"\0" * 64 + tokens_file.read_bytes()[64:])
    elif damage == "offsets_overwritten":
        np.save(offsets_file, np.arange(3, dtype=np.int64))
    elif damage == "offsets_backwards":
        offsets = np.load(offsets_file)
        offsets[2], offsets[3] = offsets[3], offsets[2]
        np.save(offsets_file, offsets)
    elif damage == "tokens_bit_flipped":  # a token id that is still a valid id: only the checksum sees it
        stored = bytearray(tokens_file.read_bytes())
        stored[-7] ^= 0x01
        tokens_file.write_bytes(bytes(stored))
    else:
        checksums = next(cache.glob("*.json"))
        checksums.write_bytes(checksums.read_bytes()[:10])
    with caplog.at_level("WARNING", logger="bloom_jax.data"):
        again = load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0)
    assert again.tokens.tokenized  # not silently used
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert said[0].startswith(f"the tokenized data cache in {cache} is damaged (")
    if damage == "tokens_bit_flipped":
        assert f"{tokens_file.name}: its CRC-32 is not the one it was written with" in said[0]
    np.testing.assert_array_equal(again.tokens.tokens_t, first.tokens.tokens_t)
    np.testing.assert_array_equal(again.tokens.doc_offsets, first.tokens.doc_offsets)
    assert not load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0).tokens.tokenized  # rebuilt entry


def test_an_entry_without_its_checksums_is_tokenized_again_and_completed(tmp_path, tokenizer, caplog):
    # An entry whose writer died before its last file (or one an earlier version wrote, without checksums).
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_jsonl(data / "docs.jsonl", make_documents(6))
    load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0)
    next(cache.glob("*.json")).unlink()
    with caplog.at_level("WARNING", logger="bloom_jax.data"):
        assert load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0).tokens.tokenized
    assert not caplog.records
    assert len(list(cache.iterdir())) == 3
    assert not load_corpus([data], tokenizer, SEQ_LEN, cache, eval_fraction=0).tokens.tokenized


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_full_or_read_only_cache_is_one_error_and_leaves_nothing(tmp_path, tokenizer, fault):
    from faults import tmpfs

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "docs.jsonl", make_documents(400))  # about 80 KB of tokens
    with tmpfs(tmp_path / "disk", "16k", read_only=fault == "read_only") as disk:
        expected = (r"no space left on device \(it needs about 0\.\d MB, 0\.0 MB are free there\); set data_cache "
                    "to a directory with room" if fault == "full" else
                    "read-only file system; set data_cache to a writable directory")
        with pytest.raises(BloomJaxError, match=rf"^cannot cache the tokenized data in {disk}: {expected}$"):
            load_corpus([data], tokenizer, SEQ_LEN, disk, eval_fraction=0)
        assert list(disk.iterdir()) == []
