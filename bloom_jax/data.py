"""Training data: text, JSONL, Parquet and Arrow files -> tokens cached on disk -> train/eval split by document
-> packed windows -> batches by optimizer step.

1. `iter_documents`: a JSONL line or a table's row is one document (its `jsonl_field`), any other file is one
   document. Files are local paths or URLs (`gs://bucket/data/*.jsonl`), read through `bloom_jax.storage`.
2. `TokenizedCorpus`: every document tokenized once into one flat uint32 stream with EOS after each document,
   saved as .npy under a key of (files, sizes, versions, field, tokenizer) and memory-mapped on later runs; a
   cache in a bucket is read by byte ranges, each process fetching only the windows of its own rows.
3. `split_documents`: a seeded `eval_fraction` of the documents is held out for evaluation.
4. `PackedSplit`: a split's documents (EOS included) concatenated in corpus order and cut into windows of
   `seq_len + 1` tokens (inputs = window[:-1], targets = window[1:]); the remainder is dropped.
5. `TrainBatches`: grain `MapDataset` of windows, shuffled with a new permutation each epoch, repeated forever
   and indexed by step. Batch `step` is a pure function of (corpus, seq_len, seed, global batch, step): the
   data position of a run is its step number, so resuming at step k reads what an uninterrupted run would.

`load_corpus` does 2-4 and returns a `Corpus`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import itertools
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
from tqdm.auto import tqdm

from bloom_jax import storage
from bloom_jax.disk_faults import DISK_ERRORS, disk_error, room
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.log import get_logger
from bloom_jax.records import is_records, records, saved_dataset_files
from bloom_jax.storage import is_remote, join
from bloom_jax.tokenizer import Tokenizer

log = get_logger(__name__)

Files = str | os.PathLike | Sequence[str | os.PathLike]

_CACHE_VERSION = 1  # bump when the cached arrays change meaning
_TOKENIZE_CHUNK = 1024  # documents per `encode_batch` call (the Rust side tokenizes a chunk in parallel)


def expand_files(files: Files) -> list[str]:
    """The regular files that `files` name, in the order given, each once (at its first mention): local paths,
    or URLs (`gs://...`).

    A file stands for itself, a directory (a URL prefix) for every file under it (recursive, sorted by path),
    and a glob pattern (`*`, `?`, `[`; `**` recursive) for its matches, sorted, directories among them expanded.
    A directory that Hugging Face `Dataset.save_to_disk` wrote stands for its Arrow files.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    found: dict[str, None] = {}
    for item in files:
        for path in _expand_one(item):
            found.setdefault(path, None)
    if not found:
        raise BloomJaxError("no data files given")
    return list(found)


def _expand_one(item: str | os.PathLike) -> list[str]:
    text = os.fspath(item)
    if is_remote(text):
        return _expand_remote(text)
    path = storage.local_path(text)
    if path.exists():
        matches = [path]
    elif any(c in text for c in "*?["):
        matches = [Path(m) for m in storage.glob(str(path))]
    else:
        raise BloomJaxError(f"no such file or directory: {item}")
    paths = []
    for match in matches:
        if match.is_dir():
            paths.extend(saved_dataset_files(str(match)) or sorted(str(p) for p in match.rglob("*") if p.is_file()))
        elif match.is_file():
            paths.append(str(match))
        else:
            raise BloomJaxError(f"not a regular file or directory: {match}")
    if not paths:
        raise BloomJaxError(f"no files in {item}" if path.exists() else f"no file matches {item}")
    return paths


def _expand_remote(url: str) -> list[str]:
    if any(c in url for c in "*?["):
        matches = storage.glob(url)
        if not matches:
            raise BloomJaxError(f"no file matches {url}")
    elif storage.exists(url):
        matches = [url]
    else:
        raise BloomJaxError(f"no such file or directory: {url}")
    paths = []
    for match in matches:
        if storage.is_file(match):
            paths.append(match)
        else:
            paths.extend(saved_dataset_files(match) or (join(match, key) for key in storage.find(match)))
    if not paths:
        raise BloomJaxError(f"no files in {url}")
    return paths


def iter_documents(files: Files, jsonl_field: str = "text") -> Iterator[str]:
    """The documents of `files` (see `expand_files`), in order.

    A `.jsonl`/`.json` file holds one JSON object per line, whose string `jsonl_field` is a document; blank lines
    are skipped. So does each row of a Parquet or Arrow file (`bloom_jax.records`). Any other file is one
    document. Text must be UTF-8: undecodable bytes are an error naming the
    file (and line), not replaced, so that a binary or mis-encoded file is not silently trained on. The files
    are found at once (a bad path fails here), read (streamed, for a URL) as the documents are consumed.
    """
    return _documents(expand_files(files), jsonl_field)


def _documents(paths: list[str], jsonl_field: str) -> Iterator[str]:
    for path in paths:
        if is_records(path):
            yield from _record_documents(path, jsonl_field)
        else:
            yield _text_document(path)


def _record_documents(path: str, field: str) -> Iterator[str]:
    for where, record in records(path, [field]):
        if not isinstance(record.get(field), str):
            raise BloomJaxError(f"{where}: no string field {field!r}")
        yield record[field]


def _text_document(path: str) -> str:
    data = storage.read_bytes(path)
    if data is None:
        raise BloomJaxError(f"no such file: {path}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BloomJaxError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Every document as one flat token stream, EOS after each; tokenized once, then read from the cache.

    Document i is `tokens_t[doc_offsets[i]:doc_offsets[i + 1]]`, its EOS last. `tokenized` says whether this
    load ran the tokenizer (False: read from the cache: `tokens_t` memory-mapped from a local one, or, from one
    at a URL, a `RemoteTokens` that fetches the slices asked for).
    """

    tokens_t: np.ndarray | RemoteTokens  # uint32 [total tokens]
    doc_offsets: np.ndarray  # int64 [documents + 1]
    tokenized: bool

    @property
    def n_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens_t)

    @classmethod
    def load(cls, files: Files, tokenizer: Tokenizer, cache_dir: str | os.PathLike, jsonl_field: str = "text",
             progress: bool = True, cache_setting: str = "data_cache") -> TokenizedCorpus:
        """The corpus of `files` from `cache_dir` (a local directory or a URL) if cached under the same key, else
        tokenized and cached.

        The key hashes the resolved paths, sizes and mtimes of the files (a URL's generation in place of its
        mtime), `jsonl_field`, the tokenizer's JSON and its EOS id: editing, adding or removing a file, or
        changing the tokenizer, tokenizes again. Files inside `cache_dir` are not data, so the cache may live in
        a data directory.
        """
        cache = storage.normalize(cache_dir)
        paths = [p for p in expand_files(files) if not inside(p, cache)]
        if not paths:
            raise BloomJaxError(f"no data files outside the cache directory {cache_dir}")
        key = cache_key(paths, tokenizer, jsonl_field)
        entry = _text_entry(cache, key)
        if entry.complete():
            cached = entry.read(progress)
            if cached is not None:
                return cls(cached["tokens"], cached["offsets"], tokenized=False)
        tokens_t, doc_offsets = tokenize_documents(iter_documents(paths, jsonl_field), tokenizer, progress)
        if len(doc_offsets) == 1:
            raise BloomJaxError(f"no documents in {', '.join(map(str, paths))}")
        entry.write({"tokens": tokens_t, "offsets": doc_offsets}, cache_setting)
        return cls(tokens_t, doc_offsets, tokenized=True)


def inside(path: str, directory: str) -> bool:
    """Whether a file (a path or URL) lies under a directory."""
    if is_remote(path) or is_remote(directory):
        return path.startswith(directory.rstrip("/") + "/")
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def cache_key(paths: Sequence[str | os.PathLike], tokenizer: Tokenizer, jsonl_field: str, **settings) -> str:
    """A hex digest that changes when the files (path, size, mtime or generation), the field, the tokenizer or
    any of `settings` (how other data than text is read: JSON values) change."""
    stats = [(os.fspath(p), *storage.size_and_version(p)) if is_remote(p)
             else (str(Path(p).resolve()), (st := Path(p).stat()).st_size, st.st_mtime_ns) for p in paths]
    described = json.dumps({"version": _CACHE_VERSION, "files": stats, "jsonl_field": jsonl_field,
                            "eos": tokenizer.eos_token_id, "tokenizer": tokenizer.tokenizer.to_str(), **settings})
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer, progress: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The flat uint32 stream of `encode(doc) + [eos]` over `documents`, and the int64 document offsets [d + 1],
    with a progress bar (`progress`)."""
    chunks, lengths = [], []
    eos = [tokenizer.eos_token_id]
    with tqdm(desc="tokenizing", unit=" docs", disable=not progress, file=sys.stderr) as bar:
        for texts in _chunks(documents, _TOKENIZE_CHUNK):
            ids = [e.ids + eos for e in tokenizer.tokenizer.encode_batch(texts)]
            lengths.extend(len(i) for i in ids)
            chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.uint32))
            bar.update(len(texts))
    tokens_t = np.concatenate(chunks) if chunks else np.zeros(0, np.uint32)
    return tokens_t, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class RemoteTokens:
    """A cached .npy token stream in an object store, read by byte ranges: `tokens[a:b]` fetches those tokens
    only, and `read(ranges)` several slices in one batch of concurrent requests."""

    def __init__(self, url: str):
        self.url = url
        head = io.BytesIO(storage.read_range(url, 0, 4096))  # an .npy header is 128 bytes, 4 KiB at the most
        try:
            version = np.lib.format.read_magic(head)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, self.dtype = read_header(head)
        except ValueError as e:
            raise ValueError(f"not an .npy array ({one_line(e)})") from None
        self.shape, self._start = shape, head.tell()
        self.ndim = len(shape)
        size, _ = storage.size_and_version(url)
        if self.ndim == 1 and size != self._start + shape[0] * self.dtype.itemsize:
            raise ValueError(f"{size} bytes, not the {self._start + shape[0] * self.dtype.itemsize} its header "
                             "declares")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, window: slice) -> np.ndarray:
        return self.read([(window.start or 0, len(self) if window.stop is None else window.stop)])[0]

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Tokens [a, b) for each (a, b) of `ranges`."""
        size = self.dtype.itemsize
        pieces = storage.read_ranges(self.url, [(self._start + a * size, self._start + b * size) for a, b in ranges])
        return [np.frombuffer(piece, self.dtype) for piece in pieces]


def read_token_ranges(tokens_t: np.ndarray | RemoteTokens, ranges: Sequence[tuple[int, int]]
                      ) -> list[np.ndarray]:
    """Tokens [a, b) of a stream for each (a, b) of `ranges` (from a `RemoteTokens`: one batch of requests)."""
    if isinstance(tokens_t, RemoteTokens):
        return tokens_t.read(ranges)
    return [tokens_t[a:b] for a, b in ranges]


class CacheEntry:
    """One cached set of arrays, 1-D each, under a key: KEY.NAME.npy for each (NAME, dtype) of `dtypes`, and
    KEY.json, written last (its presence means the entry is complete), with the CRC-32 of each array and, in an
    object store, the generation the first (the token stream, which is read by ranges there, never whole) was
    stored as: it is checked by that, which costs no read of it (GCS keeps the bytes an object was written with,
    under its checksum, until it is rewritten). `check(arrays)` says what is wrong with arrays that parse, or
    None."""

    def __init__(self, cache: str, key: str, dtypes: dict[str, type], check=lambda arrays: None):
        self.cache, self.remote, self.dtypes, self.check = cache, is_remote(cache), dtypes, check
        self.files = {name: join(cache, f"{key}.{name}.npy") for name in dtypes}
        self.checksums_file = join(cache, f"{key}.json")
        self.streamed = next(iter(dtypes))

    def complete(self) -> bool:
        return storage.is_file(self.checksums_file)

    def read(self, progress: bool) -> dict[str, np.ndarray | RemoteTokens] | None:
        """The arrays, memory-mapped (the first read by ranges from a URL); None, with a warning and the entry
        removed, when it is damaged (a file cut short, overwritten, or with flipped bits: the next load tokenizes
        again). Checked: every file parses as the array it should be, `check` finds nothing wrong, and each array
        has the CRC-32 it was written with (zlib, 2.3 GB/s measured: 1.7 s for a billion tokens, whose tokenizing
        took hours); in an object store, the token stream its generation."""
        checked = self._checked(progress)
        if isinstance(checked, dict):
            return checked
        log.warning(f"the tokenized data cache in {self.cache} is damaged ({checked}): tokenizing again")
        self.remove()
        return None

    def _checked(self, progress: bool) -> dict[str, np.ndarray | RemoteTokens] | str:
        """The arrays, or what is wrong with the entry."""
        checksums_name = storage.name_of(self.checksums_file)
        try:
            written = json.loads(storage.read_bytes(self.checksums_file) or b"")
            expected = written["crc32"]
        except (ValueError, OSError, KeyError, TypeError) as e:
            return f"{checksums_name}: {one_line(e)}"
        if not isinstance(expected, dict):
            return f"{checksums_name}: no checksums"
        arrays = {}
        for name, dtype in self.dtypes.items():
            path = self.files[name]
            try:
                array = self._load(path, name)
            except (ValueError, OSError, EOFError) as e:
                return f"{storage.name_of(path)}: {one_line(e)}"
            if array.dtype != dtype or array.ndim != 1:
                return (f"{storage.name_of(path)}: {array.dtype} [{', '.join(map(str, array.shape))}], not "
                        f"{np.dtype(dtype)} [n]")
            arrays[name] = array
        wrong = self.check(arrays)
        if wrong is not None:
            return wrong
        streamed = self.files[self.streamed]
        if self.remote and list(storage.size_and_version(streamed)) != written.get(f"{self.streamed}.npy"):
            return f"{storage.name_of(streamed)}: rewritten since it was cached"
        for name, array in arrays.items():
            if isinstance(array, RemoteTokens):
                continue  # checked by its generation above
            if _crc32(array, progress) != expected.get(f"{name}.npy"):
                return f"{storage.name_of(self.files[name])}: its CRC-32 is not the one it was written with"
        return arrays

    def _load(self, path: str, name: str) -> np.ndarray | RemoteTokens:
        if not self.remote:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if name == self.streamed:
            return RemoteTokens(path)
        return np.load(io.BytesIO(storage.read_bytes(path) or b""), allow_pickle=False)

    def write(self, arrays: dict[str, np.ndarray], cache_setting: str) -> None:
        """Writes the entry, checksums last; on a full or unwritable disk, or a fault on the wire, one
        `BloomJaxError` naming the cache, what the entry needs and `cache_setting`, with nothing of the entry
        left (but after a fault on the wire: without its checksums, nothing of it is ever read)."""
        written: dict = {"crc32": {f"{name}.npy": _crc32(array) for name, array in arrays.items()}}
        try:
            storage.make_dirs(self.cache)
            for name, array in arrays.items():
                _save(self.files[name], lambda f, array=array: np.save(_Writes(f), array))
            if self.remote:
                written[f"{self.streamed}.npy"] = list(storage.size_and_version(self.files[self.streamed]))
            _save(self.checksums_file, lambda f: f.write(json.dumps(written).encode()))
        except BaseException as error:
            if storage.wire_error(error) is None:
                self.remove()
            if isinstance(error, BloomJaxError):
                raise BloomJaxError(f"{error}; set {cache_setting} elsewhere") from None
            code = disk_error(error) if isinstance(error, OSError) else None
            if code is None:
                raise
            needed = sum(array.nbytes for array in arrays.values())
            elsewhere = "a directory with room" if code in (errno.ENOSPC, errno.EDQUOT) else "a writable directory"
            raise BloomJaxError(f"cannot cache the tokenized data in {self.cache}: {DISK_ERRORS[code]}"
                                f"{room(code, needed, Path(self.cache))}; set {cache_setting} to {elsewhere}"
                                ) from None

    def remove(self) -> None:
        """Removes what exists of the entry (an unwritable cache is reported by the write that follows)."""
        for path in (self.checksums_file, *self.files.values()):  # the mark of completeness first
            with contextlib.suppress(OSError, BloomJaxError):
                storage.remove(path)


def offsets_problem(offsets: np.ndarray, n_tokens: int, name: str) -> str | None:
    """What is wrong with item offsets into a token stream (they must run from 0 to `n_tokens`, never
    backwards), or None."""
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n_tokens:
        return f"{name}: the offsets do not run from 0 to the {n_tokens} tokens"
    if np.any(np.diff(offsets) < 0):
        return f"{name}: the offsets run backwards"
    return None


_TEXT_ARRAYS = {"tokens": np.uint32, "offsets": np.int64}


def _text_entry(cache: str, key: str) -> CacheEntry:
    """A tokenized corpus's entry: the token stream and the documents' offsets into it."""
    def check(arrays):
        return offsets_problem(arrays["offsets"], len(arrays["tokens"]), f"{key}.offsets.npy")

    return CacheEntry(cache, key, _TEXT_ARRAYS, check)


_CRC_CHUNK = 1 << 26  # bytes per zlib.crc32 call: a progress bar's step, and no copy of a memory-mapped array


def _crc32(array: np.ndarray, progress: bool = False) -> int:
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    crc = 0
    with tqdm(total=len(data), desc="checking the token cache", unit="B", unit_scale=True, file=sys.stderr,
              disable=not progress or len(data) < 16 * _CRC_CHUNK) as bar:
        for start in range(0, len(data), _CRC_CHUNK):
            crc = zlib.crc32(data[start:start + _CRC_CHUNK], crc)
            bar.update(min(_CRC_CHUNK, len(data) - start))
    return crc


class _Writes:
    """A file as a bare `write`: `np.save` then writes the array in 16 MiB chunks through it, whose failure on a
    full disk is an OSError with its errno (into a real file, numpy's `tofile` says only "30099 requested and
    4064 written")."""

    def __init__(self, file):
        self.write = file.write


def _save(location: str, write) -> None:
    """`write(file)` so that readers never see a partial file: locally into a temporary file in the same
    directory, then renamed; to a URL as one upload, committed when complete."""
    if is_remote(location):
        with storage.open_write(location) as f:
            write(f)
        return
    path = Path(location)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_documents(n_documents: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and eval document indices, each sorted: `eval_fraction` of the documents (rounded, at least one,
    never all) chosen by a permutation seeded with `seed`, held out for eval. `eval_fraction=0`: no eval.
    """
    if not 0 <= eval_fraction < 1:
        raise BloomJaxError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return np.arange(n_documents), np.zeros(0, np.int64)
    if n_documents < 2:
        raise BloomJaxError(f"cannot hold out eval documents from {n_documents} document: give more documents "
                            "(a text file is one document, a JSONL line is one) or set eval_fraction=0")
    n_eval = min(max(round(eval_fraction * n_documents), 1), n_documents - 1)
    order = np.random.default_rng([seed, 0]).permutation(n_documents)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


class PackedSplit:
    """A split's documents (each with its EOS) concatenated in corpus order and cut into `n_sequences` windows
    of `seq_len + 1` tokens; the tokens after the last full window are dropped.

    The split is read from the corpus stream (memory-mapped when cached) through its runs of consecutive
    documents, never copied whole.
    """

    def __init__(self, corpus: TokenizedCorpus, documents: np.ndarray, seq_len: int, seed: int):
        self.documents = np.asarray(documents, np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self._tokens_t = corpus.tokens_t
        run_firsts = np.flatnonzero(np.diff(self.documents, prepend=-2) != 1)  # runs of consecutive documents
        run_lasts = np.flatnonzero(np.diff(self.documents, append=-2) != 1)
        self._source_r = corpus.doc_offsets[self.documents[run_firsts]]
        run_lengths = corpus.doc_offsets[self.documents[run_lasts] + 1] - self._source_r
        self._start_r1 = np.concatenate([[0], np.cumsum(run_lengths, dtype=np.int64)])  # [runs + 1]
        self.n_tokens = int(self._start_r1[-1])
        self.n_sequences = self.n_tokens // (seq_len + 1)

    def _ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Where tokens [start, stop) of the split's stream are in the corpus stream: a range per run crossed."""
        run = int(np.searchsorted(self._start_r1, start, side="right")) - 1
        ranges = []
        while start < stop:
            offset = int(self._source_r[run] + start - self._start_r1[run])
            take = int(min(stop, self._start_r1[run + 1]) - start)
            ranges.append((offset, offset + take))
            start += take
            run += 1
        return ranges

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of the split's stream, uint32."""
        stop = self.n_tokens if stop is None else stop
        pieces = read_token_ranges(self._tokens_t, self._ranges(start, stop))
        return np.concatenate([np.zeros(0, np.uint32), *pieces])

    def sequences(self, indices: Sequence[int]) -> np.ndarray:
        """Windows `indices`: int32 [len(indices), seq_len + 1] (inputs = [:, :-1], targets = [:, 1:]), read at
        once (from a cache at a URL: one batch of concurrent range requests)."""
        width = self.seq_len + 1
        per_window = [self._ranges(int(i) * width, (int(i) + 1) * width) for i in indices]
        pieces = iter(read_token_ranges(self._tokens_t, [r for ranges in per_window for r in ranges]))
        rows = [np.concatenate([next(pieces) for _ in ranges]) for ranges in per_window]
        return np.stack(rows).astype(np.int32) if rows else np.zeros((0, width), np.int32)

    def sequence(self, index: int) -> np.ndarray:
        """Window `index`: int32 [seq_len + 1] (inputs = [:-1], targets = [1:])."""
        return self.sequences([index])[0]

    def train_batches(self, global_batch: int) -> TrainBatches:
        """Endless shuffled batches of `global_batch` windows by step, seeded with this split's seed."""
        return TrainBatches(self, global_batch, self.seed)

    def eval_batches(self, n_batches: int, batch_size: int, process_index: int = 0, process_count: int = 1
                     ) -> Iterator[np.ndarray]:
        """The split's first windows in order: `n_batches` batches int32 [batch_size, seq_len + 1], or fewer when
        the split is short (windows after the last full batch are left out, so every batch has one shape).

        With `process_count` > 1, each batch is this process's rows (see `TrainBatches.local`).
        """
        per = process_share(batch_size, process_index, process_count)
        if self.n_sequences < batch_size:
            raise BloomJaxError(f"the eval split has {self.n_sequences} sequences of {self.seq_len + 1} tokens, "
                                f"fewer than one eval batch of {batch_size}")
        width = self.seq_len + 1
        firsts = (b * batch_size + process_index * per for b in range(min(n_batches, self.n_sequences // batch_size)))
        return (self.tokens(f * width, (f + per) * width).reshape(per, width).astype(np.int32) for f in firsts)


def process_share(global_batch: int, process_index: int, process_count: int) -> int:
    """Rows per process of a global batch, checking the arguments."""
    if global_batch < 1:
        raise BloomJaxError(f"batch size must be at least 1, got {global_batch}")
    if not 0 <= process_index < process_count:
        raise BloomJaxError(f"process index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise BloomJaxError(f"batch size {global_batch} does not divide among {process_count} processes")
    return global_batch // process_count


class TrainBatches:
    """The training batches of a split by optimizer step: endless, reshuffled each epoch, random access.

    Row r of the endless stream is window `perm_e(r mod n)` of epoch e = r // n (n windows, perm_e grain's seeded
    index shuffle, a new permutation each epoch); global batch `step` is rows [step * B, (step + 1) * B). A batch
    straddles two epochs when B does not divide n. Reading a batch reads only its rows.
    """

    def __init__(self, split: PackedSplit, global_batch: int, seed: int):
        process_share(global_batch, 0, 1)
        if split.n_sequences == 0:
            raise BloomJaxError(f"the split has {split.n_tokens} tokens, fewer than one sequence of "
                                f"{split.seq_len + 1}")
        self.split = split
        self.global_batch = global_batch
        self._order = grain.MapDataset.range(split.n_sequences).shuffle(seed=_shuffle_seed(seed)).repeat()
        self._batched: dict[int, grain.MapDataset] = {}  # rows per batch -> batched rows, built once (grain's stats)

    def __getitem__(self, step: int) -> np.ndarray:
        return self.get(step)

    def get(self, step: int) -> np.ndarray:
        """Global batch `step`: int32 [global_batch, seq_len + 1]."""
        return self.local(step, 0, 1)

    def local(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """This process's rows [process_index * per, (process_index + 1) * per) of global batch `step`, with
        per = global_batch / process_count: int32 [per, seq_len + 1]."""
        per = process_share(self.global_batch, process_index, process_count)
        _check_step(step)
        return self._batches_of(per)[step * process_count + process_index]

    def _batches_of(self, rows: int) -> grain.MapDataset:
        """The row stream cut into batches of `rows`: batch k is rows [k * rows, (k + 1) * rows), its windows read
        together."""
        if rows not in self._batched:
            self._batched[rows] = self._order.batch(rows).map(self.split.sequences)
        return self._batched[rows]

    def indices(self, step: int) -> np.ndarray:
        """The window indices (into the split) of global batch `step`, int64 [global_batch]: for logging or
        checking which data a step saw."""
        _check_step(step)
        return np.array([self._order[r] for r in range(step * self.global_batch, (step + 1) * self.global_batch)])

    def iterate(self, start_step: int = 0, process_index: int = 0, process_count: int = 1, prefetch: int = 4
                ) -> Iterator[np.ndarray]:
        """`local(step, ...)` for step = start_step, start_step + 1, ... forever, read ahead `prefetch` batches
        by a background thread."""
        process_share(self.global_batch, process_index, process_count)
        _check_step(start_step)
        shares = self._batches_of(self.global_batch // process_count)
        mine = shares[start_step * process_count + process_index::process_count]
        return iter(mine.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))

    def epoch(self, step: int) -> float:
        """How many passes over the split the batches before `step` made."""
        return step * self.global_batch / self.split.n_sequences


def _check_step(step: int) -> None:
    if step < 0:
        raise BloomJaxError(f"step must be non-negative, got {step}")


def _shuffle_seed(seed: int) -> int:
    """grain's shuffle seed for `seed`: hashed, since grain seeds epoch e with seed + e (so seed 1's first epoch
    would otherwise be seed 0's second)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus split by document into packed `train` and `eval` (empty when eval_fraction=0); or
    instruction data split by example (`bloom_jax.sft`: an `SftCorpus` and its `SftSplit`s)."""

    tokens: TokenizedCorpus
    train: PackedSplit
    eval: PackedSplit

    def stats(self) -> dict:
        """Counts for logging: documents and tokens overall, and documents, tokens and sequences per split."""
        splits = {name: {"documents": len(s.documents), "tokens": s.n_tokens, "sequences": s.n_sequences}
                  for name, s in (("train", self.train), ("eval", self.eval))}
        return {"documents": self.tokens.n_documents, "tokens": self.tokens.n_tokens,
                "tokenized": self.tokens.tokenized, **splits}


def load_corpus(files: Files, tokenizer: Tokenizer, seq_len: int, cache_dir: str | os.PathLike,
                eval_fraction: float = 0.01, seed: int = 0, jsonl_field: str = "text", progress: bool = True,
                cache_setting: str = "data_cache") -> Corpus:
    """The documents of `files`, tokenized (or read from `cache_dir`), split into train and eval by a permutation
    seeded with `seed` (which also seeds the training shuffle) and packed into windows of `seq_len + 1`.
    `cache_setting`: what the user sets to move the cache, named in the error of a full or unwritable one.

    Errors when the train split has less than one window, or when eval_fraction > 0 and the eval split has none.
    """
    if seq_len < 1:
        raise BloomJaxError(f"seq_len must be at least 1, got {seq_len}")
    if seed < 0:
        raise BloomJaxError(f"seed must be non-negative, got {seed}")
    corpus = TokenizedCorpus.load(files, tokenizer, cache_dir, jsonl_field, progress, cache_setting)
    train_d, eval_d = split_documents(corpus.n_documents, eval_fraction, seed)
    train, held_out = (PackedSplit(corpus, d, seq_len, seed) for d in (train_d, eval_d))
    if train.n_sequences == 0:
        raise BloomJaxError(f"too little text: the train split has {train.n_tokens} tokens in {len(train_d)} "
                            f"documents, fewer than one sequence of seq_len + 1 = {seq_len + 1}")
    if eval_fraction > 0 and held_out.n_sequences == 0:
        raise BloomJaxError(f"too little eval text: the eval split has {held_out.n_tokens} tokens in {len(eval_d)} "
                            f"of {corpus.n_documents} documents, fewer than one sequence of seq_len + 1 = "
                            f"{seq_len + 1}; raise eval_fraction, lower seq_len or set eval_fraction=0")
    return Corpus(corpus, train, held_out)
