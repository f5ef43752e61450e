"""Supervised fine-tuning runs: run A's final checkpoint tuned on prompt/answer pairs, the loss on the answers only
(the step's loss is the completion-only loss of its batch), with gradient accumulation equal to one big batch, and
`bloom-jax eval` scoring the answers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from commands import run_cli
from runs import RECIPE, read_metrics

from bloom_jax import from_pretrained
from bloom_jax.checkpoints import read_tokenizer
from bloom_jax.losses import next_token_loss
from bloom_jax.sft import Fields, load_sft

PAIRS = [("Translate to English: Je t'aime.", "I love you."), ("What is the capital of France?", "Paris."),
         ("2 + 2 =", "4"), ("Name a colour.", "Blue."), ("Dis bonjour.", "Bonjour !"),
         ("What do bees make?", "Honey."), ("Opposite of hot?", "Cold."), ("Say yes.", "Yes.")]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS * 8))
    return path


def sft_overrides(run_a, output_dir, data) -> list[str]:
    a_dir, _ = run_a
    return [f"init_from={a_dir / 'final'}", f"output_dir={output_dir}", f"train_data=[{data}]", "seq_len=24",
            "steps=16", "save_every=8", "eval_every=8", "eval_batches=1", "learning_rate=1e-2", "warmup_steps=2",
            "eval_fraction=0.25"]


@pytest.mark.slow
def test_an_sft_run_learns_the_answers_and_its_loss_is_theirs(run_a, recipe_file, pairs_file, tmp_path):
    a_dir, _ = run_a
    output_dir = tmp_path / "sft"
    code, out, err = run_cli("train", recipe_file, *sft_overrides(run_a, output_dir, pairs_file))
    assert code == 0, err[-3000:]
    metrics = read_metrics(output_dir)
    losses = [m["loss"] for m in metrics]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    assert "eval_loss" in metrics[7] and "eval_loss" in metrics[15]

    # Step 1's loss is the completion-only loss of its batch, as computed here on one device from the same rows.
    model, params = from_pretrained(a_dir / "final")
    corpus = load_sft([pairs_file], read_tokenizer(a_dir / "final"), 24, output_dir / "data-cache", Fields(),
                      eval_fraction=0.25, progress=False)
    batch = corpus.train.train_batches(RECIPE["batch_size"]).get(0)
    mask = batch["loss_mask"]
    expected = float(jax.jit(lambda p: next_token_loss(model, p, batch["tokens"], weights=mask / mask.sum()))(params))
    assert losses[0] == pytest.approx(expected, rel=1e-5)

    code, out, err = run_cli("eval", output_dir / "final", "--data", pairs_file, "--seq-len", 24, "--batch-size", 8)
    assert code == 0, err
    result = json.loads(out)
    tokenizer = read_tokenizer(a_dir / "final")
    answers = sum(len(tokenizer.encode(c)) + 1 for _, c in PAIRS * 8)
    assert result["format"] == "prompt_completion" and result["tokens"] == answers
    assert result["loss"] < losses[0] - 0.5


@pytest.mark.slow
def test_a_packed_sft_run_takes_the_loss_of_its_packed_rows(run_a, recipe_file, pairs_file, tmp_path):
    a_dir, _ = run_a
    output_dir = tmp_path / "packed"
    overrides = [*sft_overrides(run_a, output_dir, pairs_file), "packing=true", "seq_len=48", "steps=8",
                 "save_every=8", "eval_every=8"]
    code, out, err = run_cli("train", recipe_file, *overrides)  # 16 held-out examples pack into 5 rows
    assert code == 2 and err.strip().splitlines()[-1] == ("bloom-jax: error: the eval split has 5 rows, fewer than "
                                                          "one eval batch of 8")
    assert "training:" not in err  # refused before any step
    code, out, err = run_cli("train", recipe_file, *overrides, "eval_fraction=0.5")
    assert code == 0, err[-3000:]
    assert "examples packed into" in err
    losses = [m["loss"] for m in read_metrics(output_dir)]
    model, params = from_pretrained(a_dir / "final")
    corpus = load_sft([pairs_file], read_tokenizer(a_dir / "final"), 48, output_dir / "data-cache", Fields(),
                      eval_fraction=0.5, progress=False, packing=True)
    batch = corpus.train.train_batches(RECIPE["batch_size"]).get(0)
    assert (batch["segment_ids"].max(axis=1) > 1).all()  # every row holds several examples
    mask = batch["loss_mask"]
    expected = float(jax.jit(lambda p: next_token_loss(model, p, batch["tokens"], weights=mask / mask.sum(),
                                                       segment_ids=batch["segment_ids"]))(params))
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert np.mean(losses[-2:]) < losses[0] - 0.3, losses


@pytest.mark.slow
def test_a_run_on_a_hugging_face_dataset_equals_the_run_on_its_jsonl(run_a, recipe_file, pairs_file, tmp_path):
    """`hf_dataset` (load_dataset's json builder over the same file, offline, its cache in the run's tmp) gives
    the run the same examples in the same order: the same losses, bit for bit."""
    pytest.importorskip("datasets")
    runs = {}
    for name, data in (("jsonl", [f"train_data=[{pairs_file}]"]),
                       ("dataset", ["train_data=[]", "hf_dataset.path=json", f"hf_dataset.data_files=[{pairs_file}]",
                                    f"hf_dataset.cache_dir={tmp_path / 'hf-cache'}"])):
        output_dir = tmp_path / name
        overrides = [*sft_overrides(run_a, output_dir, pairs_file), *data, "steps=4", "save_every=4",
                     "eval_every=4"]
        code, out, err = run_cli("train", recipe_file, *overrides)
        assert code == 0, err[-3000:]
        runs[name] = [(m["loss"], m.get("eval_loss")) for m in read_metrics(output_dir)]
    assert runs["dataset"] == runs["jsonl"] and len(runs["jsonl"]) == 4
