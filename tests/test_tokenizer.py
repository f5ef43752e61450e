"""The tokenizer: left-padded batches equal transformers' on the same tokenizer.json; streaming decoding."""

from __future__ import annotations

import numpy as np
import pytest

from bloom_jax import BloomJaxError
from bloom_jax.tokenizer import Tokenizer

TEXTS = [
    "BLOOM is a multilingual language model. It was trained on 46 natural languages!",
    "Le modèle a été entraîné sur le supercalculateur Jean Zay, près de Paris.",
    "El modelo habla español, français, English y más… ¿verdad?",
    "大型语言模型。日本語も少し。 हिन्दी भी। العربية أيضا، 🌍🚀",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE with BLOOM's pre-tokeniser and special tokens, trained offline."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HfTokenizer

    tok = HfTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_left_padded_batch_equals_transformers(tokenizer_dir):
    import transformers

    ours = Tokenizer.from_dir(tokenizer_dir)
    ids, mask = ours.encode_batch(TEXTS)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                               pad_token="<pad>", padding_side="left")
    expected = ref(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids.dtype == np.int32 and (ids[mask == 0] == 3).all() and mask[:, -1].all()


def test_fixed_length_and_too_long(tokenizer_dir):
    ours = Tokenizer.from_dir(tokenizer_dir)
    longest = max(len(ours.encode(t)) for t in TEXTS)
    ids, mask = ours.encode_batch(TEXTS, length=longest + 5)
    assert ids.shape == (len(TEXTS), longest + 5) and (mask.sum(1) == [len(ours.encode(t)) for t in TEXTS]).all()
    with pytest.raises(BloomJaxError, match="more than the length"):
        ours.encode_batch(TEXTS, length=longest - 1)


def test_streaming_never_splits_a_character(tokenizer_dir):
    ours = Tokenizer.from_dir(tokenizer_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        stream = ours.stream()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == ours.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces)
    # The emoji's 4 bytes span several byte-level tokens: the first push must wait for the rest.
    assert len(ours.encode("🌍")) > 1 and ours.stream().push(ours.encode("🌍")[0]) == ""


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(BloomJaxError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_streamed_pieces_of_any_ids_add_up_to_decode(tokenizer_dir):
    """Random ids, as sampling makes them: byte tokens that split characters, special tokens, bytes that never
    form a character. The pieces (tokenizers' DecodeStream) and the flush add up to `decode` exactly: text once
    emitted is never revised, and a character that arrives in parts arrives whole."""
    ours = Tokenizer.from_dir(tokenizer_dir)
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, ours.vocab_size, rng.integers(1, 24)).tolist()
        stream = ours.stream()
        pieces = [stream.push(i) for i in ids]
        rest = stream.flush()
        full = ours.decode(ids)
        assert "".join(pieces) + rest == full
