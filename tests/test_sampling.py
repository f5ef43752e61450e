"""`bloom_jax.sampling`: logits processing equals transformers' processors, a draw equals
`jax.random.categorical`'s, and per-row settings (a server's slots) equal each row's settings alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bloom_jax.kernels import Kernels
from bloom_jax.sampling import Features, RowSampling, Sampling, choose, process_logits


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (1.0, 5, 1.0, 1.0), (0.7, 0, 0.9, 1.0), (1.3, 20, 0.5, 1.0), (1.0, 0, 1.0, 1.4), (0.8, 10, 0.8, 1.2),
])
def test_logits_processing_equals_transformers(temperature, top_k, top_p, penalty):
    import torch
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 64)).astype(np.float32)
    history = rng.integers(0, 64, (3, 10))
    seen = np.zeros((3, 64), bool)
    np.put_along_axis(seen, history, True, axis=1)
    ours = np.asarray(process_logits(logits, seen, Sampling(temperature, top_k, top_p, penalty)))

    scores, ids = torch.tensor(logits), torch.tensor(history)
    processors = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []
    processors += [TemperatureLogitsWarper(temperature)]
    processors += [TopKLogitsWarper(top_k)] if top_k else []
    processors += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    for processor in processors:
        scores = processor(ids, scores)
    expected = scores.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    np.testing.assert_allclose(ours[~np.isinf(ours)], expected[~np.isinf(expected)], rtol=1e-6)
    assert np.isinf(ours).any() == bool(top_k or top_p < 1.0)  # filtering happened when asked for


@pytest.mark.parametrize("kernels", ["xla_cpu", "reference"])
def test_sampling_draws_what_jax_random_categorical_draws(kernels):
    logits = np.random.default_rng(0).normal(0, 2, (4, 3000)).astype(np.float32)
    sampling = Sampling(temperature=1.0)
    for seed in range(5):
        key = jax.random.key(seed)
        expected = np.asarray(jax.random.categorical(key, logits, axis=-1))
        picked = choose(Kernels.create(kernels), logits, None, sampling, sampling.features, key)
        np.testing.assert_array_equal(np.asarray(picked), expected)


def rows_of(temperature, top_k, top_p, penalty, seeds) -> RowSampling:
    key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(s)), np.uint32) for s in seeds])
    return RowSampling(np.asarray(temperature, np.float32), np.asarray(top_k, np.int32),
                       np.asarray(top_p, np.float32), np.asarray(penalty, np.float32), key_data,
                       np.zeros(len(seeds), np.int32))


def test_per_row_settings_equal_each_rows_settings_alone():
    """Penalty, temperature, top-k and top-p with each row's own values equal `process_logits` with that row's
    values alone."""
    logits_bv = np.asarray(jax.random.normal(jax.random.key(0), (5, 300)) * 3)
    seen_bv = np.asarray(jax.random.bernoulli(jax.random.key(1), 0.1, (5, 300)))
    temperature, top_k = [1.0, 0.5, 1.3, 1.0, 0.8], [0, 1, 7, 0, 50]
    top_p, penalty = np.asarray([1.0, 1.0, 0.9, 0.3, 0.6], np.float32), [1.0, 1.2, 1.0, 1.5, 1.0]
    rows = rows_of(temperature, top_k, top_p, penalty, range(5))
    got = np.asarray(process_logits(logits_bv, seen_bv, rows, Features(True, True, True, True)))
    for row in range(5):
        alone = Sampling(temperature[row], top_k[row], float(top_p[row]), penalty[row])
        want = process_logits(logits_bv[row:row + 1], seen_bv[row:row + 1], alone)
        np.testing.assert_allclose(got[row], np.asarray(want)[0], rtol=1e-6)


def test_each_row_chooses_the_same_token_whatever_shares_the_batch():
    """Greedy rows take the argmax of their penalised logits; sampled rows draw from their own keys, the same
    alone as in the batch."""
    logits_bv = np.asarray(jax.random.normal(jax.random.key(2), (4, 500)) * 2)
    seen_bv = np.zeros((4, 500), bool)
    seen_bv[1, np.argmax(logits_bv[1])] = True  # the penalty moves row 1's greedy token
    rows = rows_of([0.0, 0.0, 1.0, 0.7], [0, 0, 0, 20], [1.0, 1.0, 0.9, 1.0], [1.0, 100.0, 1.0, 1.0], range(4))
    features, kernels = Features(True, True, True, True), Kernels.create()
    got = np.asarray(choose(kernels, logits_bv, seen_bv, rows, features, rows.keys()))
    assert got[0] == np.argmax(logits_bv[0]) and got[1] != np.argmax(logits_bv[1])
    for row in range(4):
        one = RowSampling(*(x[row:row + 1] for x in rows))
        alone = choose(kernels, logits_bv[row:row + 1], seen_bv[row:row + 1], one, features, one.keys())
        assert int(alone[0]) == got[row]
    assert not jnp.array_equal(rows.keys()[2], rows.keys()[3])
