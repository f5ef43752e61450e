"""ALiBi slopes (any head count, BLOOM-176B's 112 included) and the per-key bias under padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from bloom_jax.kernels.attention import alibi_bias, alibi_slopes

HEAD_COUNTS = (1, 2, 6, 8, 12, 16, 32, 112)


def slopes_float64(n: int) -> np.ndarray:
    """The formula of the facts file, in float64: powers of `base` for the largest power of two c <= n, then the
    first n - c odd powers of the base for 2c."""
    c = 2 ** int(math.floor(math.log2(n)))
    base = 2.0 ** (-(2.0 ** -(math.log2(c) - 3)))
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * c) - 3)))
    powers = [base**k for k in range(1, c + 1)]
    odd = [extra_base ** (2 * j + 1) for j in range(n - c)]
    return np.array(powers + odd, dtype=np.float64)


@pytest.mark.parametrize("n", HEAD_COUNTS)
def test_slopes_match_formula(n):
    ours = alibi_slopes(n)
    assert ours.shape == (n,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, slopes_float64(n), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", HEAD_COUNTS)
def test_slopes_match_transformers(n):
    np.testing.assert_allclose(alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu")).numpy(), rtol=1e-6, atol=0)


def test_slopes_112_heads():
    slopes = alibi_slopes(112).astype(np.float64)
    extra_base = 2.0 ** (-8 / 128)
    np.testing.assert_allclose(slopes[0], 2.0 ** (-8 / 64), rtol=1e-6)
    np.testing.assert_allclose(slopes[63], 2.0**-8, rtol=1e-6)  # base**64: the last of the power-of-two branch
    np.testing.assert_allclose(slopes[64], extra_base, rtol=1e-6)
    np.testing.assert_allclose(slopes[111], extra_base**95, rtol=1e-6)  # the 48th odd power
    assert np.all(np.diff(slopes[:64]) < 0) and np.all(np.diff(slopes[64:]) < 0)


def test_bias_positions_under_padding():
    mask = np.array([[0, 0, 1, 1, 1],   # left-padded
                     [1, 1, 1, 1, 1],   # no padding
                     [1, 1, 0, 0, 0]])  # right-padded
    positions = np.array([[0, 0, 0, 1, 2],
                          [0, 1, 2, 3, 4],
                          [0, 1, 0, 0, 0]], dtype=np.float64)
    n = 6
    bias = np.asarray(alibi_bias(mask, n))
    assert bias.shape == (3, n, 1, 5) and bias.dtype == np.float32
    expected = slopes_float64(n)[None, :, None, None] * positions[:, None, None, :]
    np.testing.assert_allclose(bias, expected, rtol=1e-6, atol=0)
    assert np.all(bias[:, :, 0, :].transpose(0, 2, 1)[mask == 0] == 0.0)  # pads get exactly 0, in every head
    # The first real token of the left-padded row sits at position 0, and its bias row is the unpadded one shifted.
    np.testing.assert_array_equal(bias[0, :, :, 2:], bias[1, :, :, :3])
    # transformers' [b * n, 1, t] tensor, split back into batch and heads.
    theirs = build_alibi_tensor(torch.as_tensor(mask), n, torch.float32).reshape(3, n, 1, 5).numpy()
    np.testing.assert_allclose(bias, theirs, rtol=1e-6, atol=0)
