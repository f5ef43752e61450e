"""Speculative decoding (`bloom_jax.speculative`): greedy tokens equal plain greedy decoding token for token (draft
models that agree often and rarely, prompt lookup, K from 1 to 6, a left-padded batch, int8 weights, an EOS met
mid-round, streaming); sampled tokens follow the target's distribution (a chi-square test on a vocabulary of 6
with a stated bound) and repeat with the seed."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import hf_model, save_hf, tiny_config
from scipy import stats

from bloom_jax.errors import BloomJaxError
from bloom_jax.generate import Generator

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A target (linear gain 3: logits far from uniform), two drafts: the target with noise on its weights (it
    agrees often) and a 1-layer model of its own (it rarely does); prompts of 7, 4 and 1 tokens."""
    root = tmp_path_factory.mktemp("speculative")
    target = Generator.from_pretrained(save_hf(hf_model(tiny_config(), linear_gain=3.0), root / "target"))
    noisy = jax.tree.map(lambda x: x + 0.15 * jnp.std(x) * jax.random.normal(jax.random.key(5), x.shape),
                         target.params)
    small = Generator.from_pretrained(save_hf(hf_model(tiny_config(n_layer=1), seed=1, linear_gain=3.0),
                                              root / "small"))
    # Random tiny models often repeat one token: of 24 random prompts, the first of 7, 4 and 1 tokens whose greedy
    # continuations hold at least 5 distinct tokens.
    rng = np.random.default_rng(0)
    candidates = [rng.integers(3, 512, (7, 4, 1)[i % 3]).tolist() for i in range(24)]
    varied = [len(set(c.completion_ids)) >= 5 for c in target.generate(candidates, max_new_tokens=NEW_TOKENS)]
    prompts = [next(p for p, ok in zip(candidates, varied) if ok and len(p) == n) for n in (7, 4, 1)]
    return {"target": target, "noisy": Generator(target.model, noisy), "small": small, "prompts": prompts,
            "root": root}


def speculative(models, draft: str | None, k: int, lookup: int = 0, **kw):
    base = models["target"]
    return Generator(base.model, base.params, base.tokenizer, draft=models[draft] if draft else None,
                     draft_tokens=k, prompt_lookup=lookup, **kw)


@pytest.mark.parametrize("draft, k, lookup", [("noisy", 3, 0), ("small", 1, 0), (None, 4, 2)])
def test_greedy_tokens_are_the_targets_alone(models, draft, k, lookup):
    prompts = models["prompts"]
    expected = [c.completion_ids for c in models["target"].generate(prompts, max_new_tokens=NEW_TOKENS)]
    gen = speculative(models, draft, k, lookup)
    assert [c.completion_ids for c in gen.generate(prompts, max_new_tokens=NEW_TOKENS)] == expected
    rate = gen.last_stats["acceptance_rate"]
    assert rate < 1 and (rate > 0 or draft == "small")  # proposals rejected, and (but by the small draft) accepted
    # Streaming (one round at a time) gives the same tokens.
    streamed = [[] for _ in prompts]
    gen.generate(prompts, max_new_tokens=NEW_TOKENS,
                 on_text=lambda piece: piece.token_id is not None and streamed[piece.index].append(piece.token_id))
    assert streamed == expected


@pytest.mark.slow
@pytest.mark.parametrize("k, batch, weights", [(2, 3, "int8"), (6, 1, "int8")])
def test_greedy_equality_across_draft_lengths_batches_and_int8_weights(models, k, batch, weights):
    """Both target and draft in `weights` (int8: each model's own int8 decoding is the reference)."""
    target = Generator(models["target"].model, models["target"].params, decode_weights=weights)
    draft = Generator(models["noisy"].model, models["noisy"].params, decode_weights=weights)
    prompts = models["prompts"][:batch]
    expected = [c.completion_ids for c in target.generate(prompts, max_new_tokens=NEW_TOKENS)]
    gen = Generator(target.model, target.params, draft=draft, draft_tokens=k)
    assert [c.completion_ids for c in gen.generate(prompts, max_new_tokens=NEW_TOKENS)] == expected
    assert gen.last_stats["tokens_per_round"] > 1  # some proposals accepted


def test_an_eos_met_inside_a_round_ends_the_row_there(models):
    """The target's 10th token of the first prompt made the EOS: plain and speculative decoding stop at it, the
    other rows go on."""
    prompts = models["prompts"]
    first = models["target"].generate(prompts[:1], max_new_tokens=NEW_TOKENS)[0].completion_ids
    eos = first[9]
    ends = {"eos_token_id": eos}
    target = Generator(models["target"].model, models["target"].params, generation_config=ends)
    expected = [c.completion_ids for c in target.generate(prompts, max_new_tokens=NEW_TOKENS)]
    assert expected[0] == first[:first.index(eos) + 1]
    gen = speculative(models, "noisy", 4, generation_config=ends)
    assert [c.completion_ids for c in gen.generate(prompts, max_new_tokens=NEW_TOKENS)] == expected


def test_a_draft_of_another_vocabulary_and_bad_settings_are_one_error(models):
    other = Generator.from_pretrained(save_hf(hf_model(tiny_config(vocab_size=600), linear_gain=3.0),
                                              models["root"] / "other-vocab"))
    with pytest.raises(BloomJaxError, match=r"the draft's vocabulary \(600 tokens\) is not the target's \(512\)"):
        speculative({**models, "other": other}, "other", 4)
    with pytest.raises(BloomJaxError, match="draft tokens must be at least 1, got 0"):
        speculative(models, "noisy", 0)
    with pytest.raises(BloomJaxError, match="a draft model or with prompt lookup"):
        speculative(models, "noisy", 4, lookup=2)


# -- sampling: the target's distribution ---------------------------------------------------------------------------
VOCAB = 6
SAMPLES = 8192


@pytest.fixture(scope="module")
def small_vocabulary(tmp_path_factory):
    """A target over 6 tokens (no EOS), peaked but not degenerate (linear gain 3), a draft (the target with noise
    on its weights: another distribution, often agreeing) and a prompt."""
    root = tmp_path_factory.mktemp("vocab6")
    config = tiny_config(vocab_size=VOCAB, pad_token_id=5)
    no_eos = {"eos_token_id": []}
    target = Generator.from_pretrained(save_hf(hf_model(config, linear_gain=3.0), root / "target"))
    target = Generator(target.model, target.params, generation_config=no_eos)
    noisy = jax.tree.map(lambda x: x + 0.3 * jnp.std(x) * jax.random.normal(jax.random.key(5), x.shape),
                         target.params)
    draft = Generator(target.model, noisy, generation_config=no_eos)
    return target, draft, [1, 4, 0, 2]


def chi_square_p(samples: np.ndarray, exact: np.ndarray) -> float:
    """p-value of three-token samples [N, 3] against the exact probabilities [216]; cells expected under 5 times
    pooled into one."""
    observed = np.bincount(samples @ np.asarray([VOCAB * VOCAB, VOCAB, 1]), minlength=VOCAB ** 3)
    exact = np.asarray(exact, np.float64)
    expected = exact / exact.sum() * len(samples)
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("draft_tokens, top_k", [(2, 0), (3, 4)])
def test_sampled_tokens_follow_the_targets_distribution(small_vocabulary, draft_tokens, top_k):
    """8192 rows of the same prompt, temperature 1 (and top-k 4, whose cut the exact probabilities then apply):
    the rejection rule's three-token continuations against the target's exact probabilities, p > 1e-3 (a correct
    rule fails this 1 time in 1000; the seed fixes the outcome). The draft's own samples, drawn from another
    distribution, fail it by far: the test can tell."""
    target, draft, prompt = small_vocabulary
    exact = exact_probabilities(target, prompt, top_k)
    gen = Generator(target.model, target.params, draft=draft, draft_tokens=draft_tokens,
                    generation_config={"eos_token_id": []})
    completions = gen.generate([prompt] * SAMPLES, max_new_tokens=3, temperature=1.0, top_k=top_k, seed=11)
    samples = np.asarray([c.completion_ids for c in completions])
    assert 0.2 < gen.last_stats["acceptance_rate"] < 0.95  # proposals are both accepted and rejected
    p_value = chi_square_p(samples, exact)
    assert p_value > 1e-3, p_value
    own = np.asarray([c.completion_ids for c in draft.generate([prompt] * SAMPLES, max_new_tokens=3,
                                                              temperature=1.0, top_k=top_k, seed=11)])
    assert chi_square_p(own, exact) < 1e-9, (p_value, chi_square_p(own, exact))


def exact_probabilities(target: Generator, prompt: list[int], top_k: int = 0) -> np.ndarray:
    """The target's probability of every three-token continuation of `prompt` [216] at temperature 1, after
    top-k (0: none), from one forward pass over all of them."""
    continuations = np.asarray(list(itertools.product(range(VOCAB), repeat=3)), np.int32)
    ids = np.concatenate([np.broadcast_to(prompt, (len(continuations), len(prompt))), continuations], axis=1)
    logits = np.asarray(target.model.apply({"params": target.params}, jnp.asarray(ids)))[:, len(prompt) - 1:-1]
    if top_k:
        logits = np.where(logits < np.sort(logits, axis=-1)[..., -top_k][..., None], -np.inf, logits)
    log_p = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return np.exp(np.sum(np.take_along_axis(log_p, continuations[..., None], axis=2)[..., 0], axis=1))


def test_sampling_repeats_with_the_seed(models):
    gen = speculative(models, "noisy", 3)
    runs = [[c.completion_ids for c in gen.generate(models["prompts"], max_new_tokens=NEW_TOKENS, temperature=0.9,
                                                    top_p=0.9, seed=seed)] for seed in (4, 4, 5)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
