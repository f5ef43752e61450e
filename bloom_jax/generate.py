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


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id", "pad_token_id",
                                             "temperature"))
def generate(model: BloomForCausalLM, params, input_ids_bs: jax.Array, attention_mask_bs: jax.Array,
             max_new_tokens: int, eos_token_id: int = 2, pad_token_id: int = 3, temperature: float = 0.0,
             rng: jax.Array | None = None) -> jax.Array:
    """New tokens int32 [b, max_new_tokens] for left-padded prompts; `pad_token_id` after a sequence's EOS.

    temperature 0 is greedy; otherwise samples from softmax(logits / temperature) with `rng`. The loop stops
    early once every sequence has produced EOS.
    """
    batch, prompt_len = input_ids_bs.shape
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    rng = jax.random.key(0) if rng is None else rng

    def pick(logits_bv, key):
        if temperature == 0.0:
            return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits_bv / temperature, axis=-1).astype(jnp.int32)

    logits, cache = model.apply({"params": params}, input_ids_bs, attention_mask_bs, cache=cache, last_only=True)
    rng, key = jax.random.split(rng)
    token_b = pick(logits[:, -1], key)
    done_b = token_b == eos_token_id
    out_bn = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token_b)

    def cond(state):
        step, _, _, done_b, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_b)

    def body(state):
        step, token_b, cache, done_b, out_bn, rng = state
        logits, cache = model.apply({"params": params}, token_b[:, None], jnp.ones((batch, 1), jnp.int32),
                                    cache=cache, last_only=True)
        rng, key = jax.random.split(rng)
        next_b = pick(logits[:, -1], key)
        next_b = jnp.where(done_b, pad_token_id, next_b)
        out_bn = lax.dynamic_update_slice(out_bn, next_b[:, None], (0, step))
        return step + 1, next_b, cache, done_b | (next_b == eos_token_id), out_bn, rng

    state = (jnp.int32(1), token_b, cache, done_b, out_bn, rng)
    return lax.while_loop(cond, body, state)[4]
