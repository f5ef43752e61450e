"""Text generation with a preallocated KV cache: one compiled prefill, then a compiled decode loop.

The cache holds keys and values [layers, b, n, T, h] for T = prompt length + new tokens, the key mask [b, T]
(ALiBi positions count its ones, so left padding and cached tokens get the positions transformers gives them) and
the next write index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bloom_jax.config import BloomConfig
from bloom_jax.model import BloomForCausalLM


def init_cache(config: BloomConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty cache for `batch` sequences of up to `length` tokens."""
    shape = (config.n_layer, batch, config.n_head, length, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def process_logits(logits_bv: jax.Array, seen_bv: jax.Array | None = None, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> jax.Array:
    """Next-token logits float32 [b, v] after transformers' processors, in its order: repetition penalty
    (on tokens `seen_bv` marks: divide positive logits, multiply negative ones), temperature, top-k, top-p.
    Removed tokens get -inf."""
    logits_bv = logits_bv.astype(jnp.float32)
    if repetition_penalty != 1.0 and seen_bv is not None:
        penalised = jnp.where(logits_bv > 0, logits_bv / repetition_penalty, logits_bv * repetition_penalty)
        logits_bv = jnp.where(seen_bv, penalised, logits_bv)
    if temperature not in (0.0, 1.0):
        logits_bv = logits_bv / temperature
    if top_k > 0:
        kth_b1 = lax.top_k(logits_bv, min(top_k, logits_bv.shape[-1]))[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if top_p < 1.0:
        order_bv = jnp.argsort(logits_bv, axis=-1)  # ascending, as transformers sorts
        sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
        cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        remove_sorted_bv = (cumulative_bv <= 1.0 - top_p).at[:, -1].set(False)  # always keep the top token
        remove_bv = jnp.zeros_like(remove_sorted_bv).at[jnp.arange(logits_bv.shape[0])[:, None], order_bv].set(
            remove_sorted_bv)
        logits_bv = jnp.where(remove_bv, -jnp.inf, logits_bv)
    return logits_bv


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id", "pad_token_id",
                                             "temperature", "top_k", "top_p", "repetition_penalty"))
def generate(model: BloomForCausalLM, params, input_ids_bs: jax.Array, attention_mask_bs: jax.Array,
             max_new_tokens: int, eos_token_id: int = 2, pad_token_id: int = 3, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             rng: jax.Array | None = None) -> jax.Array:
    """New tokens int32 [b, max_new_tokens] for left-padded prompts; `pad_token_id` after a sequence's EOS.

    temperature 0 is greedy; otherwise samples with `rng` after `process_logits` (top-k, top-p). The
    repetition penalty counts every id of the prompt rows (as transformers does) and every generated token. The
    loop stops early once every sequence has produced EOS.
    """
    batch, prompt_len = input_ids_bs.shape
    vocab = model.config.vocab_size
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    rng = jax.random.key(0) if rng is None else rng
    rows_b1 = jnp.arange(batch)[:, None]

    def pick(logits_bv, seen_bv, key):
        logits_bv = process_logits(logits_bv, seen_bv, temperature if temperature > 0 else 1.0,
                                   top_k if temperature > 0 else 0, top_p if temperature > 0 else 1.0,
                                   repetition_penalty)
        if temperature == 0.0:
            return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)

    seen_bv = jnp.zeros((batch, vocab), jnp.bool_).at[rows_b1, input_ids_bs].set(True)
    logits, cache = model.apply({"params": params}, input_ids_bs, attention_mask_bs, cache=cache, last_only=True)
    rng, key = jax.random.split(rng)
    token_b = pick(logits[:, -1], seen_bv, key)
    seen_bv = seen_bv.at[rows_b1[:, 0], token_b].set(True)
    done_b = token_b == eos_token_id
    out_bn = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token_b)

    def cond(state):
        step, _, _, done_b, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_b)

    def body(state):
        step, token_b, cache, done_b, out_bn, seen_bv, rng = state
        logits, cache = model.apply({"params": params}, token_b[:, None], jnp.ones((batch, 1), jnp.int32),
                                    cache=cache, last_only=True)
        rng, key = jax.random.split(rng)
        next_b = jnp.where(done_b, pad_token_id, pick(logits[:, -1], seen_bv, key))
        seen_bv = seen_bv.at[rows_b1[:, 0], next_b].set(True)
        out_bn = lax.dynamic_update_slice(out_bn, next_b[:, None], (0, step))
        return step + 1, next_b, cache, done_b | (next_b == eos_token_id), out_bn, seen_bv, rng

    state = (jnp.int32(1), token_b, cache, done_b, out_bn, seen_bv, rng)
    return lax.while_loop(cond, body, state)[4]
