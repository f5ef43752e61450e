"""A checkpoint's perplexity on text (`bloom-jax eval`)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence

import jax
import numpy as np

from bloom_jax.checkpoints import checkpoint_location, from_pretrained, read_tokenizer
from bloom_jax.data import load_corpus
from bloom_jax.errors import BloomJaxError
from bloom_jax.losses import next_token_loss


def evaluate(checkpoint: str, data: Sequence[str], seq_len: int = 512, batch_size: int = 8,
             max_batches: int | None = None, jsonl_field: str = "text") -> dict:
    """Perplexity of a checkpoint on text: the windows of `seq_len + 1` tokens of the data (EOS after each
    document), in order, in full batches. Returns tokens scored, mean loss and perplexity."""
    location = checkpoint_location(checkpoint)  # a hub id resolved once
    tokenizer = read_tokenizer(location)
    if tokenizer is None:
        raise BloomJaxError(f"{checkpoint} has no tokenizer.json")
    model, params = from_pretrained(location)
    with tempfile.TemporaryDirectory(prefix="bloom-jax-eval-") as cache:
        split = load_corpus(data, tokenizer, seq_len, cache, eval_fraction=0.0, jsonl_field=jsonl_field,
                            cache_setting="TMPDIR").train
        n_batches = split.n_sequences // batch_size
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        if n_batches == 0:
            raise BloomJaxError(f"the data gives {split.n_sequences} windows of {seq_len + 1} tokens, fewer than "
                                f"one batch of {batch_size}: lower --seq-len or --batch-size")
        loss_fn = jax.jit(lambda p, t: next_token_loss(model, p, t))
        losses = [float(loss_fn(params, np.stack([split.sequence(b * batch_size + i) for i in range(batch_size)])))
                  for b in range(n_batches)]
    loss = float(np.mean(losses))
    return {"tokens": n_batches * batch_size * seq_len, "loss": loss, "perplexity": math.exp(min(loss, 80.0))}
