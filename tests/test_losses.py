"""The next-token loss with the tied head applied a chunk at a time: the plain path's loss and gradients, and a
compiled train step that holds no [b, s, V] logits and, with blockwise attention, no [b, n, s, s] scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from reference import tiny_config

from bloom_jax.losses import next_token_loss, tied_head_cross_entropy
from bloom_jax.model import init_params, make_model


def plain_loss(model, params, tokens):
    """The [b, s, V] logits, then optax's cross-entropy: what the chunked loss must equal."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    model = make_model(config)
    params = init_params(model, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 20)), jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: plain_loss(model, p, tokens)))(params)
    return model, params, tokens, loss, flatten_dict(grads)


@pytest.mark.parametrize("chunk_tokens", [3, 15, 21, 54])  # 1, 5 (not dividing 19), 7 and 18 of 19 positions
def test_chunked_loss_and_gradients_equal_the_plain_path(setup, chunk_tokens):
    model, params, tokens, expected_loss, expected_grads = setup
    loss, grads = jax.jit(jax.value_and_grad(lambda p: next_token_loss(model, p, tokens,
                                                                       chunk_tokens=chunk_tokens)))(params)
    assert abs(float(loss) - float(expected_loss)) <= 1e-6 * abs(float(expected_loss))
    for path, grad in flatten_dict(grads).items():
        want = np.asarray(expected_grads[path])
        assert np.max(np.abs(np.asarray(grad) - want)) <= 1e-6 * np.max(np.abs(want)), path


def test_the_loss_alone_computes_no_gradient_terms(setup):
    model, params, tokens, expected_loss, _ = setup
    assert abs(float(jax.jit(lambda p: next_token_loss(model, p, tokens, chunk_tokens=15))(params))
               - float(expected_loss)) <= 1e-6 * float(expected_loss)
    # The chunked function in one chunk (the loss itself then takes the plain path) computes the same.
    hidden = model.apply({"params": params}, tokens[:, :-1], return_hidden=True)
    one_chunk = tied_head_cross_entropy(hidden, params["word_embeddings"]["embedding"], tokens[:, 1:], 19)
    assert abs(float(one_chunk) - float(expected_loss)) <= 1e-6 * float(expected_loss)
    hidden = jnp.ones((2, 5, 8))
    table = jnp.ones((50, 8))
    text = jax.jit(tied_head_cross_entropy, static_argnums=3).lower(hidden, table, jnp.zeros((2, 5), jnp.int32),
                                                                    2).compile().as_text()
    assert text.count(" dot(") == 1  # the logits' product only: no gradient products without a gradient


def test_a_frozen_table_gets_no_gradient_and_no_table_sized_buffer(setup):
    """LoRA freezes the tied embedding: the chunked loss then gives the hidden states' gradient of the plain path
    and makes no f32 [V, d] table gradient (bloom-7b1's would be 3.8 GiB)."""
    model, params, tokens, _, _ = setup
    hidden = model.apply({"params": params}, tokens[:, :-1], return_hidden=True)
    table, targets = params["word_embeddings"]["embedding"], tokens[:, 1:]

    def plain(h):
        logits = jnp.einsum("bsd,vd->bsv", h, table, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    grad_chunked = jax.jit(jax.grad(lambda h: tied_head_cross_entropy(h, table, targets, 5)))
    want = np.asarray(jax.grad(plain)(hidden))
    assert np.max(np.abs(np.asarray(grad_chunked(hidden)) - want)) <= 1e-6 * np.max(np.abs(want))
    table_gradient = "bcv,bcd->vd"  # the einsum of d_table, named in the compiled program's metadata
    assert table_gradient not in grad_chunked.lower(hidden).compile().as_text()
    both = jax.jit(jax.grad(lambda h, t: tied_head_cross_entropy(h, t, targets, 5), argnums=(0, 1)))
    assert table_gradient in both.lower(hidden, table).compile().as_text()  # which it makes when differentiated


def test_bfloat16_chunked_loss_is_close_to_the_plain_one(setup):
    _, params, tokens, _, _ = setup
    model = make_model(tiny_config(), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    plain = float(jax.jit(lambda p: plain_loss(model, p, tokens))(params))
    chunked = float(jax.jit(lambda p: next_token_loss(model, p, tokens, chunk_tokens=15))(params))
    assert abs(chunked - plain) <= 1e-2 * plain


def test_the_compiled_train_step_holds_no_logits_and_no_score_matrix():
    # b*s*V fp32 and b*n*s*s fp32 sized buffers: XLA's buffer assignment lists every buffer's shape.
    import dataclasses

    from bloom_jax.kernels import Kernels

    config = tiny_config(n_layer=2, vocab_size=1000)
    b, s = 4, 64
    kernels = dataclasses.replace(Kernels.create(attention="blockwise"), block_q=16, block_k=16)
    model = make_model(config, kernels=kernels)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((b, s + 1), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda p, t: next_token_loss(model, p, t, chunk_tokens=64)))
    text = step.lower(params, tokens).compile().as_text()
    logits, scores = f"f32[{b},{s},{config.vocab_size}]", f"f32[{b},{config.n_head},{s},{s}]"
    assert logits not in text and scores not in text
    assert f"f32[{b},16,{config.vocab_size}]" in text  # the chunk's logits: 64 tokens over 4 rows
    # The plain model does hold both, so the check can see them.
    plain = make_model(config, attention="reference")
    text = jax.jit(jax.value_and_grad(lambda p, t: plain_loss(plain, p, t))).lower(params, tokens).compile()
    assert logits in text.as_text() and scores in text.as_text()


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_chunked_loss_on_a_mesh_equals_the_plain_path(setup):
    # Rows over data x fsdp, the vocabulary over tensor: each device's chunk is its rows' positions, and the
    # log-sum-exp spans the vocabulary's shards.
    from bloom_jax.losses import _batch_shards
    from bloom_jax.sharding import ShardingPlan, make_mesh

    model, params, _, _, _ = setup
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (4, 25)), jnp.int32)
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(lambda p: plain_loss(model, p, tokens)))(params)
    plan = ShardingPlan.create(make_mesh("data=2,fsdp=2,tensor=2"), "fsdp_tensor")
    sharded = jax.device_put(params, plan.param_shardings(model))
    ids = jax.device_put(tokens, plan.batch_sharding())
    with plan.context():
        assert _batch_shards(4) == 4
        # 6 tokens per device: 6 positions of each device's one row, so 24 positions in chunks of 6.
        loss, grads = jax.jit(jax.value_and_grad(lambda p, t: next_token_loss(model, p, t, chunk_tokens=6)))(
            sharded, ids)
    assert abs(float(loss) - float(expected_loss)) <= 1e-6 * float(expected_loss)
    flat = flatten_dict(expected_grads)
    for path, grad in flatten_dict(grads).items():
        want = np.asarray(flat[path])
        assert np.max(np.abs(np.asarray(grad) - want)) <= 1e-6 * np.max(np.abs(want)), path
