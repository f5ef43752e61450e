"""The device side of serving: compiled prefill, slot insertion and decode over a fixed set of decode slots.

The slots' KV cache (`bloom_jax.cache.KVCache`, per-row write positions) has `slots` rows of `length` positions.
A request is prefilled on its own small cache (left-padded to a length bucket, in chunks when long), its rows
copied into free slots with the left padding rolled away (so that a request's positions do not depend on its
bucket), then decoded with the others, one compiled step for every slot at once. Each slot has its own sampling
settings (`bloom_jax.sampling.RowSampling`), chosen by `bloom_jax.sampling.choose` as `bloom_jax.generate` chooses:
greedy rows take exactly its tokens, sampled rows draw from their own key folded with their token index, so a seed
gives the same tokens whatever else shares the batch.

Everything a step returns for the host is small: the chosen tokens [b], their log-probabilities, and, when a slot
asked for them, the `TOP_LOGPROBS` best alternatives.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bloom_jax import speculative
from bloom_jax.cache import KVCache
from bloom_jax.kernels import Kernels
from bloom_jax.model import BloomForCausalLM, tied_head
from bloom_jax.sampling import Features, RowSampling, choose, mark_seen, seen_tokens
from bloom_jax.speculative import Speculation

# Alternatives returned per token when asked (OpenAI's chat API allows up to 20, its completions up to 5).
TOP_LOGPROBS = 20


class Choice(NamedTuple):
    """What the host reads after a step: tokens int32 [b], their log-probabilities float32 [b], and the best
    alternatives (int32 and float32 [b, TOP_LOGPROBS]) when asked, else None."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None


def _choice(kernels: Kernels, logits_bv: jax.Array, seen_bv: jax.Array, rows: RowSampling, features: Features,
            top_logprobs: bool) -> Choice:
    """Each row's next token from its logits float32 [b, v] under its own settings, with the log-probabilities
    of the model's distribution (`log_softmax` of the logits, before any penalty, temperature or truncation)."""
    token_b = choose(kernels, logits_bv, seen_bv, rows, features, rows.keys() if features.sample else None)
    logprobs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    logprob_b = jnp.take_along_axis(logprobs_bv, token_b[:, None], axis=-1)[:, 0]
    top_lp, top_ids = lax.top_k(logprobs_bv, TOP_LOGPROBS) if top_logprobs else (None, None)
    return Choice(token_b, logprob_b, top_ids, top_lp)


@functools.partial(jax.jit, static_argnames=("model", "batch", "length"))
def new_prefill_cache(model: BloomForCausalLM, batch: int, length: int) -> KVCache:
    """An empty cache for prefilling `batch` prompts of `length` (padded) tokens, one write position for all."""
    return KVCache.init(model.config, batch, length, model.dtype, per_layer=not model.scan_layers)


@functools.partial(jax.jit, static_argnames=("model", "slots", "length"))
def new_slots(model: BloomForCausalLM, slots: int, length: int) -> tuple[KVCache, jax.Array]:
    """The slots' cache (a write position per row) and their seen-token masks bool [slots, v]."""
    cache = KVCache.init(model.config, slots, length, model.dtype, per_layer=not model.scan_layers, per_row=True)
    return cache, jnp.zeros((slots, model.config.vocab_size), jnp.bool_)


@functools.partial(jax.jit, static_argnames=("model", "prompt_logprobs", "score_tokens"), donate_argnames=("cache",))
def prefill_chunk(model: BloomForCausalLM, params, cache: KVCache, ids_bc: jax.Array, mask_bc: jax.Array,
                  next_ids_bc: jax.Array, prompt_logprobs: bool, score_tokens: int | None = None):
    """Runs the next chunk of left-padded prompts (ids and mask [b, c]) into a prefill cache. Returns the cache,
    the logits of the chunk's last position float32 [b, v], and, with `prompt_logprobs`, the log-probability of
    each next prompt token (`next_ids_bc`: the ids one position on) float32 [b, c] and the best alternatives
    (ids and log-probabilities [b, c, TOP_LOGPROBS]), else Nones. The scores are made `score_tokens` (default
    `SCORE_TOKENS`) tokens at a time (`score_positions`), so that their memory grows with neither the rows nor the
    chunk."""
    if not prompt_logprobs:
        logits_b1v, cache = model.apply({"params": params}, ids_bc, attention_mask=mask_bc, cache=cache,
                                        last_only=True)
        return cache, logits_b1v[:, -1], None, None, None
    hidden_bcd, cache = model.apply({"params": params}, ids_bc, attention_mask=mask_bc, cache=cache,
                                    return_hidden=True)
    # The last position's logits as the unscored chunk makes them (its head over [b, 1, d]): the first token, greedy
    # or sampled, is the same whether the prompt is scored or not.
    last_bv = tied_head(model, params, hidden_bcd[:, -1:])[:, 0]
    return (cache, last_bv, *score_positions(model, params, hidden_bcd, next_ids_bc, score_tokens))


# Prompt tokens scored at a time (rows x positions of a block): the head's logits, their log_softmax and top_k live
# for SCORE_TOKENS x v at once (128 MB for BLOOM's 250,880 tokens in float32), not for the whole chunk (0.5 GB a
# row at 512). A block reads the whole embedding table, so a block of few tokens is bound by that read on an
# accelerator (bloom-7b1's table is 2 GB: 2.5 ms on a v5e, where 128 tokens' head takes 1.3 ms of compute).
SCORE_TOKENS = 128


def score_positions(model: BloomForCausalLM, params, hidden_bcd: jax.Array, next_ids_bc: jax.Array,
                    tokens: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The log-probability of each next token (`next_ids_bc` [b, c]) under the model's distribution at each
    position of final hidden states [b, c, d] (the tied head's `log_softmax`), float32 [b, c], and the
    `TOP_LOGPROBS` best tokens (ids int32 and log-probabilities float32 [b, c, TOP_LOGPROBS]); computed in blocks
    of `tokens` // b positions (at least 1; default `SCORE_TOKENS`; `lax.map`, the last block padded), so the
    float32 temporaries of one block, about `tokens` x v, are the peak whatever b and c."""
    b, c, d = hidden_bcd.shape
    block = max(1, min((tokens or SCORE_TOKENS) // b, c))
    blocks = -(-c // block)
    pad = blocks * block - c  # zero hidden states: finite logits (all 0), scored and dropped
    hidden_nbkd = jnp.pad(hidden_bcd, ((0, 0), (0, pad), (0, 0))).reshape(b, blocks, block, d).swapaxes(0, 1)
    next_nbk = jnp.pad(next_ids_bc, ((0, 0), (0, pad))).reshape(b, blocks, block).swapaxes(0, 1)

    def score(block_in):
        hidden_bkd, next_bk = block_in
        logprobs_bkv = jax.nn.log_softmax(tied_head(model, params, hidden_bkd).astype(jnp.float32), axis=-1)
        next_lp_bk = jnp.take_along_axis(logprobs_bkv, next_bk[..., None], axis=-1)[..., 0]
        top_lp, top_ids = lax.top_k(logprobs_bkv, TOP_LOGPROBS)
        return next_lp_bk, top_ids, top_lp

    next_nbk, top_ids, top_lp = lax.map(score, (hidden_nbkd, next_nbk))

    def unblock(x_nbk):  # [blocks, b, block, ...] -> [b, c, ...]
        return x_nbk.swapaxes(0, 1).reshape(b, blocks * block, *x_nbk.shape[3:])[:, :c]

    return unblock(next_nbk), unblock(top_ids), unblock(top_lp)


@functools.partial(jax.jit, donate_argnames=("slots", "seen"))
def insert(slots: KVCache, seen: jax.Array, prefill: KVCache, prompt_ids_bs: jax.Array, row: jax.Array,
           slot: jax.Array, length: jax.Array) -> tuple[KVCache, jax.Array]:
    """The slots with prefill row `row` (a prompt of `length` tokens, left-padded) copied into slot `slot`
    (`KVCache.insert_row`: the prompt then starts at position 0), and the slot's seen-token mask the prompt's ids
    (the padding's too, as transformers and `bloom_jax.generate` count them)."""
    seen_v = seen_tokens(prompt_ids_bs[row][None], seen.shape[1])
    return slots.insert_row(prefill, row, slot, length), lax.dynamic_update_slice(seen, seen_v, (slot, 0))


@functools.partial(jax.jit, static_argnames=("kernels", "features", "top_logprobs"))
def first_tokens(kernels: Kernels, logits_pv: jax.Array, row_c: jax.Array, seen: jax.Array, slot_c: jax.Array,
                 rows: RowSampling, features: Features, top_logprobs: bool) -> Choice:
    """The first new token of freshly inserted slots `slot_c` from their prompts' last logits (prefill rows
    `row_c` of `logits_pv`), with the `TOP_LOGPROBS` best alternatives if `top_logprobs`."""
    return _choice(kernels, logits_pv[row_c], seen[slot_c], rows, features, top_logprobs)


@functools.partial(jax.jit, donate_argnames=("seen",))
def mark_tokens(seen: jax.Array, slot_b: jax.Array, token_b: jax.Array) -> jax.Array:
    """Marks each given slot's new token in its seen-token mask."""
    return mark_seen(seen, token_b[:, None], slot_b)


@functools.partial(jax.jit, static_argnames=("model", "features", "top_logprobs"), donate_argnames=("slots", "seen"))
def decode_step(model: BloomForCausalLM, params, slots: KVCache, seen: jax.Array, token_b: jax.Array,
                sampling: RowSampling, features: Features, top_logprobs: bool) -> tuple[KVCache, jax.Array, Choice]:
    """One token for each of the first b slots (the others idle, untouched): runs their last tokens `token_b`
    [b] through the model over the slots' cache, picks the next ones (with the `TOP_LOGPROBS` best alternatives
    if `top_logprobs`) and marks them seen.

    The model reads the cache's first b rows only: the server keeps its busy slots at the low end, so a lone
    request decodes at batch 1, not at the batch of every slot. (Slicing those rows out and writing them back
    instead costs a copy of the whole cache per step: 0.32 s against 0.17 s for all 16 slots of bloom-560m.)"""
    rows = token_b.shape[0]
    logits_b1v, slots = model.apply({"params": params}, token_b[:, None], cache=slots, last_only=True)
    choice = _choice(model.resolved_kernels, logits_b1v[:, -1], seen[:rows], sampling, features, top_logprobs)
    if features.penalty:
        seen = mark_seen(seen, choice.token[:, None])
    return slots, seen, choice


# -- speculative decoding (`bloom_jax.speculative`): a round per step, up to K + 1 tokens a slot ---------------------
@functools.partial(jax.jit, static_argnames=("speculation", "slots", "length"))
def new_drafts(speculation: Speculation, slots: int, length: int) -> KVCache | jax.Array:
    """What the slots draft from: the draft model's cache (a write position per row), or, for prompt lookup, each
    slot's context int32 [slots, length] (its prompt and new tokens; -1 where none is)."""
    if speculation.draft is None:
        return jnp.full((slots, length), -1, jnp.int32)
    draft = speculation.draft
    return KVCache.init(draft.config, slots, length, draft.dtype, per_layer=not draft.scan_layers, per_row=True)


@functools.partial(jax.jit, donate_argnames=("drafts",))
def insert_draft(drafts: KVCache | jax.Array, prefill: KVCache | None, prompt_ids_bs: jax.Array, row: jax.Array,
                 slot: jax.Array, length: jax.Array) -> KVCache | jax.Array:
    """The drafts with prefill row `row` (a prompt of `length` tokens, left-padded) in slot `slot`: the draft's
    prefilled cache row (`KVCache.insert_row`), or for prompt lookup the prompt's ids from position 0."""
    if isinstance(drafts, KVCache):
        return drafts.insert_row(prefill, row, slot, length)
    pad = prompt_ids_bs.shape[1] - length
    ids_s = jnp.roll(prompt_ids_bs[row], -pad)
    keep = min(ids_s.shape[0], drafts.shape[1])
    context_t = jnp.full((drafts.shape[1],), -1, jnp.int32).at[:keep].set(ids_s[:keep])
    context_t = jnp.where(jnp.arange(drafts.shape[1]) < length, context_t, -1)
    return lax.dynamic_update_slice(drafts, context_t[None], (slot, 0))


class RoundChoice(NamedTuple):
    """What the host reads after a speculative step: each row's round of tokens int32 [b, K + 1] of which the first
    `count` [b] are made (the accepted proposals and the target's own), their log-probabilities float32
    [b, K + 1], and the best alternatives [b, K + 1, TOP_LOGPROBS] when asked, else None."""

    token: jax.Array
    count: jax.Array
    logprob: jax.Array
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None


@functools.partial(jax.jit, static_argnames=("model", "speculation", "features", "top_logprobs"),
                   donate_argnames=("slots", "drafts", "seen"))
def speculative_step(model: BloomForCausalLM, params, draft_params, slots: KVCache, drafts: KVCache | jax.Array,
                     seen: jax.Array, token_b: jax.Array, sampling: RowSampling, features: Features,
                     top_logprobs: bool, speculation: Speculation):
    """One speculative round for each of the first b slots (the others idle, untouched): the draft (or prompt
    lookup) proposes K tokens after each slot's last token `token_b` [b], the model verifies them in one pass,
    and each slot keeps what it accepted. Each row draws with its own key folded with its token index (as
    `decode_step`), so a seed gives the same tokens whatever shares the batch. Returns the slots, the drafts, the
    seen marks and a `RoundChoice`."""
    rows = token_b.shape[0]
    keys = speculative.RoundKeys.split(sampling.keys(), speculation.draft_tokens)
    seen_bv = seen[:rows] if features.penalty else None
    index_b = slots.index[:rows]  # where each row's last token goes: its prompt and all but that token are cached
    context, context_len_b, draft_cache = None, None, None
    if speculation.draft is None:
        drafts = speculative.written(drafts, token_b[:, None], index_b, jnp.ones_like(index_b))
        context, context_len_b = drafts[:rows], index_b + 1
    else:
        draft_cache = drafts
    drafted_bk, q_bkv, draft_cache = speculative.propose(speculation, draft_params, draft_cache, context,
                                                         context_len_b, token_b, seen_bv, sampling, features, keys)
    accepted_b, emitted_bk1, logits_bk1v, slots = speculative.verify(model, params, slots, token_b, drafted_bk,
                                                                     q_bkv, seen_bv, sampling, features, keys)
    count_b = accepted_b + 1
    new_index = slots.index.at[:rows].set(index_b + count_b)
    slots = speculative.rolled_back(slots, new_index)
    if speculation.draft is None:
        drafts = speculative.written(drafts, emitted_bk1, index_b + 1, count_b)
    else:
        drafts = speculative.rolled_back(draft_cache, draft_cache.index.at[:rows].set(index_b + count_b))
    if features.penalty:
        seen = speculative.mark_emitted(seen, emitted_bk1, count_b)
    logprobs_bk1v = jax.nn.log_softmax(logits_bk1v.astype(jnp.float32), axis=-1)
    logprob_bk1 = jnp.take_along_axis(logprobs_bk1v, emitted_bk1[..., None], axis=-1)[..., 0]
    top_lp, top_ids = lax.top_k(logprobs_bk1v, TOP_LOGPROBS) if top_logprobs else (None, None)
    return slots, drafts, seen, RoundChoice(emitted_bk1, count_b, logprob_bk1, top_ids, top_lp)


__all__ = ["TOP_LOGPROBS", "SCORE_TOKENS", "Choice", "RoundChoice", "new_prefill_cache", "new_slots",
           "prefill_chunk", "score_positions", "insert", "first_tokens", "mark_tokens", "decode_step", "new_drafts",
           "insert_draft", "speculative_step"]
