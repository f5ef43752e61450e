"""Instruction data (`bloom_jax.sft`): prompt/completion, xP3 and chat examples, rows whose loss mask marks the
answers, truncation and dropping, bad lines as one error naming the file, line and field; and the completion-only
loss, against transformers' loss with the prompt's labels at -100 (what TRL computes), with its gradients."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from bloom_jax.chat import ChatTemplate
from bloom_jax.checkpoints.hf import PREFIX, from_param, get_path, hf_names, target_of
from bloom_jax.errors import BloomJaxError
from bloom_jax.losses import next_token_loss
from bloom_jax.sft import Fields, SftCorpus, detect_format, iter_examples, load_sft
from bloom_jax.tokenizer import train_tokenizer

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PAIRS = [("Translate to English: Je t'aime.", "I love you."),
         ("What is the capital of France?", "Paris."),
         ("Write a haiku about rain.",
          "Soft rain on the roof / the garden drinks it slowly / night smells of wet stone"),
         ("2 + 2 =", "4"),
         ("Name a colour.", "Blue."),
         ("Dis bonjour.", "Bonjour !")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([p + " " + c for p, c in PAIRS] * 10, vocab_size=300)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_format_is_found_by_its_first_line_and_read(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    xp3 = write_jsonl(tmp_path / "xp3.jsonl", [{"inputs": p, "targets": c} for p, c in PAIRS])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": p},
                                                               {"role": "assistant", "content": c}]}
                                                 for p, c in PAIRS])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": p} for p, _ in PAIRS])
    assert detect_format([pc], Fields()) == Fields(format="prompt_completion")
    assert detect_format([xp3], Fields()) == Fields(format="prompt_completion", prompt="inputs", completion="targets")
    assert detect_format([chat], Fields()).format == "chat"
    assert detect_format([text], Fields()).format == "text"
    assert detect_format([pc], Fields(), "text").format == "text"  # the recipe's word wins
    with pytest.raises(BloomJaxError, match="the data files mix formats .*set data_format"):
        detect_format([pc, text], Fields())

    assert list(iter_examples([pc], detect_format([pc], Fields()))) == PAIRS
    assert list(iter_examples([xp3], detect_format([xp3], Fields()))) == PAIRS
    template = ChatTemplate(TEMPLATE)
    chats = list(iter_examples([chat], detect_format([chat], Fields()), template))
    assert chats == [(f"<|user|>{p}\n<|assistant|>", c) for p, c in PAIRS]
    with pytest.raises(BloomJaxError, match="chat data needs a chat template"):
        list(iter_examples([chat], Fields(format="chat")))


@pytest.mark.parametrize("record, says", [
    ({"prompt": "a"}, "no string field 'completion'"),
    ({"prompt": "a", "completion": "  "}, "empty 'completion'"),
    ({"prompt": 3, "completion": "b"}, "no string field 'prompt'"),
    ({"messages": "hi"}, "no list of messages in field 'messages'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] is not a \{\"role\", \"content\"\} message"),
    ({"messages": [{"role": "user", "content": "a"}]}, "the last of messages is the user's, not the assistant's"),
])
def test_a_bad_line_is_one_error_naming_the_file_line_and_field(tmp_path, tokenizer, record, says):
    fmt = "chat" if "messages" in record else "prompt_completion"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} \
        if fmt == "chat" else {"prompt": "q", "completion": "a"}
    path = write_jsonl(tmp_path / "data.jsonl", [good, record])
    with pytest.raises(BloomJaxError, match=rf"data.jsonl:2: {says}"):
        list(iter_examples([path], Fields(format=fmt), ChatTemplate(TEMPLATE)))
    # Loading stops at the line too, before anything is cached.
    with pytest.raises(BloomJaxError, match=rf"data.jsonl:2: {says}"):
        load_sft([path], tokenizer, 32, tmp_path / "cache", Fields(format=fmt), ChatTemplate(TEMPLATE),
                 progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_rows_hold_an_example_each_and_mask_its_answer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    corpus = load_sft([path], tokenizer, 99, tmp_path / "cache", Fields(), eval_fraction=0, progress=False)
    assert corpus.tokens.tokenized and corpus.train.n_sequences == len(PAIRS)
    rows = corpus.train.sequences(np.arange(len(PAIRS)))
    assert rows["tokens"].shape == (len(PAIRS), 100) and rows["loss_mask"].shape == (len(PAIRS), 99)
    for (prompt, completion), tokens, mask in zip(PAIRS, rows["tokens"], rows["loss_mask"]):
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
        example = p + c + [tokenizer.eos_token_id]
        assert tokens[:len(example)].tolist() == example
        assert (tokens[len(example):] == tokenizer.pad_token_id).all()
        # Target j predicts token j + 1: the answer's tokens and its EOS count, the prompt and padding do not.
        assert np.flatnonzero(mask).tolist() == list(range(len(p) - 1, len(example) - 1))
    # Everything but the first token counts without completion_only.
    every = load_sft([path], tokenizer, 99, tmp_path / "cache", Fields(), eval_fraction=0, progress=False,
                     completion_only=False).train.sequences([0])
    n = len(tokenizer.encode(PAIRS[0][0]) + tokenizer.encode(PAIRS[0][1])) + 1
    assert np.flatnonzero(every["loss_mask"][0]).tolist() == list(range(n - 1))
    again = SftCorpus.load([path], tokenizer, tmp_path / "cache", Fields(), progress=False)
    assert not again.tokenized
    np.testing.assert_array_equal(again.prompt_lengths, corpus.tokens.prompt_lengths)


def test_too_long_examples_are_truncated_prompt_first_or_dropped_and_counted(tmp_path, tokenizer, caplog):
    long_prompt = "Write a haiku about rain. " * 8
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": long_prompt, "completion": "Paris."},
                                               {"prompt": "2 + 2 =", "completion": "4"}])
    p, c = tokenizer.encode(long_prompt), tokenizer.encode("Paris.")
    width = len(c) + 1 + 5  # the answer and its EOS fit beside 5 prompt tokens
    with caplog.at_level(logging.INFO, logger="bloom_jax"):
        split = load_sft([path], tokenizer, width - 1, tmp_path / "cache", Fields(), eval_fraction=0,
                         progress=False).train
    assert "train split: 1 of 2 examples are longer than" in caplog.text and "truncated" in caplog.text
    row = split.sequences([0])
    assert row["tokens"][0].tolist() == p[-5:] + c + [tokenizer.eos_token_id]  # the prompt's end kept
    assert int(row["loss_mask"][0].sum()) == len(c) + 1
    dropped = load_sft([path], tokenizer, width - 1, tmp_path / "cache", Fields(), eval_fraction=0,
                       progress=False, too_long="drop").train
    assert dropped.n_sequences == 1 and dropped.sequences([0])["tokens"][0, 0] == tokenizer.encode("2 + 2 =")[0]


@pytest.mark.parametrize("chunk_tokens", [4096, 7])  # one chunk (the plain path), and the chunked loss
def test_completion_only_loss_and_gradients_equal_transformers_with_prompt_labels_ignored(tiny, tmp_path, tokenizer,
                                                                                         chunk_tokens):
    """TRL's completion-only loss is transformers' loss with the prompt's and the padding's labels at -100: the
    mean over the answers' tokens. Ours on the same rows and weights: <= 1e-5 relative (fp32), and its gradient."""
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    rows = load_sft([path], tokenizer, 60, tmp_path / "cache", Fields(), eval_fraction=0,
                    progress=False).train.sequences(np.arange(len(PAIRS)))
    tokens, mask = rows["tokens"], rows["loss_mask"]
    weights = mask / mask.sum()
    loss, grads = jax.jit(jax.value_and_grad(lambda p: next_token_loss(tiny.model, p, tokens, chunk_tokens=chunk_tokens,
                                                                        weights=weights)))(tiny.params)

    model = tiny.checkpoint.torch_model
    model.zero_grad()
    labels = np.where(np.concatenate([np.zeros((len(tokens), 1)), mask], axis=1) > 0, tokens, -100)
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
    theirs = dict(model.named_parameters())
    flat = flatten_dict(grads)
    assert len(flat) > 10
    for name in hf_names(tiny.config):
        target = target_of(name, tiny.config)
        ours = np.asarray(get_path(grads, target.path))
        ours = from_param(ours[target.layer] if target.layer is not None else ours, target.mapping)
        ref = theirs[PREFIX + name].grad.numpy()
        scale = np.abs(ref).max()
        assert scale > 0 and np.abs(ours - ref).max() <= 2e-5 * scale, name


@pytest.mark.slow  # two compiled train steps
def test_accumulated_micro_batches_weigh_each_answer_token_as_one_batch_does(tiny, tmp_path, tokenizer):
    """With a loss mask the micro-batches' gradients add up (each answer token weighs 1 / all of the batch's), so
    grad_accum=2 takes the step one batch does; averaging micro-batch means would weigh short answers more."""
    import optax

    from bloom_jax.train import train_step

    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:4]])
    rows = load_sft([path], tokenizer, 60, tmp_path / "cache", Fields(), eval_fraction=0,
                    progress=False).train.sequences(np.arange(4))
    optimizer = optax.sgd(1.0)
    state = {"step": 0, "params": tiny.params, "opt_state": optimizer.init(tiny.params)}
    steps = [jax.jit(lambda s, t, m, k=k: train_step(tiny.model, optimizer, k, 0, False, s, t, loss_mask=m))(
        state, rows["tokens"], rows["loss_mask"]) for k in (1, 2)]
    (one, one_metrics), (two, two_metrics) = steps
    assert float(two_metrics["loss"]) == pytest.approx(float(one_metrics["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # The answers' token counts differ between the halves, so the plain mean of the halves' means differs.
    halves = [rows["loss_mask"][:2].sum(), rows["loss_mask"][2:].sum()]
    assert halves[0] != halves[1]


def test_packed_rows_hold_whole_examples_best_fit_and_kept_apart(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS * 3])
    plain = load_sft([path], tokenizer, 63, tmp_path / "cache", Fields(), eval_fraction=0, progress=False).train
    packed = load_sft([path], tokenizer, 63, tmp_path / "cache", Fields(), eval_fraction=0, progress=False,
                      packing=True).train
    assert packed.n_sequences < plain.n_sequences // 2 and packed.n_tokens == plain.n_tokens
    rows = packed.sequences(np.arange(packed.n_sequences))
    alone = plain.sequences(np.arange(plain.n_sequences))
    found = []
    for tokens, segments, mask in zip(rows["tokens"], rows["segment_ids"], rows["loss_mask"]):
        real = np.flatnonzero(segments > 0)  # the examples first, in order, then the padding
        assert (real == np.arange(len(real))).all() and (np.diff(segments[real]) >= 0).all()
        for k in range(1, segments.max() + 1):
            at = np.flatnonzero(segments == k)
            example = tokens[at]
            match = [i for i, row in enumerate(alone["tokens"]) if row[:len(example)].tolist() == example.tolist()
                     and (len(example) == 64 or row[len(example)] == tokenizer.pad_token_id)]
            assert match, example
            found.append(match[0])
            # The same targets count as alone, and the one into the next example does not.
            own = np.concatenate([[0.0], mask])[at]
            np.testing.assert_array_equal(own, np.concatenate([[0.0], alone["loss_mask"][match[0]]])[:len(at)])
    assert sorted(np.bincount(found, minlength=len(PAIRS))[:len(PAIRS)]) == [3] * len(PAIRS)  # each pair 3 times


@pytest.mark.slow  # two compiled models, forward and backward: about 10 s each
@pytest.mark.parametrize("attention, blocks", [("reference", None), ("blockwise", 8), ("flash", 16)])
def test_a_packed_row_gives_each_example_its_logits_loss_and_gradients_alone(tiny, tmp_path, tokenizer, attention,
                                                                            blocks):
    """Packed (several examples a row, segment ids) against unpacked (one a row): each example's logits where it
    sits, the completion-only loss and its gradients, fp32, <= 1e-5 relative; the blockwise blocks (8) and the
    flash kernels' (16, the TPU kernels in interpret mode) straddle the examples' edges."""
    import dataclasses

    from bloom_jax.kernels import Kernels
    from bloom_jax.model import make_model

    kernels = Kernels(attention=attention)
    if attention == "flash":
        kernels = dataclasses.replace(kernels, flash_blocks=(blocks, blocks), interpret=True)
    elif blocks:
        kernels = dataclasses.replace(kernels, block_q=blocks, block_k=blocks)
    model = make_model(tiny.config, kernels=kernels)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    split = {packing: load_sft([path], tokenizer, 99, tmp_path / "cache", Fields(), eval_fraction=0, progress=False,
                               packing=packing).train for packing in (False, True)}
    alone, packed = (split[p].sequences(np.arange(split[p].n_sequences)) for p in (False, True))

    logits = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))(
        tiny.params, packed["tokens"], packed["segment_ids"])
    alone_logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(tiny.params, alone["tokens"])
    for row, segments in enumerate(packed["segment_ids"]):
        for k in range(1, segments.max() + 1):
            at = np.flatnonzero(segments == k)
            i = next(i for i, r in enumerate(alone["tokens"]) if r[:len(at)].tolist() == packed["tokens"][row, at]
                     .tolist() and r[len(at)] == tokenizer.pad_token_id)
            ours, ref = np.asarray(logits[row, at]), np.asarray(alone_logits[i, :len(at)])
            assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()

    def loss(params, batch):
        mask = batch["loss_mask"]
        return next_token_loss(model, params, batch["tokens"], weights=mask / mask.sum(),
                               segment_ids=batch.get("segment_ids"))

    (ours, our_grads), (ref, ref_grads) = (jax.jit(jax.value_and_grad(loss))(tiny.params, batch)
                                           for batch in (packed, alone))
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(ref_grads)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
