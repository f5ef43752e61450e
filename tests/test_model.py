"""Our BLOOM against transformers' PyTorch BLOOM (the reference), and the model's own options."""

from __future__ import annotations

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec
from reference import (
    PARITY_RTOL,
    PROMPT_LENGTHS,
    assert_parity,
    hf_logits,
    jax_logits,
    padded,
    random_ids,
    relative_max_error,
)

from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import from_pretrained
from bloom_jax.model import (
    LayerNorm,
    abstract_params,
    make_model,
    param_logical_axes,
    stack_layers,
    unstack_layers,
)


def batch(config, padding: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of lengths PROMPT_LENGTHS padded on `padding`'s side, or a full batch when it is None."""
    if padding is None:
        ids = random_ids(config, len(PROMPT_LENGTHS), max(PROMPT_LENGTHS))
        return ids, np.ones_like(ids)
    return padded(config, PROMPT_LENGTHS, padding)


def leaf_dtypes(params) -> set:
    return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(nn.unbox(params))}


@pytest.mark.parametrize("overrides, padding", [
    pytest.param({}, "left", id="8_heads"),
    pytest.param({"hidden_size": 48, "n_head": 6}, "left", id="6_heads"),
    pytest.param({"hidden_size": 96, "n_head": 12}, "left", id="12_heads"),
    pytest.param({"apply_residual_connection_post_layernorm": True}, "left", id="post_layernorm_residual"),
    pytest.param({"pretraining_tp": 3, "slow_but_exact": True}, "left", id="slow_but_exact_uneven_tp3"),
    pytest.param({}, "right", id="right_padded"),
    pytest.param({}, None, id="unpadded"),
])
def test_parity_with_transformers(make_checkpoint, overrides, padding):
    checkpoint = make_checkpoint(**overrides)
    ids, mask = batch(checkpoint.config, padding)
    model, params = from_pretrained(checkpoint.directory)
    assert model.config == checkpoint.config
    assert_parity(jax_logits(model, params, ids, mask), hf_logits(checkpoint.torch_model, ids, mask), mask)


def test_slow_but_exact_is_exercised(make_checkpoint):
    exact, plain = make_checkpoint(pretraining_tp=2, slow_but_exact=True), make_checkpoint(pretraining_tp=2)
    for a, b in zip(exact.torch_model.state_dict().values(), plain.torch_model.state_dict().values()):
        assert torch.equal(a, b)  # same weights: any difference below comes from the computation path
    ids, mask = batch(exact.config, "left")
    ours = {}
    for name, checkpoint in (("exact", exact), ("plain", plain)):
        model, params = from_pretrained(checkpoint.directory)
        ours[name] = jax_logits(model, params, ids, mask)
        assert_parity(ours[name], hf_logits(checkpoint.torch_model, ids, mask), mask)
    # The slow path skips the biases of `self_attention.dense` and `mlp.dense_4h_to_h` (spread 0.3 here).
    assert relative_max_error(ours["exact"], ours["plain"], mask) > 100 * PARITY_RTOL


def test_bfloat16_no_worse_than_pytorch(tiny):
    model, params = from_pretrained(tiny.checkpoint.directory, dtype="bfloat16")
    assert leaf_dtypes(params) == {jnp.dtype(jnp.bfloat16)}
    ours = jax_logits(model, params, tiny.ids, tiny.mask)
    assert ours.dtype == np.float32
    theirs = hf_logits(copy.deepcopy(tiny.checkpoint.torch_model).to(torch.bfloat16), tiny.ids, tiny.mask)
    our_error = relative_max_error(ours, tiny.ref, tiny.mask)
    torch_error = relative_max_error(theirs, tiny.ref, tiny.mask)
    # bf16 keeps 8 mantissa bits: ~4e-3 relative error per rounding, accumulated over the layers. We keep
    # LayerNorm statistics, softmax and logits in fp32 (PyTorch's bf16 model returns bf16 logits), so we should be
    # no worse than PyTorch's bf16 error; 2x leaves room for rounding luck, 2e-2 is the floor when both are tiny.
    # The lower bound shows the computation really ran in bf16.
    assert 1e-4 < our_error <= max(2 * torch_error, 2e-2), (our_error, torch_error)


def test_layernorm_statistics_in_float32():
    """bf16 activations far from zero (mean 100, spread 4): bf16 statistics would be off by ~1e-1."""
    x = jnp.asarray(100 + 4 * np.random.default_rng(0).normal(size=(2, 5, 64)), jnp.bfloat16)
    d = x.shape[-1]
    params = {"scale": jnp.full((d,), 1.5, jnp.bfloat16), "bias": jnp.full((d,), 0.25, jnp.bfloat16)}
    ours = LayerNorm(1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply({"params": params}, x)
    assert ours.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    normalized = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    # Only the final rounding to bf16 remains: 2**-8 relative on outputs of magnitude up to ~5.
    np.testing.assert_allclose(np.asarray(ours, np.float64), 1.5 * normalized + 0.25, rtol=2 ** -8, atol=2e-2)


def test_float16_params_float32_compute(tiny):
    model, params = from_pretrained(tiny.checkpoint.directory, dtype="float32", param_dtype="float16")
    assert leaf_dtypes(params) == {jnp.dtype(jnp.float16)} and model.dtype == jnp.float32
    ours = jax_logits(model, params, tiny.ids, tiny.mask)
    # The same weights rounded to fp16, computed in fp32 by PyTorch: the fp32 parity bar holds.
    rounded = copy.deepcopy(tiny.checkpoint.torch_model).half().float()
    assert_parity(ours, hf_logits(rounded, tiny.ids, tiny.mask), tiny.mask)
    assert relative_max_error(ours, tiny.ref, tiny.mask) > 10 * PARITY_RTOL  # the rounding did happen


def test_unrolled_equals_scanned(tiny):
    unrolled = make_model(tiny.config, scan_layers=False)
    unrolled_params = unstack_layers(tiny.params)
    shapes = functools.partial(jax.tree.map, lambda leaf: (leaf.shape, leaf.dtype))
    assert shapes(nn.unbox(abstract_params(unrolled))) == shapes(unrolled_params)
    assert sorted(k for k in unrolled_params if k.startswith("h_")) == [f"h_{i}" for i in range(tiny.config.n_layer)]
    ours = jax_logits(unrolled, unrolled_params, tiny.ids, tiny.mask)
    assert relative_max_error(ours, jax_logits(tiny.model, tiny.params, tiny.ids, tiny.mask), tiny.mask) <= 1e-6
    restacked = stack_layers(unrolled_params, tiny.config.n_layer)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restacked, tiny.params))


def test_unrolled_loads_from_hf(tiny):
    model, params = from_pretrained(tiny.checkpoint.directory, scan_layers=False)
    assert "h" not in params and "h_0" in params
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(model, params, ids, mask):
    """Mean next-token cross-entropy over pairs of real tokens, and its gradient."""

    def loss(p):
        log_probs = jax.nn.log_softmax(model.apply({"params": p}, ids, mask)[:, :-1])
        token_log_probs = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
        weight = mask[:, 1:] * mask[:, :-1]
        return -jnp.sum(token_log_probs * weight) / jnp.sum(weight)

    return jax.value_and_grad(loss)(params)


@pytest.fixture(scope="module")
def no_remat(tiny):
    return loss_and_grads(make_model(tiny.config, remat_policy="none"), tiny.params, tiny.ids, tiny.mask)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policy_keeps_loss_and_grads(tiny, no_remat, policy):
    loss, grads = loss_and_grads(make_model(tiny.config, remat_policy=policy), tiny.params, tiny.ids, tiny.mask)
    ref_loss, ref_grads = no_remat
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    flat, ref_flat = flatten_dict(grads), flatten_dict(ref_grads)
    assert flat.keys() == ref_flat.keys()
    for path, ref_grad in ref_flat.items():
        scale = float(jnp.max(jnp.abs(ref_grad)))
        assert scale > 0, path  # every parameter gets a gradient, so the comparison means something
        assert float(jnp.max(jnp.abs(flat[path] - ref_grad))) <= 1e-5 * scale, path


def test_unknown_remat_policy(tiny):
    with pytest.raises(BloomJaxError, match="unknown remat policy 'bogus'"):
        jax_logits(make_model(tiny.config, remat_policy="bogus"), tiny.params, tiny.ids, tiny.mask)


@pytest.mark.parametrize("rates", [
    pytest.param({"hidden_dropout": 0.1}, id="hidden"),
    pytest.param({"attention_dropout": 0.1}, id="attention"),
    pytest.param({"hidden_dropout": 0.1, "attention_dropout": 0.1}, id="both"),
])
def test_dropout(tiny, rates):
    model = make_model(tiny.config.replace(**rates))
    run = functools.partial(jax_logits, model, tiny.params, tiny.ids, tiny.mask)
    deterministic = run()
    assert relative_max_error(deterministic, jax_logits(tiny.model, tiny.params, tiny.ids, tiny.mask)) <= 1e-6
    # "rbg" keys: threefry's bit generator takes ~5 s to compile on this CPU; dropout does not depend on the impl.
    key = functools.partial(jax.random.key, impl="rbg")
    dropped = run(deterministic=False, rngs={"dropout": key(0)})
    assert relative_max_error(dropped, deterministic, tiny.mask) > 1e-2
    np.testing.assert_array_equal(run(deterministic=False, rngs={"dropout": key(0)}), dropped)
    other = run(deterministic=False, rngs={"dropout": key(1)})
    assert relative_max_error(other, dropped, tiny.mask) > 1e-2


@pytest.mark.parametrize("dtype, param_dtype, stored", [
    (jnp.bfloat16, None, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32),
])
def test_compute_and_param_dtypes(tiny, dtype, param_dtype, stored):
    model = make_model(tiny.config, dtype=dtype, param_dtype=param_dtype)
    # abstract_params is jax.eval_shape of `init`: exactly the dtypes init returns, without compiling the random
    # init (about 8 s on this CPU).
    assert leaf_dtypes(abstract_params(model)) == {jnp.dtype(stored)}
    params = jax.tree.map(lambda p: p.astype(stored), tiny.params)
    logits = jax_logits(model, params, tiny.ids, tiny.mask)
    assert logits.dtype == np.float32
    assert relative_max_error(logits, tiny.ref, tiny.mask) < 2e-2  # bf16 compute, still the same model


def test_every_param_has_logical_axes(tiny):
    specs = flatten_dict(param_logical_axes(tiny.model))
    shapes = flatten_dict(nn.unbox(abstract_params(tiny.model)))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        shape = shapes[path].shape
        assert isinstance(spec, PartitionSpec), path
        assert len(spec) == len(shape) and all(isinstance(name, str) for name in spec), (path, spec)
        is_block = path[0] == "h"
        assert (spec[0] == "layers") == is_block, (path, spec)
        assert not is_block or shape[0] == tiny.config.n_layer


def test_no_mask_equals_all_ones(tiny):
    ids = random_ids(tiny.config, 2, 6, seed=1)
    no_mask = jax_logits(tiny.model, tiny.params, ids)
    assert relative_max_error(no_mask, jax_logits(tiny.model, tiny.params, ids, np.ones_like(ids))) <= 1e-6
    assert_parity(no_mask, hf_logits(tiny.checkpoint.torch_model, ids))


def test_called_with_the_ecosystems_keywords(tiny):
    """`apply(variables, input_ids, attention_mask=...)`, as transformers' Flax models and JAX LLM code call it."""
    apply = jax.jit(lambda p, ids, mask: tiny.model.apply({"params": p}, input_ids=ids, attention_mask=mask))
    by_keyword = np.asarray(apply(tiny.params, tiny.ids, tiny.mask))
    assert_parity(by_keyword, tiny.ref, tiny.mask)
    positional = np.asarray(jax.jit(lambda p: tiny.model.apply({"params": p}, tiny.ids, tiny.mask))(tiny.params))
    np.testing.assert_array_equal(by_keyword, positional)
    # No mask: every token is real, as with a mask of ones.
    full = np.ones_like(tiny.ids)
    no_mask = jax.jit(lambda p: tiny.model.apply({"params": p}, input_ids=tiny.ids))(tiny.params)
    np.testing.assert_array_equal(np.asarray(no_mask), np.asarray(apply(tiny.params, tiny.ids, full)))
