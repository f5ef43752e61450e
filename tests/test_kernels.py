"""Every implementation of every kernel against its reference: attention (forward and gradients, padding, 112 heads,
lengths that are not a multiple of the block, a cache offset), the decode matmul of each weight format, the argmax,
the barriers; and the choice of implementations by platform."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.kernels import Kernels, attend, attention, barriers, decode_matmul, pick
from bloom_jax.kernels.attention import AttentionMask
from bloom_jax.model import make_model


def relative_to_largest(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def attention_inputs(b, n, s, t, h, seed=0, pad=(), dtype=jnp.float32):
    """q [b, n, s, h], k, v [b, n, t, h] and a key mask [b, t] with `pad[i]` left-padding keys in row i."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(0, 1, shape), dtype) for shape in ((b, n, s, h), (b, n, t, h), (b, n, t, h)))
    key_mask = np.ones((b, t), np.int32)
    for row, count in enumerate(pad):
        key_mask[row, :count] = 0
    return q, k, v, jnp.asarray(key_mask)


# Heads 112 as BLOOM-176B (slopes' second branch); lengths 37 and 70 not multiples of the blocks; a cache offset:
# 5 queries at key positions 9..13 of 16 keys.
CASES = {
    "square": dict(b=2, n=4, s=37, t=37, start=0, pad=(0, 6)),
    "112 heads": dict(b=1, n=112, s=20, t=20, start=0, pad=(3,)),
    "long": dict(b=1, n=2, s=70, t=70, start=0, pad=(11,)),
    "cache offset": dict(b=2, n=3, s=5, t=16, start=9, pad=(2, 0)),
}


def real_queries(case) -> np.ndarray:
    """bool [b, s]: the queries at real tokens (a padding query's output is unspecified)."""
    keep = np.ones((case["b"], case["s"]), bool)
    for row, count in enumerate(case["pad"]):
        keep[row, : max(0, count - case["start"])] = False
    return keep


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("blocks", [(8, 8), (16, 4), (64, 64)])
def test_blockwise_attention_equals_the_reference_forward_and_backward(name, blocks):
    case = CASES[name]
    q, k, v, key_mask = attention_inputs(case["b"], case["n"], case["s"], case["t"], 8, seed=len(name),
                                         pad=case["pad"])
    mask = AttentionMask.create(key_mask, case["n"], case["s"], case["start"], dense=False)
    keep = jnp.asarray(real_queries(case))[:, None, :, None]
    cotangent = jax.random.normal(jax.random.key(1), q.shape) * keep  # padding queries feed nothing

    def run(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v) * cotangent)

        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    ref_out, ref_grads = run(lambda q, k, v: attention.reference(q, k, v, mask, jnp.float32))
    out, grads = run(lambda q, k, v: attention.blockwise(q, k, v, mask, jnp.float32, *blocks))
    keep_np = np.broadcast_to(np.asarray(keep), out.shape)
    assert relative_to_largest(np.where(keep_np, out, 0), np.where(keep_np, ref_out, 0)) <= 2e-6
    for got, want, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert relative_to_largest(got, want) <= 2e-6, what


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


def test_the_model_with_blockwise_attention_gives_the_reference_logits_and_gradients():
    config = tiny_config(n_layer=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 21)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :4].set(0)
    reference_model = make_model(config, attention="reference")
    blockwise_model = make_model(config, kernels=dataclasses.replace(Kernels.create(attention="blockwise"),
                                                                     block_q=8, block_k=8))
    params = reference_model.init(jax.random.key(0), ids)["params"]

    def loss(model, p):
        logits = model.apply({"params": p}, ids, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0) ** 2), logits

    (_, ref_logits), ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(reference_model, p), has_aux=True))(params)
    (_, logits), grads = jax.jit(jax.value_and_grad(lambda p: loss(blockwise_model, p), has_aux=True))(params)
    keep = np.broadcast_to(np.asarray(mask)[..., None] > 0, logits.shape)
    assert relative_to_largest(np.where(keep, logits, 0), np.where(keep, ref_logits, 0)) <= 2e-6
    worst = max(relative_to_largest(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert worst <= 2e-5


def test_one_query_row_takes_the_reference():
    q, k, v, key_mask = attention_inputs(1, 2, 1, 9, 4)
    mask = AttentionMask.create(key_mask, 2, 1, 8, dense=False)
    kernels = Kernels.create(attention="blockwise")
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
    kernel = jnp.asarray(kernel, decode_matmul.DECODE_WEIGHTS[weights])
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
    assert Kernels.create(platform="cpu") == Kernels("reference", "xla_cpu", "xla_cpu", "xla_cpu", "xla_cpu")
    for platform in ("tpu", "gpu"):
        assert Kernels.create(platform=platform) == Kernels(attention="blockwise")
    assert Kernels.create("reference", "blockwise", platform="cpu") == Kernels(attention="blockwise")
    assert Kernels.create("xla_cpu", platform="tpu").decode_matmul == "xla_cpu"
    with pytest.raises(BloomJaxError, match="unknown attention 'flash'"):
        Kernels.create(attention="flash")
    with pytest.raises(BloomJaxError, match="unknown kernels 'cuda'"):
        Kernels.create("cuda")
