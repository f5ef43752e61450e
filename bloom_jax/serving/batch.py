"""The device side of serving: compiled prefill, slot insertion and decode over a fixed set of decode slots.

The slots' KV cache (`bloom_jax.cache.KVCache`, per-row write positions) has `slots` rows of `length` positions.
A request is prefilled on its own small cache (left-padded to a length bucket, in chunks when long), its rows
copied into free slots with the left padding rolled away (so that a request's positions do not depend on its
bucket), then decoded with the others, one compiled step for every slot at once. Each slot has its own sampling
settings (`RowSampling`); greedy rows take exactly `bloom_jax.generate`'s choice, sampled rows draw from their own
key folded with their token index, so a seed gives the same tokens whatever else shares the batch.

Everything a step returns for the host is small: the chosen tokens [b], their log-probabilities, and, when a slot
asked for them, the `TOP_LOGPROBS` best alternatives.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bloom_jax import kernels as ops
from bloom_jax.cache import KVCache
from bloom_jax.model import BloomForCausalLM

# Alternatives returned per token when asked (OpenAI's chat API allows up to 20, its completions up to 5).
TOP_LOGPROBS = 20


class RowSampling(NamedTuple):
    """Per-row sampling settings, each [b]: temperature (0: greedy), top-k (0: all), top-p, repetition penalty
    (1: none), the row's key data (uint32 [b, 2], `jax.random.key_data`) and the index of the token it draws."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    key_data: jax.Array
    token_index: jax.Array


class Features(NamedTuple):
    """What any row of a step needs (static: each combination is its own compiled program, and the cheap ones
    skip the sort of top-k/top-p and the vocabulary-wide top-N)."""

    sample: bool = False  # a row samples
    truncate: bool = False  # a sampling row has top-k or top-p
    penalty: bool = False  # a row has a repetition penalty
    top_logprobs: bool = False  # a row wants the best alternatives


class Choice(NamedTuple):
    """What the host reads after a step: tokens int32 [b], their log-probabilities float32 [b], and the best
    alternatives (int32 and float32 [b, TOP_LOGPROBS]) when asked, else None."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None


def penalised(logits_bv: jax.Array, seen_bv: jax.Array, penalty_b: jax.Array) -> jax.Array:
    """transformers' repetition penalty per row: seen tokens' positive logits divided by the row's penalty,
    negative ones multiplied."""
    p_b1 = penalty_b[:, None]
    return jnp.where(seen_bv, jnp.where(logits_bv > 0, logits_bv / p_b1, logits_bv * p_b1), logits_bv)


def truncated(logits_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """`bloom_jax.generate.process_logits`'s top-k then top-p, with each row's own k (0: none) and p (1: none):
    removed tokens get -inf."""
    v = logits_bv.shape[-1]
    ascending_bv = jnp.sort(logits_bv, axis=-1)
    kth_b1 = jnp.take_along_axis(ascending_bv, (v - jnp.clip(top_k_b, 1, v))[:, None], axis=-1)
    logits_bv = jnp.where((top_k_b[:, None] > 0) & (logits_bv < kth_b1), -jnp.inf, logits_bv)
    order_bv = jnp.argsort(logits_bv, axis=-1)  # ascending, as transformers sorts
    sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
    cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    remove_sorted_bv = ((cumulative_bv <= 1.0 - top_p_b[:, None]) & (top_p_b[:, None] < 1.0)).at[:, -1].set(False)
    remove_bv = jnp.zeros_like(remove_sorted_bv).at[jnp.arange(logits_bv.shape[0])[:, None], order_bv].set(
        remove_sorted_bv)
    return jnp.where(remove_bv, -jnp.inf, logits_bv)


def choose(kernels, logits_bv: jax.Array, seen_bv: jax.Array, rows: RowSampling, features: Features) -> Choice:
    """Each row's next token from its logits float32 [b, v] under its own settings, with the log-probabilities
    of the model's distribution (`log_softmax` of the logits, before any penalty, temperature or truncation)."""
    raw_bv = logits_bv.astype(jnp.float32)
    x_bv = penalised(raw_bv, seen_bv, rows.repetition_penalty) if features.penalty else raw_bv
    token_b = ops.argmax(kernels, x_bv)
    if features.sample:
        greedy_b = rows.temperature == 0.0
        y_bv = x_bv / jnp.where(greedy_b, 1.0, rows.temperature)[:, None]
        if features.truncate:
            y_bv = truncated(y_bv, rows.top_k, rows.top_p)
        keys_b = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.key_data), rows.token_index)
        gumbel_bv = jax.vmap(lambda key: jax.random.gumbel(key, y_bv.shape[1:], y_bv.dtype))(keys_b)
        token_b = jnp.where(greedy_b, token_b, ops.argmax(kernels, y_bv + gumbel_bv))
    logprobs_bv = jax.nn.log_softmax(raw_bv, axis=-1)
    logprob_b = jnp.take_along_axis(logprobs_bv, token_b[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = lax.top_k(logprobs_bv, TOP_LOGPROBS) if features.top_logprobs else (None, None)
    return Choice(token_b, logprob_b, top_ids, top_logprobs)


def mark_seen(seen_bv: jax.Array, ids_bs: jax.Array) -> jax.Array:
    return seen_bv.at[jnp.arange(ids_bs.shape[0])[:, None], ids_bs].set(True)


@functools.partial(jax.jit, static_argnames=("model", "batch", "length"))
def new_prefill_cache(model: BloomForCausalLM, batch: int, length: int) -> KVCache:
    """An empty cache for prefilling `batch` prompts of `length` (padded) tokens, one write position for all."""
    return KVCache.init(model.config, batch, length, model.dtype, per_layer=not model.scan_layers)


@functools.partial(jax.jit, static_argnames=("model", "slots", "length"))
def new_slots(model: BloomForCausalLM, slots: int, length: int) -> tuple[KVCache, jax.Array]:
    """The slots' cache (a write position per row) and their seen-token masks bool [slots, v]."""
    cache = KVCache.init(model.config, slots, length, model.dtype, per_layer=not model.scan_layers)
    cache = cache.replace(index=jnp.zeros((slots,), jnp.int32))
    return cache, jnp.zeros((slots, model.config.vocab_size), jnp.bool_)


@functools.partial(jax.jit, static_argnames=("model", "prompt_logprobs"), donate_argnames=("cache",))
def prefill_chunk(model: BloomForCausalLM, params, cache: KVCache, ids_bc: jax.Array, mask_bc: jax.Array,
                  next_ids_bc: jax.Array, prompt_logprobs: bool):
    """Runs the next chunk of left-padded prompts (ids and mask [b, c]) into a prefill cache. Returns the cache,
    the logits of the chunk's last position float32 [b, v], and, with `prompt_logprobs`, the log-probability of
    each next prompt token (`next_ids_bc`: the ids one position on) float32 [b, c] and the best alternatives
    (ids and log-probabilities [b, c, TOP_LOGPROBS]), else Nones."""
    logits_bcv, cache = model.apply({"params": params}, ids_bc, attention_mask=mask_bc, cache=cache,
                                    last_only=not prompt_logprobs)
    if not prompt_logprobs:
        return cache, logits_bcv[:, -1], None, None, None
    logprobs_bcv = jax.nn.log_softmax(logits_bcv.astype(jnp.float32), axis=-1)
    next_bc = jnp.take_along_axis(logprobs_bcv, next_ids_bc[..., None], axis=-1)[..., 0]
    top_lp, top_ids = lax.top_k(logprobs_bcv, TOP_LOGPROBS)
    return cache, logits_bcv[:, -1], next_bc, top_ids, top_lp


def _layer_arrays(cache: KVCache):
    return (list(cache.keys), list(cache.values)) if cache.per_layer else ([cache.keys], [cache.values])


@functools.partial(jax.jit, static_argnames=("n_head",), donate_argnames=("slots", "seen"))
def insert(slots: KVCache, seen: jax.Array, prefill: KVCache, prompt_ids_bs: jax.Array, row: jax.Array,
           slot: jax.Array, length: jax.Array, n_head: int) -> tuple[KVCache, jax.Array]:
    """The slots with prefill row `row` (a prompt of `length` tokens, left-padded) copied into slot `slot`: its
    keys and values rolled so that the prompt starts at position 0, the slot's key mask its `length` ones, its
    write position `length`, and its seen-token mask the prompt's ids (the padding's too, as transformers and
    `bloom_jax.generate` count them)."""
    t, bucket = slots.length, prefill.length
    pad = bucket - length
    keep = min(bucket, t)  # a prompt fits the slot; its bucket may not

    def copy(slot_zth, prefill_zth, axis):  # axis: where [z, T, h] starts (1 for stacked layers)
        rows_nth = lax.dynamic_slice_in_dim(prefill_zth, row * n_head, n_head, axis=axis)
        rows_nth = jnp.roll(rows_nth, -pad, axis=axis + 1)
        rows_nth = lax.slice_in_dim(rows_nth, 0, keep, axis=axis + 1)
        start = [0] * slot_zth.ndim
        start[axis] = slot * n_head
        return lax.dynamic_update_slice(slot_zth, rows_nth.astype(slot_zth.dtype), start)

    axis = 0 if slots.per_layer else 1
    (keys, values), (pre_keys, pre_values) = _layer_arrays(slots), _layer_arrays(prefill)
    keys = [copy(k, pk, axis) for k, pk in zip(keys, pre_keys)]
    values = [copy(v, pv, axis) for v, pv in zip(values, pre_values)]
    if not slots.per_layer:
        keys, values = keys[0], values[0]
    else:
        keys, values = tuple(keys), tuple(values)
    mask_t = (jnp.arange(t) < length).astype(slots.mask.dtype)
    mask = lax.dynamic_update_slice(slots.mask, mask_t[None], (slot, 0))
    index = slots.index.at[slot].set(length)
    seen_v = mark_seen(jnp.zeros_like(seen[:1]), prompt_ids_bs[row][None])
    seen = lax.dynamic_update_slice(seen, seen_v, (slot, 0))
    return KVCache(keys, values, mask, index), seen


@functools.partial(jax.jit, static_argnames=("kernels", "features"))
def first_tokens(kernels, logits_pv: jax.Array, row_c: jax.Array, seen: jax.Array, slot_c: jax.Array,
                 rows: RowSampling, features: Features) -> Choice:
    """The first new token of freshly inserted slots `slot_c` from their prompts' last logits (prefill rows
    `row_c` of `logits_pv`)."""
    return choose(kernels, logits_pv[row_c], seen[slot_c], rows, features)


@functools.partial(jax.jit, donate_argnames=("seen",))
def mark_tokens(seen: jax.Array, slot_b: jax.Array, token_b: jax.Array) -> jax.Array:
    """Marks each given slot's new token in its seen-token mask."""
    return seen.at[slot_b, token_b].set(True)


@functools.partial(jax.jit, static_argnames=("model", "features"), donate_argnames=("slots", "seen"))
def decode_step(model: BloomForCausalLM, params, slots: KVCache, seen: jax.Array, token_b: jax.Array,
                sampling: RowSampling, features: Features) -> tuple[KVCache, jax.Array, Choice]:
    """One token for each of the first b slots (the others idle, untouched): runs their last tokens `token_b`
    [b] through the model over the slots' cache, picks the next ones and marks them seen.

    The model reads the cache's first b rows only: the server keeps its busy slots at the low end, so a lone
    request decodes at batch 1, not at the batch of every slot. (Slicing those rows out and writing them back
    instead costs a copy of the whole cache per step: 0.32 s against 0.17 s for all 16 slots of bloom-560m.)"""
    rows = token_b.shape[0]
    logits_b1v, slots = model.apply({"params": params}, token_b[:, None], cache=slots, last_only=True)
    choice = choose(model.resolved_kernels, logits_b1v[:, -1], seen[:rows], sampling, features)
    if features.penalty:
        seen = seen.at[jnp.arange(rows), choice.token].set(True)
    return slots, seen, choice


__all__ = ["TOP_LOGPROBS", "RowSampling", "Features", "Choice", "penalised", "truncated", "choose", "mark_seen",
           "new_prefill_cache", "new_slots", "prefill_chunk", "insert", "first_tokens", "mark_tokens",
           "decode_step"]
