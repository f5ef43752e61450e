"""Prompt scores (echo + logprobs) in bounded memory: `bloom_jax.serving.batch.prefill_chunk(..., prompt_logprobs=True)`
makes the next-token log-probabilities and the `TOP_LOGPROBS` best alternatives `SCORE_TOKENS` tokens (rows x
positions) at a time, and they equal the whole chunk's `log_softmax` and `top_k` (the computation they replace, written here).

A tiny BLOOM with a larger vocabulary (4096; 32768 for the memory figures, which are only compiled) and chunks of
128 positions, so that the chunk's [b, c, v] logits outweigh the rest of the program.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from reference import tiny_config

from bloom_jax.model import abstract_params, init_params, make_model
from bloom_jax.serving import batch as device
from bloom_jax.weights import to_decode_weights

VOCAB, CHUNK, ROWS = 4096, 128, 2


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def whole_chunk(model, params, cache, ids_bc, mask_bc, next_ids_bc):
    """The reference: the logits of every position of the chunk [b, c, v], their log_softmax and top_k at once."""
    logits_bcv, cache = model.apply({"params": params}, ids_bc, attention_mask=mask_bc, cache=cache)
    logprobs_bcv = jax.nn.log_softmax(logits_bcv.astype(jnp.float32), axis=-1)
    next_bc = jnp.take_along_axis(logprobs_bcv, next_ids_bc[..., None], axis=-1)[..., 0]
    top_lp, top_ids = lax.top_k(logprobs_bcv, device.TOP_LOGPROBS)
    return cache, logits_bcv[:, -1], next_bc, top_ids, top_lp


@pytest.fixture(scope="module")
def float_model():
    model = make_model(tiny_config(vocab_size=VOCAB), scan_layers=False)
    params = init_params(model, jax.random.key(0))
    # Embeddings of std 0.5 (as tests/helpers/reference.hf_model's): logits of magnitude ~5, far from ties.
    params["word_embeddings"]["embedding"] = params["word_embeddings"]["embedding"] * 25.0
    return model, params


@pytest.fixture(scope="module", params=["float32", "int8"])
def model_params(request, float_model):
    model, params = float_model
    if request.param == "int8":  # as Generator(..., decode_weights="int8") makes them
        return model.clone(decode_weights="int8"), to_decode_weights(params, "int8")
    return model, params


def left_padded(widths: tuple[int, ...], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two prompts of sum(widths) positions, the second left-padded by `pad`: ids, mask and the next ids."""
    length = sum(widths)
    ids = np.random.default_rng(length).integers(4, VOCAB, (ROWS, length)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 3, 0
    return ids, mask, np.concatenate([ids[:, 1:], np.full((ROWS, 1), 3, np.int32)], axis=1)


def assert_same_scores(ours, theirs):
    """Log-probabilities within float32 rounding, the same best ids but where two of them tie."""
    _, last, next_bc, top_ids, top_lp = (np.asarray(x) for x in ours)
    _, last_ref, next_ref, top_ids_ref, top_lp_ref = (np.asarray(x) for x in theirs)
    np.testing.assert_array_equal(last, last_ref)  # the first token's logits: exactly as before
    np.testing.assert_allclose(next_bc, next_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(top_lp, top_lp_ref, atol=2e-5, rtol=0)
    differ = top_ids != top_ids_ref
    assert differ.mean() < 0.01, "top ids differ beyond ties"
    gaps = np.abs(np.diff(top_lp_ref, axis=-1))  # a swapped id needs a neighbour of the same log-probability
    tied = np.zeros_like(differ)
    tied[..., 1:] |= gaps < 2e-5
    tied[..., :-1] |= gaps < 2e-5
    assert not (differ & ~tied).any(), "top ids differ where no two log-probabilities tie"


@pytest.mark.parametrize("widths", [(CHUNK,), (100,), (CHUNK, 40)], ids=["128", "100", "128+40"])
def test_blocked_scores_equal_the_whole_chunks(model_params, widths):
    """Chunks that are and are not multiples of the block (SCORE_TOKENS // 2 positions: the last block padded) or
    shorter than one, one after another into the same cache, on a left-padded batch of two; float32 and int8
    decode weights."""
    model, params = model_params
    block = device.SCORE_TOKENS // ROWS
    assert CHUNK % block == 0 and 100 % block and 40 < block
    ids, mask, next_ids = left_padded(widths, pad=37)
    ours = device.new_prefill_cache(model, ROWS, ids.shape[1])
    theirs = device.new_prefill_cache(model, ROWS, ids.shape[1])
    start = 0
    for width in widths:
        chunk = (slice(None), slice(start, start + width))
        scored = device.prefill_chunk(model, params, ours, ids[chunk], mask[chunk], next_ids[chunk], True)
        reference = whole_chunk(model, params, theirs, ids[chunk], mask[chunk], next_ids[chunk])
        assert [x.shape for x in scored[1:]] == [x.shape for x in reference[1:]]
        assert [x.dtype for x in scored[1:]] == [x.dtype for x in reference[1:]]
        assert_same_scores(scored, reference)
        ours, theirs, start = scored[0], reference[0], start + width
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


def test_scores_are_unchanged_by_what_shares_the_block(float_model):
    """A row's scores do not depend on the other row or on where the chunk's blocks fall (a chunk shorter than a
    block, 20 positions, scored alone and as the tail of a longer one)."""
    model, params = float_model
    ids, mask, next_ids = left_padded((52,), pad=0)
    long = device.prefill_chunk(model, params, device.new_prefill_cache(model, ROWS, 52), ids, mask, next_ids,
                                True)
    cache = device.new_prefill_cache(model, 1, 52)
    cache, *_ = device.prefill_chunk(model, params, cache, ids[:1, :32], mask[:1, :32], next_ids[:1, :32], True)
    tail = device.prefill_chunk(model, params, cache, ids[:1, 32:], mask[:1, 32:], next_ids[:1, 32:], True)
    np.testing.assert_allclose(np.asarray(tail[2])[0], np.asarray(long[2])[0, 32:], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(tail[3])[0], np.asarray(long[3])[0, 32:])


def temporaries(fn, *args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("width", [384, 600])
def test_scoring_temporaries_are_one_block_not_the_chunk(width):
    """XLA:CPU's buffer assignment: scoring adds at most a few [SCORE_TOKENS, v] float32 buffers to the
    unscored chunk's temporaries, far below the chunk's logits [b, c, v]; the whole chunk's log_softmax and top_k
    (before) exceed that bound."""
    vocab = 32768  # compiled only, never run: the chunk's logits [2, c, v] (96 MiB at 384) outweigh attention
    model = make_model(tiny_config(vocab_size=vocab), scan_layers=False)
    params = nn.unbox(abstract_params(model))
    cache = jax.eval_shape(lambda: device.new_prefill_cache(model, ROWS, width))
    ids = jax.ShapeDtypeStruct((ROWS, width), jnp.int32)
    unscored = temporaries(device.prefill_chunk, model, params, cache, ids, ids, ids, False)
    scored = temporaries(device.prefill_chunk, model, params, cache, ids, ids, ids, True)
    before = temporaries(whole_chunk, model, params, cache, ids, ids, ids)
    block_bytes = device.SCORE_TOKENS * vocab * 4
    chunk_bytes = ROWS * width * vocab * 4  # the chunk's float32 logits
    bound = unscored + 3 * block_bytes
    assert scored <= bound, (scored, unscored, block_bytes)
    assert scored - unscored < chunk_bytes / 2, (scored, unscored, chunk_bytes)
    assert before > bound and before >= chunk_bytes, (before, bound)  # the bound tells the two apart
