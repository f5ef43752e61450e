"""The language-modelling objective: next-token cross-entropy, the one loss that training, evaluation, the
`forward` command and the memory planner all compute."""

from __future__ import annotations

from typing import Any

import jax
import optax

from bloom_jax.model import BloomForCausalLM


def next_token_loss(model: BloomForCausalLM, params: Any, tokens: jax.Array,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1], for token windows int [b, s + 1]
    (packed: no padding). Dropout runs when `dropout_rng` is given."""
    inputs_bs, targets_bs = tokens[:, :-1], tokens[:, 1:]
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    logits_bsv = model.apply({"params": params}, inputs_bs, deterministic=dropout_rng is None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_bsv, targets_bs).mean()


__all__ = ["next_token_loss"]
