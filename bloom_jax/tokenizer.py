"""BLOOM's tokenizer through the `tokenizers` library: left-padded batches and streaming decoding.

The checkpoint's `tokenizer.json` (byte-level BPE) is used as is, its own normaliser, pre-tokeniser and
post-processor included, so ids equal transformers' `AutoTokenizer` on the same file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bloom_jax.errors import BloomJaxError

_INCOMPLETE = "\ufffd"  # what a decoder yields for the first bytes of an unfinished UTF-8 character


class Tokenizer:
    """Encodes batches of prompts, left-padded, and decodes ids (whole or streamed)."""

    def __init__(self, tokenizer, pad_token_id: int = 3, eos_token_id: int = 2):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, pad_token_id: int = 3, eos_token_id: int = 2) -> Tokenizer:
        """The `tokenizer.json` of a checkpoint directory (converted or Hugging Face)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise BloomJaxError(f"no tokenizer.json in {directory}")
        return cls.from_json(path.read_bytes(), str(path), pad_token_id, eos_token_id)

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "tokenizer.json", pad_token_id: int = 3,
                  eos_token_id: int = 2) -> Tokenizer:
        """A tokenizer from the text of a `tokenizer.json` (`source` names it in errors)."""
        from tokenizers import Tokenizer as HfTokenizer

        try:
            text = data.decode() if isinstance(data, bytes) else data
            return cls(HfTokenizer.from_str(text), pad_token_id, eos_token_id)
        except Exception as e:
            raise BloomJaxError(f"cannot read {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                ) from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `tokenizer.json` into `directory` (created if missing), for `from_dir` or transformers."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 [b, s] left-padded with `pad_token_id`, and the mask [b, s] (1 = token).

        s is the longest prompt, or `length` (which must fit the longest) to reuse a compiled shape.
        """
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        longest = max((len(ids) for ids in encoded), default=0)
        length = longest if length is None else length
        if longest > length:
            raise BloomJaxError(f"a prompt has {longest} tokens, more than the length {length}")
        return left_pad(encoded, length, self.pad_token_id)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def train_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int, jsonl_field: str = "text") -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens trained on the documents of `files`, built like BLOOM's:
    its pre-tokeniser (regex split, then bytes), byte-level decoder and special tokens <unk>=0, <s>=1, </s>=2 (EOS),
    <pad>=3. Files are read by `bloom_jax.data.iter_documents` (same rules as training data).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HfTokenizer

    from bloom_jax.data import expand_files, iter_documents  # data imports this module

    special_tokens = ["<unk>", "<s>", "</s>", "<pad>"]  # in id order
    if vocab_size < len(special_tokens) + 256:
        raise BloomJaxError(f"vocab_size must be at least 260 (4 special tokens and 256 bytes), got {vocab_size}")
    paths = expand_files(files)  # path errors now, not from inside the trainer
    tok = HfTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # A run of non-space, non-punctuation characters with its leading space; the rest split off as is.
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_documents(paths, jsonl_field), trainer)
    return Tokenizer(tok, pad_token_id=3, eos_token_id=2)


def left_pad(rows: list[list[int]], length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [b, length], each row right-aligned after `pad_token_id`s, and the mask [b, length]
    (1 = token). Rows must fit `length`."""
    ids_bs = np.full((len(rows), length), pad_token_id, np.int32)
    mask_bs = np.zeros((len(rows), length), np.int32)
    for row, ids in enumerate(rows):
        if ids:
            ids_bs[row, length - len(ids):] = ids
            mask_bs[row, length - len(ids):] = 1
    return ids_bs, mask_bs


class StreamDecoder:
    """Turns ids arriving one by one into text pieces that never split a multi-byte character.

    Each `push` decodes a short window of recent ids and returns the new text once it no longer ends in an
    incomplete character; concatenated pieces equal `decode` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are settled text
        self._read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix:self._read])
        text = decode(self._ids[self._prefix:])
        if len(text) <= len(emitted) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes as U+FFFD, as `decode` would)."""
        decode = self._tokenizer.decode
        rest = decode(self._ids[self._prefix:])[len(decode(self._ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self._ids)
        return rest
