"""Every implementation of every kernel against its reference: attention (forward and gradients, padding, 112 heads,
lengths that are not a multiple of the block, a cache offset), the decode matmul of each weight format, the argmax,
the barriers; and the choice of implementations by platform."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (CASES, assert_equals_the_reference, assert_model_equals_the_reference,
                             assert_packed_equals_the_reference, attention_inputs, relative_to_largest)
from reference import tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.kernels import Kernels, attend, attention, barriers, decode_matmul, pick
from bloom_jax.kernels.attention import AttentionMask
from bloom_jax.model import make_model
from bloom_jax.weights import DECODE_WEIGHTS


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("blocks", [(8, 8), (16, 4), (64, 64)])
def test_blockwise_attention_equals_the_reference_forward_and_backward(name, blocks):
    assert_equals_the_reference(CASES[name], name,
                                lambda q, k, v, mask: attention.blockwise(q, k, v, mask, jnp.float32, *blocks))


# cuDNN itself needs a GPU; its call, bias and masks run here through the XLA implementation of the same
# `jax.nn.dot_product_attention`, which cuDNN's tests in JAX hold it to.
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case["start"] == 0])
def test_cudnn_attention_call_equals_the_reference_forward_and_backward(name):
    assert_equals_the_reference(CASES[name], name,
                                lambda q, k, v, mask: attention.cudnn(q, k, v, mask, jnp.float32, "xla"))


@pytest.mark.parametrize("implementation", ["blockwise", "cudnn"])
def test_packed_rows_attend_within_their_own_example_forward_and_backward(implementation):
    # Blockwise with blocks of 8 that straddle the examples' edges; cuDNN's call through XLA, the segments in its
    # bias. (flash: kernels/test_flash.py.)
    assert_packed_equals_the_reference(
        lambda q, k, v, mask: attention.blockwise(q, k, v, mask, jnp.float32, 8, 8) if implementation == "blockwise"
        else attention.cudnn(q, k, v, mask, jnp.float32, "xla"))


def test_cudnn_attention_in_bfloat16_at_2048_positions_keeps_the_bias_exact_near_the_diagonal():
    # slope 1/2 * position 2047 is 1023.5 in float32 and 1024 in bfloat16; relative to the query it is 0 on the
    # diagonal. Measured: 0.0057 of the largest value from the float32 reference, as the reference itself on
    # bfloat16 inputs with a float32 bias; the absolute bias rounded to bfloat16 gives 0.108.
    b, n, s, h = 1, 2, 2048, 8
    q, k, v, key_mask = attention_inputs(b, n, s, s, h, seed=5, pad=(100,), dtype=jnp.float32)
    mask = AttentionMask.create(key_mask, n, s, 0)
    keep = np.broadcast_to(np.asarray(key_mask)[:, None, :, None] > 0, q.shape)
    ref = np.where(keep, attention.reference(q, k, v, mask, jnp.float32), 0)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ours = relative_to_largest(np.where(keep, attention.cudnn(*bf16, mask, jnp.bfloat16, "xla"), 0), ref)
    bf16_inputs = relative_to_largest(np.where(keep, attention.reference(*bf16, mask, jnp.bfloat16), 0), ref)
    rounded = dataclasses.replace(mask, alibi=mask.alibi.astype(jnp.bfloat16).astype(jnp.float32))
    rounded_bias = relative_to_largest(np.where(keep, attention.reference(*bf16, rounded, jnp.bfloat16), 0), ref)
    assert ours <= 1.05 * bf16_inputs and ours <= 1e-2
    assert rounded_bias >= 10 * ours


def test_cudnn_applies_to_whole_even_sequences_in_half_precision_only():
    q, k, _, key_mask = attention_inputs(1, 2, 6, 6, 8, dtype=jnp.bfloat16)
    whole = AttentionMask.create(key_mask, 2, 6, 0, dense=False)
    assert attention.cudnn_applies(q, k, whole, jnp.bfloat16)
    assert attention.cudnn_applies(q, k, whole, jnp.float16)
    assert not attention.cudnn_applies(q, k, whole, jnp.float32)
    assert not attention.cudnn_applies(q[:, :, :5], k[:, :, :5], whole, jnp.bfloat16)  # odd length
    assert not attention.cudnn_applies(q[:, :, :4], k, whole, jnp.bfloat16)  # a chunk into a cache
    assert not attention.cudnn_applies(q, k, dataclasses.replace(whole, query_start=jnp.int32(0)), jnp.bfloat16)
    assert not attention.cudnn_applies(q[..., :6], k[..., :6], whole, jnp.bfloat16)  # head size 6
    packed = AttentionMask.create(key_mask, 2, 6, 0, dense=False, segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 2]]))
    assert attention.cudnn_applies(q, k, packed, jnp.bfloat16)  # the segments go into the bias


@pytest.mark.slow
def test_the_model_with_cudnn_attention_gives_the_reference_logits(monkeypatch):
    config = tiny_config(n_layer=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 20)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :4].set(0)
    cudnn = dataclasses.replace(Kernels.create(attention="cudnn", platform="gpu"), decode_matmul="reference")
    reference_model = make_model(config, dtype=jnp.bfloat16, attention="reference")
    cudnn_model = make_model(config, dtype=jnp.bfloat16, kernels=cudnn)
    params = reference_model.init(jax.random.key(0), ids)["params"]
    calls = []
    monkeypatch.setattr(attention, "cudnn", lambda *args: calls.append(1) or CUDNN_CALL(*args, "xla"))
    logits, ref_logits = (jax.jit(lambda p, m=model: m.apply({"params": p}, ids, attention_mask=mask))(params)
                          for model in (cudnn_model, reference_model))
    assert len(calls) == 2  # one trace of each of the two layers
    keep = np.broadcast_to(np.asarray(mask)[..., None] > 0, logits.shape)
    assert relative_to_largest(np.where(keep, logits, 0), np.where(keep, ref_logits, 0)) <= 2e-2


CUDNN_CALL = attention.cudnn


def test_blockwise_attention_on_the_cache_layout_and_in_bfloat16():
    q, k, v, key_mask = attention_inputs(2, 4, 6, 24, 16, seed=3, pad=(5, 0), dtype=jnp.bfloat16)
    mask = AttentionMask.create(key_mask, 4, 6, 18, dense=False)
    merged = [x.reshape(8, 24, 16) for x in (k, v)]  # [b*n, t, h], as the KV cache holds them
    ref = attention.reference(q, *merged, mask, jnp.bfloat16)
    out = attention.blockwise(q, *merged, mask, jnp.bfloat16, 4, 8)
    assert out.dtype == jnp.bfloat16
    assert relative_to_largest(out.astype(jnp.float32), ref.astype(jnp.float32)) <= 2e-2  # bf16's 8 bits


def test_blockwise_attention_holds_no_score_matrix():
    b, n, s, h = 1, 2, 256, 8
    q, k, v, key_mask = attention_inputs(b, n, s, s, h)
    mask = AttentionMask.create(key_mask, n, s, 0, dense=False)

    def loss(q, k, v):
        return jnp.sum(attention.blockwise(q, k, v, mask, jnp.float32, 32, 32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert f"f32[{b},{n},{s},{s}]" not in text and f"[{b},{n},32,32]" in text


@pytest.mark.slow
def test_the_model_with_blockwise_attention_gives_the_reference_logits_and_gradients():
    config = tiny_config(n_layer=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 21)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :4].set(0)
    assert_model_equals_the_reference(config, dataclasses.replace(Kernels.create(attention="blockwise"), block_q=8,
                                                                  block_k=8), ids, mask)


def test_one_query_row_and_one_block_take_the_reference():
    kernels = dataclasses.replace(Kernels.create(attention="blockwise"), block_q=8, block_k=16)
    assert [kernels.attention_at(s, t) for s, t in ((1, 900), (8, 16), (9, 16), (8, 17))] == [
        "reference", "reference", "blockwise", "blockwise"]
    assert dataclasses.replace(kernels, attention="cudnn").attention_at(8, 16) == "cudnn"
    q, k, v, key_mask = attention_inputs(1, 2, 1, 9, 4)
    mask = AttentionMask.create(key_mask, 2, 1, 8, dense=False)
    np.testing.assert_array_equal(attend(kernels, q, k, v, mask, jnp.float32),
                                  attention.reference(q, k, v, mask, jnp.float32))


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_matmul_implementations_agree(weights, batch):
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.normal(0, 1, (batch, 48)), jnp.float32)
    kernel = rng.normal(0, 1, (40, 48))
    scale = None
    if weights == "int8":
        scale = jnp.asarray(np.abs(kernel).max(axis=1) / 127, jnp.float32)
        kernel = np.round(kernel / np.asarray(scale)[:, None])
    kernel = jnp.asarray(kernel, DECODE_WEIGHTS[weights])
    ref = decode_matmul.reference(x, kernel, scale)
    assert ref.shape == (batch, 40) and ref.dtype == jnp.float32
    np.testing.assert_allclose(decode_matmul.xla_cpu(x, kernel, scale), ref, rtol=1e-6, atol=1e-5)
    # And both near the float product (int8: activations quantized to 8 bits per token).
    exact = np.asarray(x, np.float64) @ (np.asarray(kernel.astype(jnp.float32), np.float64).T
                                         * (1 if scale is None else np.asarray(scale)[None, :]))
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 2e-2}[weights]
    assert relative_to_largest(ref, exact) <= tolerance


@pytest.mark.parametrize("vocab, block", [(250_880, 1024), (1000, 64), (7, 1024), (100, 7)])
def test_two_pass_argmax_equals_argmax(vocab, block):
    rng = np.random.default_rng(vocab)
    x = rng.integers(-3, 4, (6, vocab)).astype(np.float32)  # few distinct values: many ties
    x[1] = -np.inf  # nothing left: index 0, as jnp.argmax
    x[2, [vocab // 3, vocab - 1]] = 10.0  # the first of two maxima
    x[3, [vocab // 2, vocab - 1]] = np.inf  # the first of two infinities
    x[4, -1] = 10.0  # the maximum in the last (possibly padded) block
    expected = np.asarray(pick.reference(jnp.asarray(x)))
    assert expected[2] == vocab // 3 and expected[3] == vocab // 2 and expected[4] == vocab - 1
    np.testing.assert_array_equal(np.asarray(pick.xla_cpu(jnp.asarray(x), block)), expected)


@pytest.mark.slow
def test_gradient_barrier_is_the_identity_and_cuts_the_backward_pass_at_each_block():
    x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
    f = lambda x: jnp.sum(jnp.sin(barriers.gradient_barrier_xla_cpu(x) * 3.0) ** 2)  # noqa: E731
    g = lambda x: jnp.sum(jnp.sin(x * 3.0) ** 2)  # noqa: E731
    np.testing.assert_array_equal(f(x), g(x))
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(f)(x.at[0, 0].set(jnp.nan))[1:], jax.grad(g)(x)[1:])  # NaN branch

    # One conditional per block in the compiled gradient of the unrolled model with XLA:CPU's kernels (the cuts
    # XLA:CPU cannot fuse over), none with the references.
    config = tiny_config(n_layer=3)
    ids = jnp.zeros((1, 5), jnp.int32)
    for kernels, conditionals in (("xla_cpu", config.n_layer), ("reference", 0)):
        model = make_model(config, scan_layers=False, kernels=kernels)
        params = model.init(jax.random.key(0), ids)["params"]
        loss = lambda p: model.apply({"params": p}, ids).sum()  # noqa: E731
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        assert hlo.count(" conditional(") == conditionals, kernels


def test_gathers_agree():
    table = jnp.asarray(np.random.default_rng(0).normal(0, 1, (50, 8)), jnp.bfloat16)
    ids = jnp.asarray([[3, 49, 0], [7, 7, 1]], jnp.int32)
    np.testing.assert_array_equal(barriers.gather_xla_cpu(table, ids), barriers.gather_reference(table, ids))


def test_kernels_by_platform_and_by_name():
    assert Kernels.create(platform="cpu") == Kernels("blockwise", "xla_cpu", "xla_cpu", "xla_cpu", "xla_cpu",
                                                     decode_scan_layers=False)
    for platform in ("tpu", "gpu"):
        assert Kernels.create(platform=platform) == Kernels(attention="blockwise", flash_backend=platform)
    assert Kernels.create("reference", "reference", platform="tpu") == Kernels()
    assert Kernels.create("xla_cpu", platform="tpu").decode_matmul == "xla_cpu"
    assert Kernels.create(attention="cudnn", platform="gpu").attention == "cudnn"
    with pytest.raises(BloomJaxError, match="attention 'cudnn' needs an NVIDIA GPU; this platform is tpu"):
        Kernels.create(attention="cudnn", platform="tpu")
    with pytest.raises(BloomJaxError, match="unknown attention 'splash'"):
        Kernels.create(attention="splash")
    with pytest.raises(BloomJaxError, match="unknown kernels 'cuda'"):
        Kernels.create("cuda")
