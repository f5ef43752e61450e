"""Instruction data for supervised fine-tuning (SFT), as BLOOMZ was tuned on xP3: prompt/completion examples,
the loss on the completion only.

1. `detect_format`, `iter_examples`: files of records (`bloom_jax.records`: JSONL lines, Parquet or Arrow rows, a
   saved Hugging Face dataset) that are
   - prompt/completion: two strings (`prompt` and `completion`, other names given, or xP3's `inputs` and
     `targets`);
   - chat: `messages`, a list of {"role", "content"}: the prompt is the conversation before its last message,
     rendered by a chat template with the assistant's turn opened, and the completion is that last message, the
     assistant's.
   A record that lacks a field, or whose completion is empty, is an error naming the file, the line (or row) and
   the field.
2. `SftCorpus.load`: each example tokenized once, as tokens(prompt) + tokens(completion) + [EOS] (encoded apart,
   so the boundary is exact), cached as text is (`bloom_jax.data.CacheEntry`: the token stream, the examples'
   offsets into it and their prompts' lengths).
3. `SftSplit`: one example per row of `seq_len + 1` tokens, padded with the pad token after it, or with `packing`
   as many as fit (best fit, longest first), kept apart by segment ids; the loss mask marks the targets that are
   completion tokens (the answer and its EOS), or with `completion_only=False` every token of the examples but
   their first. An example longer than a row is truncated (its prompt's start cut first, then, where the
   answer alone is longer, the answer's end) or dropped (`too_long`), and the log counts them. The rows shuffle by
   epoch and batch by step as text's windows do (`bloom_jax.data.TrainBatches`): a batch is
   {"tokens": int32 [b, seq_len + 1], "loss_mask": float32 [b, seq_len]}, and "segment_ids" int32
   [b, seq_len + 1] with packing.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from bloom_jax import storage
from bloom_jax.chat import ChatTemplate
from bloom_jax.data import (
    CacheEntry,
    Corpus,
    Files,
    TrainBatches,
    cache_key,
    expand_files,
    inside,
    offsets_problem,
    process_share,
    read_token_ranges,
    split_documents,
)
from bloom_jax.errors import BloomJaxError
from bloom_jax.log import get_logger
from bloom_jax.recipe import DATA_FORMATS, SFT_FORMATS, TOO_LONG
from bloom_jax.records import is_records, records
from bloom_jax.tokenizer import Tokenizer

log = get_logger(__name__)

XP3_FIELDS = ("inputs", "targets")
_TOKENIZE_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Fields:
    """How examples are read: the data format and the names of the fields that hold them."""

    format: str = "prompt_completion"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def detect_format(files: Files, fields: Fields, data_format: str = "auto", text_field: str = "text") -> Fields:
    """The format of the data (`data_format`, or with "auto" what the first record of each file holds:
    `messages`, a prompt and a completion, xP3's `inputs` and `targets`, or text), with the fields it is read by.
    Files of different formats are an error; files that are not records (plain text) are text."""
    if data_format not in DATA_FORMATS:
        raise BloomJaxError(f"data_format must be one of {', '.join(DATA_FORMATS)}, not {data_format!r}")
    if data_format != "auto":
        return dataclasses.replace(fields, format=data_format)
    found: dict[str, Fields] = {}
    for path in expand_files(files):
        record = {}
        if is_records(path):
            with contextlib.closing(records(path)) as rows:
                record = next(rows, ("", {}))[1]
        if fields.messages in record:
            found[path] = dataclasses.replace(fields, format="chat")
        elif fields.prompt in record and fields.completion in record:
            found[path] = dataclasses.replace(fields, format="prompt_completion")
        elif all(name in record for name in XP3_FIELDS) and text_field not in record:
            found[path] = dataclasses.replace(fields, format="prompt_completion", prompt=XP3_FIELDS[0],
                                              completion=XP3_FIELDS[1])
        else:
            found[path] = dataclasses.replace(fields, format="text")
    kinds = {f.format for f in found.values()}
    if len(kinds) > 1:
        examples = {f.format: path for path, f in found.items()}
        raise BloomJaxError("the data files mix formats (" + ", ".join(f"{path}: {kind}" for kind, path in
                                                                      sorted(examples.items())) + "): set data_format")
    distinct = set(found.values())
    if len(distinct) > 1:
        raise BloomJaxError("the data files name their prompts and completions differently: set prompt_field and "
                            "completion_field")
    return distinct.pop()


def iter_examples(files: Files, fields: Fields, template: ChatTemplate | None = None) -> Iterator[tuple[str, str]]:
    """(prompt, completion) of each example of `files` (JSONL, Parquet or Arrow records), in order; chat needs
    `template`."""
    if fields.format not in SFT_FORMATS:
        raise BloomJaxError(f"not a format of prompts and completions: {fields.format}")
    if fields.format == "chat" and template is None:
        raise BloomJaxError("chat data needs a chat template: the base checkpoint's tokenizer config has none; set "
                            "chat_template (a file, a URL or the template's text)")
    columns = [fields.messages] if fields.format == "chat" else [fields.prompt, fields.completion]
    for path in expand_files(files):
        if not is_records(path):
            raise BloomJaxError(f"{path}: not a file of records (.jsonl, .json, .parquet or .arrow), which "
                                f"{fields.format} data must be")
        for where, record in records(path, columns):
            if fields.format == "chat":
                yield _chat_example(record, fields.messages, template, where)
                continue
            prompt, completion = (_string(record, name, where) for name in (fields.prompt, fields.completion))
            if not completion.strip():
                raise BloomJaxError(f"{where}: empty {fields.completion!r}")
            yield prompt, completion


def _string(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise BloomJaxError(f"{where}: no string field {name!r}")
    return value


def _chat_example(record: dict, name: str, template: ChatTemplate, where: str) -> tuple[str, str]:
    messages = record.get(name)
    if not isinstance(messages, list) or not messages:
        raise BloomJaxError(f"{where}: no list of messages in field {name!r}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BloomJaxError(f"{where}: {name}[{i}] is not a {{\"role\", \"content\"}} message")
    last = messages[-1]
    if last["role"] != "assistant":
        raise BloomJaxError(f"{where}: the last of {name} is the {last['role']}'s, not the assistant's (its answer "
                            "is what is trained)")
    if not last["content"].strip():
        raise BloomJaxError(f"{where}: empty assistant answer in {name}")
    try:
        prompt = template.render(messages[:-1])
    except ValueError as e:
        raise BloomJaxError(f"{where}: {e}") from None
    return prompt, last["content"]


@dataclasses.dataclass(frozen=True)
class SftCorpus:
    """Every example as tokens(prompt) + tokens(completion) + [EOS] in one flat stream: example i is
    `tokens_t[offsets[i]:offsets[i + 1]]`, its first `prompt_lengths[i]` tokens the prompt. `tokenized`: whether
    this load ran the tokenizer (False: read from the cache)."""

    tokens_t: np.ndarray  # uint32 [total tokens] (or, from a cache at a URL, a `bloom_jax.data.RemoteTokens`)
    offsets: np.ndarray  # int64 [examples + 1]
    prompt_lengths: np.ndarray  # int64 [examples]
    tokenized: bool

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens_t)

    @classmethod
    def load(cls, files: Files, tokenizer: Tokenizer, cache_dir: str | os.PathLike, fields: Fields,
             template: ChatTemplate | None = None, progress: bool = True,
             cache_setting: str = "data_cache") -> SftCorpus:
        """The examples of `files` from `cache_dir` (a directory or URL) if cached under the same key, else
        tokenized and cached. The key is text's (`bloom_jax.data.cache_key`) with the format, its fields and the
        chat template."""
        cache = storage.normalize(cache_dir)
        paths = [p for p in expand_files(files) if not inside(p, cache)]
        if not paths:
            raise BloomJaxError(f"no data files outside the cache directory {cache_dir}")
        key = cache_key(paths, tokenizer, "", sft=dataclasses.asdict(fields),
                        template=template.source if template is not None and fields.format == "chat" else None)
        entry = _sft_entry(cache, key)
        if entry.complete():
            cached = entry.read(progress)
            if cached is not None:
                return cls(cached["tokens"], cached["offsets"], cached["prompts"], tokenized=False)
        tokens_t, offsets, prompt_lengths = tokenize_examples(iter_examples(paths, fields, template), tokenizer,
                                                              progress)
        if len(offsets) == 1:
            raise BloomJaxError(f"no examples in {', '.join(paths)}")
        entry.write({"tokens": tokens_t, "offsets": offsets, "prompts": prompt_lengths}, cache_setting)
        return cls(tokens_t, offsets, prompt_lengths, tokenized=True)


def _sft_entry(cache: str, key: str) -> CacheEntry:
    def check(arrays):
        offsets, prompts = arrays["offsets"], arrays["prompts"]
        wrong = offsets_problem(offsets, len(arrays["tokens"]), f"{key}.offsets.npy")
        if wrong is None and (len(prompts) != len(offsets) - 1 or np.any(prompts < 0)
                              or np.any(prompts >= np.diff(offsets))):
            wrong = f"{key}.prompts.npy: the prompts' lengths do not fit their examples"
        return wrong

    return CacheEntry(cache, key, {"tokens": np.uint32, "offsets": np.int64, "prompts": np.int64}, check)


def tokenize_examples(examples: Iterable[tuple[str, str]], tokenizer: Tokenizer, progress: bool = True
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat uint32 stream of `encode(prompt) + encode(completion) + [eos]` over `examples`, the examples'
    int64 offsets [n + 1] and their prompts' lengths int64 [n]."""
    chunks, lengths, prompts = [], [], []
    eos = [tokenizer.eos_token_id]
    iterator = iter(examples)
    with tqdm(desc="tokenizing", unit=" examples", disable=not progress, file=sys.stderr) as bar:
        while chunk := list(itertools.islice(iterator, _TOKENIZE_CHUNK)):
            prompt_ids = tokenizer.tokenizer.encode_batch([p for p, _ in chunk])
            completion_ids = tokenizer.tokenizer.encode_batch([c for _, c in chunk])
            ids = [p.ids + c.ids + eos for p, c in zip(prompt_ids, completion_ids)]
            prompts.extend(len(p.ids) for p in prompt_ids)
            lengths.extend(len(i) for i in ids)
            chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.uint32))
            bar.update(len(chunk))
    tokens_t = np.concatenate(chunks) if chunks else np.zeros(0, np.uint32)
    return (tokens_t, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
            np.asarray(prompts, np.int64).reshape(-1))


class SftSplit:
    """A split's examples as rows of `seq_len + 1` tokens (see the module's docstring): `sequences(indices)` is
    {"tokens": int32 [k, seq_len + 1], "loss_mask": float32 [k, seq_len]}, and with `packing`
    {"segment_ids": int32 [k, seq_len + 1]} too: then a row holds as many whole examples as fit (best fit, the
    longest first), the k-th of them marked k in the segment ids (0 for padding), each attending only to itself."""

    def __init__(self, corpus: SftCorpus, examples: np.ndarray, seq_len: int, seed: int, pad_token_id: int,
                 completion_only: bool = True, too_long: str = "truncate", name: str = "train",
                 packing: bool = False):
        if too_long not in TOO_LONG:
            raise BloomJaxError(f"too_long must be one of {', '.join(TOO_LONG)}, not {too_long!r}")
        self.seq_len, self.seed, self.pad, self.completion_only = seq_len, seed, pad_token_id, completion_only
        self.packing = packing
        self._tokens_t = corpus.tokens_t
        width = seq_len + 1
        examples = np.asarray(examples, np.int64)
        starts, ends = corpus.offsets[examples], corpus.offsets[examples + 1]
        prompts = corpus.prompt_lengths[examples]
        lengths = ends - starts
        long = lengths > width
        if np.any(long):
            what = "truncated (the prompt's start cut first)" if too_long == "truncate" else "dropped"
            log.info(f"{name} split: {int(long.sum())} of {len(examples)} examples are longer than {width} tokens: "
                     f"{what}")
        if too_long == "drop":
            keep = ~long
            examples, starts, ends, prompts = examples[keep], starts[keep], ends[keep], prompts[keep]
        else:  # the answer kept whole where it fits beside one prompt token, else its end cut
            answers = ends - starts - prompts
            kept_answers = np.minimum(answers, width - 1)
            kept_prompts = np.minimum(prompts, width - kept_answers)
            starts = np.where(long, starts + prompts - kept_prompts, starts)
            ends = np.where(long, starts + kept_prompts + kept_answers, ends)
            prompts = np.where(long, kept_prompts, prompts)
        self.documents = examples
        self._starts, self._ends, self._prompts = starts, ends, prompts
        # Row r holds examples _order[_row_offsets[r]:_row_offsets[r + 1]] (positions in this split).
        if not packing:
            self._order, self._row_offsets = np.arange(len(examples)), np.arange(len(examples) + 1)
        else:
            self._order, self._row_offsets = _best_fit(ends - starts, width)
            if len(examples):
                log.info(f"{name} split: {len(examples)} examples packed into {len(self._row_offsets) - 1} rows of "
                         f"{width} tokens ({np.sum(ends - starts) / ((len(self._row_offsets) - 1) * width):.0%} of "
                         "them examples)")
        self.n_sequences = len(self._row_offsets) - 1
        self.n_tokens = int(np.sum(ends - starts))

    def sequences(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `indices`, read at once (from a cache at a URL: one batch of concurrent range requests)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        width = self.seq_len + 1
        members = [self._order[self._row_offsets[r]:self._row_offsets[r + 1]] for r in indices]
        pieces = iter(read_token_ranges(self._tokens_t, [(int(self._starts[e]), int(self._ends[e]))
                                                         for row in members for e in row]))
        tokens = np.full((len(indices), width), self.pad, np.int32)
        segments = np.zeros((len(indices), width), np.int32)
        # Target j predicts token j + 1: a completion token when j + 1 is at or past its example's prompt (every
        # token of it but its first without completion_only); none on the padding or across examples.
        mask = np.zeros((len(indices), width), np.float32)
        for row, examples in enumerate(members):
            at = 0
            for k, e in enumerate(examples, 1):
                piece = next(pieces)
                tokens[row, at:at + len(piece)] = piece
                segments[row, at:at + len(piece)] = k
                first = self._prompts[e] if self.completion_only else 1
                mask[row, at + first:at + len(piece)] = 1.0
                at += len(piece)
        batch = {"tokens": tokens, "loss_mask": mask[:, 1:]}
        if self.packing:
            batch["segment_ids"] = segments
        return batch

    def train_batches(self, global_batch: int) -> TrainBatches:
        """Endless shuffled batches of `global_batch` rows by step, seeded with this split's seed."""
        return TrainBatches(self, global_batch, self.seed)

    def eval_batches(self, n_batches: int, batch_size: int, process_index: int = 0, process_count: int = 1
                     ) -> Iterator[dict[str, np.ndarray]]:
        """The split's first rows in order: `n_batches` batches of `batch_size` rows, or fewer when the split is
        short (rows after the last full batch are left out); with `process_count` > 1, this process's rows of
        each."""
        per = process_share(batch_size, process_index, process_count)
        if self.n_sequences < batch_size:
            raise BloomJaxError(f"the eval split has {self.n_sequences} rows, fewer than one eval batch of "
                                f"{batch_size}")
        firsts = (b * batch_size + process_index * per for b in range(min(n_batches, self.n_sequences // batch_size)))
        return (self.sequences(np.arange(f, f + per)) for f in firsts)


def _best_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples of `lengths` (each <= width) packed into rows of `width`, longest first, each into the row with the
    least room that takes it (best-fit decreasing): (the examples in row order, the rows' offsets into it). The
    rows with each amount of room are kept by that amount, so each placement costs a bisection."""
    room_values: list[int] = []  # the distinct amounts of room rows have, sorted
    rows_with: dict[int, list[int]] = {}  # room -> rows with exactly that room
    rows: list[list[int]] = []
    for e in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[e])
        at = bisect.bisect_left(room_values, length)
        if at == len(room_values):
            row, room = len(rows), width
            rows.append([])
        else:
            room = room_values[at]
            row = rows_with[room].pop()
            if not rows_with[room]:
                del rows_with[room]
                room_values.pop(at)
        rows[row].append(e)
        left = room - length
        if left > 0:
            if left not in rows_with:
                bisect.insort(room_values, left)
                rows_with[left] = []
            rows_with[left].append(row)
    order = np.asarray([e for row in rows for e in row], np.int64)
    return order, np.concatenate([[0], np.cumsum([len(row) for row in rows], dtype=np.int64)])


def load_sft(files: Files, tokenizer: Tokenizer, seq_len: int, cache_dir: str | os.PathLike, fields: Fields,
             template: ChatTemplate | None = None, eval_fraction: float = 0.01, seed: int = 0,
             completion_only: bool = True, too_long: str = "truncate", progress: bool = True,
             cache_setting: str = "data_cache", packing: bool = False) -> Corpus:
    """The examples of `files`, tokenized (or read from `cache_dir`), split into train and eval by a permutation
    seeded with `seed` (which also seeds the training shuffle), as rows of `seq_len + 1` tokens (several to a row
    with `packing`)."""
    if seq_len < 1:
        raise BloomJaxError(f"seq_len must be at least 1, got {seq_len}")
    corpus = SftCorpus.load(files, tokenizer, cache_dir, fields, template, progress, cache_setting)
    train_e, eval_e = split_documents(corpus.n_documents, eval_fraction, seed)
    train, held_out = (SftSplit(corpus, e, seq_len, seed, tokenizer.pad_token_id, completion_only, too_long, name,
                                packing) for e, name in ((train_e, "train"), (eval_e, "eval")))
    if train.n_sequences == 0:
        raise BloomJaxError(f"no training examples fit in {seq_len + 1} tokens (too_long={too_long})")
    if eval_fraction > 0 and held_out.n_sequences == 0:
        raise BloomJaxError(f"no eval examples fit in {seq_len + 1} tokens (too_long={too_long}): raise "
                            "eval_fraction or seq_len, or set eval_fraction=0")
    return Corpus(corpus, train, held_out)


__all__ = ["Fields", "SftCorpus", "SftSplit", "detect_format", "iter_examples", "load_sft", "tokenize_examples"]
