"""Speculative decoding: a draft proposes K tokens, the target scores them all in one forward pass over K + 1
positions of its KV cache, and keeps those it would have chosen itself. Decoding at batch 1 is bound by reading the
target's weights; each pass now yields 1 to K + 1 tokens for that one read.

The draft is a smaller BLOOM with the same tokenizer (the family shares one: bloom-560m drafts for bloom-7b1), or
prompt lookup: the K tokens that followed the last earlier occurrence of the context's final N tokens.

One round, per row (rows accept different counts, so the caches keep a write position per row):
1. the draft feeds the last token t0 and its own proposals d1..dK one at a time (K + 1 steps, the last only writing
   dK into its cache) and keeps the distribution q_i each was drawn from;
2. the target runs [t0, d1..dK] at once: its distributions p_0..p_K after each;
3. d_i is accepted while it is what the target chooses: greedy, d_i = argmax p_{i-1}; sampling, with probability
   min(1, p_{i-1}(d_i) / q_i(d_i)) (Leviathan et al., 2023); the first rejected position takes a token drawn from
   max(0, p - q) normalized (greedy: the argmax), and a round that accepts all K adds one from p_K. The tokens are
   then exactly those of decoding the target alone (greedy), or drawn from its distribution (sampling);
4. both caches keep t0 and the accepted tokens: their write positions move on by accepted + 1, the key mask of the
   rejected positions is cleared (the next round writes over them).

Logits go through the same processors as plain decoding (`bloom_jax.sampling`): repetition penalty (with each
position's own seen tokens), temperature, top-k, top-p. `prefill` takes on the state of `bloom_jax.generate.prefill`
(the target's first token chosen from the prompt, its cache made with `room`), `decode` runs one compiled loop of
rounds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bloom_jax.cache import KVCache
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM
from bloom_jax.sampling import Features, RowSampling, Sampling, choose, gumbel_noise, mark_seen, process_logits


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How tokens are drafted (static: part of the compiled programs): `draft_tokens` (K) per round by the `draft`
    model, or by prompt lookup of the context's last `lookup` (N) tokens when there is no draft model."""

    draft_tokens: int = 4
    draft: BloomForCausalLM | None = None
    lookup: int = 0

    def __post_init__(self):
        if self.draft_tokens < 1:
            raise BloomJaxError(f"draft tokens must be at least 1, got {self.draft_tokens}")
        if (self.draft is None) == (self.lookup < 1):
            raise BloomJaxError("speculative decoding drafts with a draft model or with prompt lookup (N >= 1), "
                                "one of them")


def check_draft(target: BloomForCausalLM, draft: BloomForCausalLM) -> None:
    """A draft must score the target's tokens: the same vocabulary (BLOOM's checkpoints share one tokenizer)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise BloomJaxError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) is not the target's "
                            f"({target.config.vocab_size}): a draft needs the target's tokenizer")


def room(new_tokens: int, speculation: Speculation) -> int:
    """The cache positions past the prompt that decoding `new_tokens` needs: a round writes K + 1 at once."""
    return new_tokens + speculation.draft_tokens + 1


@functools.partial(jax.jit, static_argnames=("speculation",), donate_argnames=("state",))
def prefill(draft_params, state: dict, input_ids: jax.Array, attention_mask: jax.Array,
            speculation: Speculation) -> dict:
    """`state`, what `bloom_jax.generate.prefill` made of the prompts (ids and mask [b, s], left-padded) with
    `room` positions, ready for rounds: a write position per row, the draft's cache of the prompt (or, for prompt
    lookup, the context: the prompt, then the new tokens), and the rounds' statistics."""
    batch, prompt_len = input_ids.shape
    new_tokens = state["tokens_bn"].shape[1]
    state = {**state, "cache": _per_row(state["cache"]), "length_b": jnp.ones((batch,), jnp.int32),
             "rounds": jnp.int32(0), "accepted_b": jnp.zeros((batch,), jnp.int32),
             "drafted_b": jnp.zeros((batch,), jnp.int32)}
    if speculation.draft is not None:
        draft = speculation.draft
        cache = KVCache.init(draft.config, batch, state["cache"].length, draft.dtype,
                             per_layer=not draft.scan_layers)
        _, cache = draft.apply({"params": draft_params}, input_ids, attention_mask=attention_mask, cache=cache,
                               last_only=True)
        state["draft_cache"] = _per_row(cache)
    else:  # prompt lookup reads the context: the prompt (its padding never matches: -1), then the new tokens
        context = jnp.where(attention_mask > 0, input_ids, -1)
        context = jnp.concatenate([context, jnp.full((batch, new_tokens), -1, jnp.int32)], axis=1)
        state["context_bl"] = context.at[:, prompt_len].set(state["token_b"])
        state["prompt_len"] = jnp.int32(prompt_len)
    return state


def statistics(state: dict, speculation: Speculation, rows: int | None = None) -> dict[str, float]:
    """A finished state's rounds and acceptance over its first `rows` rows (None: all): `rounds`, `drafted_tokens`,
    `accepted_tokens`, `acceptance_rate` (accepted / drafted) and `tokens_per_round` (a row's tokens per target
    forward pass: accepted + 1 a round)."""
    drafted = int(jnp.sum(state["drafted_b"][:rows]))
    accepted = int(jnp.sum(state["accepted_b"][:rows]))
    row_rounds = drafted // speculation.draft_tokens
    return {"rounds": int(state["rounds"]), "drafted_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_round": (accepted + row_rounds) / row_rounds if row_rounds else 0.0}


def _per_row(cache: KVCache) -> KVCache:
    """The cache with its one write position given to each row (rows then advance apart)."""
    return cache.replace(index=jnp.full((cache.mask.shape[0],), cache.index, jnp.int32))


@functools.partial(jax.jit, static_argnames=("target", "speculation", "sampling"), donate_argnames=("state",))
def decode(target: BloomForCausalLM, params, draft_params, state: dict, stop: jax.Array | int, sampling: Sampling,
           speculation: Speculation, max_rounds: jax.Array | int = 2**30) -> dict:
    """Rounds until each row has `stop` tokens (at most the budget prefill made room for) or has produced EOS, or
    `max_rounds` rounds in all (streaming runs one at a time), in one compiled loop; the state donated."""
    stop = jnp.minimum(stop, state["tokens_bn"].shape[1])
    max_rounds = state["rounds"] + max_rounds

    def cond(state):
        return jnp.any(~state["done_b"] & (state["length_b"] < stop)) & (state["rounds"] < max_rounds)

    def body(state):
        return _round(target, params, draft_params, state, stop, sampling, speculation)

    return lax.while_loop(cond, body, state)


def _round(target, params, draft_params, state, stop, sampling: Sampling, speculation: Speculation) -> dict:
    k = speculation.draft_tokens
    rng, key = jax.random.split(state["rng"])
    keys = RoundKeys.split(key, k)
    t0_b = state["token_b"]
    context_len_b = None if speculation.draft is not None else state["prompt_len"] + state["length_b"]
    drafted_bk, q_bkv, draft_cache = propose(speculation, draft_params, state.get("draft_cache"),
                                             state.get("context_bl"), context_len_b, t0_b, state["seen_bv"],
                                             sampling, sampling.features, keys)
    accepted_b, emitted_bk1, _, cache = verify(target, params, state["cache"], t0_b, drafted_bk, q_bkv,
                                               state["seen_bv"], sampling, sampling.features, keys)

    # What the rows keep: t0 and the accepted tokens in the caches; the accepted and the one after in the output,
    # cut after an EOS and at the budget.
    live_b = ~state["done_b"]
    index_k1 = jnp.arange(k + 1)
    count_b = accepted_b + 1
    is_eos_bk1 = jnp.isin(emitted_bk1, state["eos"]) & (index_k1 < count_b[:, None])
    first_eos_b = jnp.argmax(is_eos_bk1, axis=1)
    ended_b = jnp.any(is_eos_bk1, axis=1)
    count_b = jnp.where(ended_b, first_eos_b + 1, count_b)
    count_b = jnp.where(live_b, jnp.minimum(count_b, stop - state["length_b"]), 0)
    tokens_bn = written(state["tokens_bn"], emitted_bk1, state["length_b"], count_b)
    length_b = state["length_b"] + count_b
    last_b = jnp.take_along_axis(emitted_bk1, jnp.maximum(count_b - 1, 0)[:, None], axis=1)[:, 0]
    done_b = state["done_b"] | ended_b & live_b | (length_b >= stop)

    advance_b = jnp.where(live_b, accepted_b + 1, 0)
    new = {**state, "tokens_bn": tokens_bn, "length_b": length_b, "done_b": done_b, "rng": rng,
           "token_b": jnp.where(live_b, last_b, t0_b), "cache": rolled_back(cache, state["cache"].index + advance_b),
           "rounds": state["rounds"] + 1,
           "accepted_b": state["accepted_b"] + jnp.where(live_b, accepted_b, 0),
           "drafted_b": state["drafted_b"] + jnp.where(live_b, k, 0),
           "seen_bv": mark_emitted(state["seen_bv"], emitted_bk1, count_b)}
    if speculation.draft is not None:
        new["draft_cache"] = rolled_back(draft_cache, state["draft_cache"].index + advance_b)
    else:
        new["context_bl"] = written(state["context_bl"], emitted_bk1, state["prompt_len"] + state["length_b"],
                                     count_b)
    return new


def written(rows_zl: jax.Array, new_bk: jax.Array, at_b: jax.Array, count_b: jax.Array) -> jax.Array:
    """`rows_zl` with its first b rows' first `count_b` new values [b, k] written from position `at_b` (past the
    end: dropped); the other rows (a server's idle slots) as they are."""
    index_k = jnp.arange(new_bk.shape[1])
    at_bk = jnp.where(index_k < count_b[:, None], at_b[:, None] + index_k, rows_zl.shape[1])
    rows_bk = jnp.broadcast_to(jnp.arange(new_bk.shape[0])[:, None], at_bk.shape)
    return rows_zl.at[rows_bk, at_bk].set(new_bk.astype(rows_zl.dtype), mode="drop")


def mark_emitted(seen_bv: jax.Array | None, emitted_bk1: jax.Array, count_b: jax.Array) -> jax.Array | None:
    """The seen-token marks with each row's first `count_b` emitted tokens marked (the repetition penalty's)."""
    keep_bk1 = jnp.arange(emitted_bk1.shape[1]) < jnp.maximum(count_b, 1)[:, None]
    return mark_seen(seen_bv, jnp.where(keep_bk1, emitted_bk1, emitted_bk1[:, :1]))


class RoundKeys(NamedTuple):
    """A round's random keys: one per draft step [K + 1], the target's draw and the acceptance test; each a key
    for the whole batch, or one per row (a server's slots: a row's draws then do not depend on the others)."""

    draft: jax.Array  # [K + 1] or [K + 1, b]
    target: jax.Array  # [] or [b]
    accept: jax.Array  # [] or [b]

    @classmethod
    def split(cls, key: jax.Array, k: int) -> RoundKeys:
        """From one key ([]) or one per row ([b])."""
        if key.ndim == 0:
            keys = jax.random.split(key, k + 3)
        else:
            keys = jnp.swapaxes(jax.vmap(lambda row_key: jax.random.split(row_key, k + 3))(key), 0, 1)
        return cls(keys[:k + 1], keys[k + 1], keys[k + 2])


def propose(speculation: Speculation, draft_params, draft_cache: KVCache | None, context_bl: jax.Array | None,
            context_len_b: jax.Array | None, token_b: jax.Array, seen_bv: jax.Array | None,
            settings: Sampling | RowSampling, features: Features, keys: RoundKeys):
    """The K proposals int32 [b, K] after each row's last token `token_b` [b] (the rows are the first b of the
    caches), the processed distributions q [b, K, v] they were drawn from (None when no row samples, and for
    prompt lookup: point masses), and the draft's cache with the last token and all K written (K + 1 steps;
    None for prompt lookup, which reads `context_bl` [b, L] filled to `context_len_b`, the last token included)."""
    k = speculation.draft_tokens
    if speculation.draft is None:
        return _lookup(context_bl, context_len_b, speculation.lookup, k), None, None
    draft = speculation.draft

    def step(carry, key):
        token_b, cache, seen_bv = carry
        logits_b1v, cache = draft.apply({"params": draft_params}, token_b[:, None], cache=cache, last_only=True)
        logits_bv = logits_b1v[:, -1]
        picked_b = choose(draft.resolved_kernels, logits_bv, seen_bv, settings, features,
                          key if features.sample else None)
        q_bv = jax.nn.softmax(process_logits(logits_bv, seen_bv, settings, features)) if features.sample else None
        return (picked_b, cache, mark_seen(seen_bv, picked_b[:, None])), (picked_b, q_bv)

    (_, cache, _), (picked_kb, q_kbv) = lax.scan(step, (token_b, draft_cache, seen_bv), keys.draft)
    # Step K + 1 fed dK (its proposal unused): the cache then holds t0, d1..dK, as the target's after verifying.
    drafted_bk = jnp.swapaxes(picked_kb[:k], 0, 1)
    q_bkv = None if q_kbv is None else jnp.swapaxes(q_kbv[:k], 0, 1)
    return drafted_bk, q_bkv, cache


def verify(target: BloomForCausalLM, params, cache: KVCache, token_b: jax.Array, drafted_bk: jax.Array,
           q_bkv: jax.Array | None, seen_bv: jax.Array | None, settings: Sampling | RowSampling, features: Features,
           keys: RoundKeys):
    """The target over [t0, d1..dK] (its cache's first b rows, one write position each): (accepted count [b] in
    0..K, the round's tokens int32 [b, K + 1]: the accepted proposals, then the target's own at the first
    rejection, or after all K; the target's logits float32 [b, K + 1, v]; its cache with all K + 1 written)."""
    ids_bk1 = jnp.concatenate([token_b[:, None], drafted_bk], axis=1)
    logits_bk1v, cache = target.apply({"params": params}, ids_bk1, cache=cache)
    b, k1, v = logits_bk1v.shape
    flat_logits = logits_bk1v.reshape(b * k1, v)
    seen_bk1v = _seen_per_position(seen_bv, ids_bk1)
    flat_seen = None if seen_bk1v is None else seen_bk1v.reshape(b * k1, v)
    flat_settings = _repeated(settings, k1)
    # Greedy: the target's own choice at every position (the penalised argmax), kept while the proposals match.
    chosen_bk1 = choose(target.resolved_kernels, flat_logits, flat_seen, flat_settings,
                        features._replace(sample=False)).reshape(b, k1)
    accepted_b = jnp.sum(jnp.cumprod(chosen_bk1[:, :-1] == drafted_bk, axis=1), axis=1)
    emitted_bk1 = _with_token_at(jnp.concatenate([drafted_bk, chosen_bk1[:, -1:]], axis=1), accepted_b,
                                 jnp.take_along_axis(chosen_bk1, accepted_b[:, None], axis=1)[:, 0])
    if features.sample:
        p_bk1v = jax.nn.softmax(process_logits(flat_logits, flat_seen, flat_settings, features)).reshape(b, k1, v)
        sampled_b, sampled_bk1 = _rejection(p_bk1v, drafted_bk, q_bkv, keys)
        greedy_b = jnp.broadcast_to(jnp.asarray(settings.temperature) == 0.0, (b,))
        accepted_b = jnp.where(greedy_b, accepted_b, sampled_b)
        emitted_bk1 = jnp.where(greedy_b[:, None], emitted_bk1, sampled_bk1)
    return accepted_b, emitted_bk1, logits_bk1v, cache


def _repeated(settings: Sampling | RowSampling, times: int) -> Sampling | RowSampling:
    """The settings of each row repeated for its `times` positions (rows flattened with their positions)."""
    if isinstance(settings, Sampling):
        return settings
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), settings)


def _with_token_at(tokens_bk1: jax.Array, at_b: jax.Array, token_b: jax.Array) -> jax.Array:
    return jnp.where(jnp.arange(tokens_bk1.shape[1]) == at_b[:, None], token_b[:, None].astype(jnp.int32),
                     tokens_bk1)


def _rejection(p_bk1v: jax.Array, drafted_bk: jax.Array, q_bkv: jax.Array | None, keys: RoundKeys):
    """The rejection rule on the target's distributions p [b, K + 1, v] and the proposals' q (None: point masses):
    (accepted count [b], the round's tokens [b, K + 1])."""
    b, k1, v = p_bk1v.shape
    k = k1 - 1
    proposal_bk = jnp.maximum(drafted_bk, 0)  # -1 (no proposal) is rejected below
    p_of_draft_bk = jnp.take_along_axis(p_bk1v[:, :k], proposal_bk[..., None], axis=2)[..., 0]
    if q_bkv is None:  # prompt lookup: a point mass on each proposal
        q_bkv = jax.nn.one_hot(proposal_bk, v, dtype=p_bk1v.dtype)
    q_of_draft_bk = jnp.take_along_axis(q_bkv, proposal_bk[..., None], axis=2)[..., 0]
    if keys.accept.ndim == 0:
        u_bk = jax.random.uniform(keys.accept, (b, k))
    else:
        u_bk = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys.accept)
    accept_bk = (u_bk * q_of_draft_bk < p_of_draft_bk) & (drafted_bk >= 0)
    accepted_b = jnp.sum(jnp.cumprod(accept_bk, axis=1), axis=1)
    # The token at position `accepted`: from max(0, p - q) normalized after a rejection, from p after all K.
    q_pad_bk1v = jnp.concatenate([q_bkv, jnp.zeros((b, 1, v), q_bkv.dtype)], axis=1)
    at_b11 = accepted_b[:, None, None]
    p_at_bv = jnp.take_along_axis(p_bk1v, at_b11, axis=1)[:, 0]
    q_at_bv = jnp.take_along_axis(q_pad_bk1v, at_b11, axis=1)[:, 0]
    residual_bv = jnp.maximum(p_at_bv - q_at_bv, 0.0)
    # p == q at a rejected position has probability 0; p itself is then as good as any distribution.
    residual_bv = jnp.where(jnp.sum(residual_bv, axis=-1, keepdims=True) > 0, residual_bv, p_at_bv)
    drawn_b = jnp.argmax(jnp.log(residual_bv) + gumbel_noise(keys.target, residual_bv.shape), axis=-1)
    emitted_bk1 = jnp.concatenate([drafted_bk, jnp.zeros((b, 1), jnp.int32)], axis=1)
    return accepted_b, _with_token_at(emitted_bk1, accepted_b, drawn_b)


def _lookup(context_bl: jax.Array, length_b: jax.Array, n: int, k: int) -> jax.Array:
    """Prompt lookup's K proposals int32 [b, K]: the tokens after the latest earlier occurrence of the context's last
    `n` tokens (`context_bl` [b, L], -1 where nothing is; each row's first `length_b` positions filled). Without
    one, or past the context's end, -1 stands for no proposal (never accepted)."""
    b, length = context_bl.shape
    starts = jnp.arange(length)
    tail_bn = jnp.take_along_axis(context_bl, jnp.clip(length_b[:, None] - n + jnp.arange(n), 0, length - 1), axis=1)
    windows_bln = jnp.take_along_axis(context_bl[:, None, :], jnp.clip(starts[:, None] + jnp.arange(n), 0,
                                                                       length - 1)[None], axis=2)
    # An occurrence ends before the last position (a token follows it) and holds real tokens.
    matches_bl = (jnp.all(windows_bln == tail_bn[:, None, :], axis=2) & (starts[None] + n < length_b[:, None])
                  & (tail_bn[:, :1] >= 0) & (length_b[:, None] > n))
    latest_b = jnp.max(jnp.where(matches_bl, starts[None], -1), axis=1)
    follow_bk = latest_b[:, None] + n + jnp.arange(k)
    proposals_bk = jnp.take_along_axis(context_bl, jnp.clip(follow_bk, 0, length - 1), axis=1)
    known_bk = (latest_b[:, None] >= 0) & (follow_bk < length_b[:, None])
    return jnp.where(known_bk, proposals_bk, -1)


def _seen_per_position(seen_bv: jax.Array | None, ids_bk1: jax.Array) -> jax.Array | None:
    """Each verified position's seen-token marks bool [b, K + 1, v] (the repetition penalty's): the row's, plus t0
    and the proposals up to that position, as plain decoding has them there."""
    if seen_bv is None:
        return None
    v = seen_bv.shape[-1]
    new_bk1v = jnp.cumsum(jax.nn.one_hot(ids_bk1, v, dtype=jnp.int32), axis=1) > 0
    return seen_bv[:ids_bk1.shape[0], None, :] | new_bk1v


def rolled_back(cache: KVCache, index_b: jax.Array) -> KVCache:
    """The cache after a round: each row's write position at `index_b`, the key mask cleared from there (the rejected
    proposals' positions, written over by the next round)."""
    keep_bt = jnp.arange(cache.length)[None, :] < index_b[:, None]
    return cache.replace(mask=cache.mask * keep_bt.astype(cache.mask.dtype), index=index_b)


__all__ = ["RoundKeys", "Speculation", "check_draft", "decode", "mark_emitted", "prefill", "propose", "rolled_back",
           "room", "statistics", "verify", "written"]
