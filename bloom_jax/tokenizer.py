"""BLOOM's tokenizer through the `tokenizers` library: left-padded batches, streaming decoding, BPE training.

The checkpoint's `tokenizer.json` (byte-level BPE) is used as is, its own normaliser, pre-tokeniser and
post-processor included, so ids equal transformers' `AutoTokenizer` on the same file.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.storage import Location, join


class Tokenizer:
    """Encodes batches of prompts, left-padded, and decodes ids (whole or streamed)."""

    def __init__(self, tokenizer, pad_token_id: int = 3, eos_token_id: int = 2):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, directory: Location, pad_token_id: int = 3, eos_token_id: int = 2) -> Tokenizer:
        """The `tokenizer.json` of a checkpoint directory (converted or Hugging Face; a local path or a URL)."""
        path = join(directory, "tokenizer.json")
        data = storage.read_bytes(path)
        if data is None:
            raise BloomJaxError(f"no tokenizer.json in {directory}")
        return cls.from_json(data, path, pad_token_id, eos_token_id)

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "tokenizer.json", pad_token_id: int = 3,
                  eos_token_id: int = 2) -> Tokenizer:
        """A tokenizer from the text of a `tokenizer.json` (`source` names it in errors)."""
        from tokenizers import Tokenizer as HfTokenizer

        try:
            text = data.decode() if isinstance(data, bytes) else data
            return cls(HfTokenizer.from_str(text), pad_token_id, eos_token_id)
        except Exception as e:
            raise BloomJaxError(f"cannot read {source}: {one_line(e)}") from None

    def save(self, directory: Location) -> str:
        """Writes `tokenizer.json` into `directory` (a local path, created if missing, or a URL), for `from_dir`
        or transformers. Returns its path."""
        path = join(directory, "tokenizer.json")
        storage.write_bytes(path, self.tokenizer.to_str(pretty=True).encode())  # as `tokenizers` saves it
        return path

    def to_json(self) -> str:
        """The text of its `tokenizer.json`."""
        return self.tokenizer.to_str()

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

    def stream(self) -> TextStream:
        return TextStream(self)


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens trained on `documents` (texts; for files,
    `bloom_jax.data.iter_documents`), built like BLOOM's: its pre-tokeniser (regex split, then bytes),
    byte-level decoder and special tokens <unk>=0, <s>=1, </s>=2 (EOS), <pad>=3.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HfTokenizer

    special_tokens = ["<unk>", "<s>", "</s>", "<pad>"]  # in id order
    if vocab_size < len(special_tokens) + 256:
        raise BloomJaxError(f"vocab_size must be at least 260 (4 special tokens and 256 bytes), got {vocab_size}")
    tok = HfTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # A run of non-space, non-punctuation characters with its leading space; the rest split off as is.
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
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


class TextStream:
    """Turns ids arriving one by one into text pieces that never split a multi-byte character, through
    `tokenizers`' own `DecodeStream`; the pieces and `flush()` concatenated equal `decode` of all the ids."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0  # characters of text returned so far

    def push(self, token_id: int) -> str:
        """The new text that `token_id` settles ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tokenizer.tokenizer, int(token_id)) or ""
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Whatever is left: an unfinished character, decoded as U+FFFD as `decode` does."""
        rest = self._tokenizer.decode(self._ids)[self._emitted:]
        self._emitted += len(rest)
        return rest
