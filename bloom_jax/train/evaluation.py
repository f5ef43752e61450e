"""A checkpoint's perplexity on text, or its loss on the answers of instruction data (`bloom-jax eval`)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence

import jax
import numpy as np

from bloom_jax.chat import ChatTemplate
from bloom_jax.checkpoints import checkpoint_location, from_pretrained, read_side_file, read_tokenizer
from bloom_jax.data import load_corpus
from bloom_jax.errors import BloomJaxError
from bloom_jax.losses import next_token_loss
from bloom_jax.sft import Fields, detect_format, load_sft


def evaluate(checkpoint: str, data: Sequence[str], seq_len: int = 512, batch_size: int = 8,
             max_batches: int | None = None, jsonl_field: str = "text", data_format: str = "auto",
             fields: Fields = Fields(), chat_template: str | None = None) -> dict:
    """A checkpoint's loss on data, in order, in full batches. Text: the windows of `seq_len + 1` tokens (EOS after
    each document), the mean over every token. Instruction data (`data_format`, or what the files hold:
    `bloom_jax.sft`): one example per row, the mean over the answers' tokens (their EOS included), each counted
    once. Returns the tokens scored, the mean loss, its perplexity and the data's format."""
    location = checkpoint_location(checkpoint)  # a hub id resolved once
    tokenizer = read_tokenizer(location)
    if tokenizer is None:
        raise BloomJaxError(f"{checkpoint} has no tokenizer.json")
    fields = detect_format(data, fields, data_format, jsonl_field)
    template = (ChatTemplate.load(chat_template, read_side_file(location, "tokenizer_config.json"))
                if fields.format == "chat" else None)
    model, params = from_pretrained(location)
    with tempfile.TemporaryDirectory(prefix="bloom-jax-eval-") as cache:
        if fields.format == "text":
            split = load_corpus(data, tokenizer, seq_len, cache, eval_fraction=0.0, jsonl_field=jsonl_field,
                                cache_setting="TMPDIR").train
        else:
            split = load_sft(data, tokenizer, seq_len, cache, fields, template, eval_fraction=0.0,
                             cache_setting="TMPDIR").train
        n_batches = split.n_sequences // batch_size
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        if n_batches == 0:
            raise BloomJaxError(f"the data gives {split.n_sequences} rows of {seq_len + 1} tokens, fewer than "
                                f"one batch of {batch_size}: lower --seq-len or --batch-size")
        if fields.format == "text":
            loss_fn = jax.jit(lambda p, t: next_token_loss(model, p, t))
            losses = [float(loss_fn(params, split.sequences(np.arange(b * batch_size, (b + 1) * batch_size))))
                      for b in range(n_batches)]
            loss, tokens = float(np.mean(losses)), n_batches * batch_size * seq_len
        else:  # the sum over each batch's answer tokens, then the mean over all of them
            sum_fn = jax.jit(lambda p, t, m: next_token_loss(model, p, t, weights=m))
            total, tokens = 0.0, 0
            for b in range(n_batches):
                rows = split.sequences(np.arange(b * batch_size, (b + 1) * batch_size))
                total += float(sum_fn(params, rows["tokens"], rows["loss_mask"]))
                tokens += int(rows["loss_mask"].sum())
            loss = total / max(tokens, 1)
    return {"tokens": tokens, "loss": loss, "perplexity": math.exp(min(loss, 80.0)), "format": fields.format}
