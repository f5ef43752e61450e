"""The KV cache: its layouts, in-place writes, key mask and logical axes, and that both layouts decode alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from reference import random_ids, tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.cache import LAYER_AXES, KVCache, write_layer
from bloom_jax.model import unstack_layers


@pytest.mark.parametrize("per_layer", [False, True])
def test_init_shapes_and_logical_axes(per_layer):
    config = tiny_config()  # 2 layers, 8 heads of 8
    cache = KVCache.init(config, batch=3, length=5, dtype=jnp.bfloat16, per_layer=per_layer)
    layer_shape = (3 * 8, 5, 8)  # [b*n, T, h]
    if per_layer:
        assert [k.shape for k in cache.keys] == [layer_shape] * 2 and cache.per_layer
    else:
        assert cache.keys.shape == (2, *layer_shape) and not cache.per_layer
    assert cache.keys is not cache.values  # a donated state may not hold one buffer twice
    assert {a.dtype for a in jax.tree.leaves((cache.keys, cache.values))} == {jnp.dtype(jnp.bfloat16)}
    assert cache.mask.shape == (3, 5) and cache.length == 5 and int(cache.index) == 0
    axes = KVCache.logical_axes(config, per_layer)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(cache)
    for spec, array in zip(jax.tree.leaves(axes, is_leaf=is_spec), jax.tree.leaves(cache)):
        assert len(spec) == array.ndim
    layer_keys = axes.keys[0] if per_layer else PartitionSpec(*axes.keys[1:])
    assert tuple(layer_keys) == LAYER_AXES


def test_write_layer_is_batch_major_at_the_index():
    keys = jnp.zeros((2 * 3, 6, 4))  # b=2, n=3, T=6, h=4
    new_k = jnp.arange(2 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 4)  # [b, n, s=2, h]
    k, v = write_layer(keys, keys, new_k, -new_k, jnp.int32(3))
    expected = np.zeros((6, 6, 4), np.float32)
    expected[:, 3:5] = np.asarray(new_k).reshape(6, 2, 4)  # row b * n + head
    np.testing.assert_array_equal(np.asarray(k), expected)
    np.testing.assert_array_equal(np.asarray(v), -expected)


@pytest.mark.parametrize("per_layer", [False, True])
def test_insert_row_copies_a_prompt_into_a_slot_with_its_padding_rolled_away(per_layer):
    config = tiny_config()  # 2 layers, 8 heads of 8
    slots = KVCache.init(config, batch=3, length=6, per_layer=per_layer, per_row=True)
    prefilled = KVCache.init(config, batch=2, length=4, per_layer=per_layer)
    # Prefill row 1 holds a prompt of 3 tokens left-padded to 4: position p of head j holds 100 * j + p.
    filled_zth = jnp.broadcast_to(100.0 * jnp.arange(2 * 8)[:, None, None] + jnp.arange(4)[None, :, None],
                                  (2 * 8, 4, 8))
    layers = (filled_zth,) * 2 if per_layer else jnp.stack([filled_zth] * 2)
    prefilled = prefilled.replace(keys=layers, values=jax.tree.map(lambda x: -x, layers))
    got = slots.insert_row(prefilled, jnp.int32(1), jnp.int32(2), jnp.int32(3))
    keys_zth, values_zth = got.layer(1)
    head_j = 8 + jnp.arange(8)  # prefill row 1's heads
    want_nth = 100.0 * head_j[:, None, None] + jnp.asarray([1, 2, 3, 0, 0, 0], jnp.float32)[None, :, None]
    want_nth = jnp.where(jnp.arange(6)[None, :, None] < 4, want_nth, 0.0)  # the rolled padding lands at 3
    np.testing.assert_array_equal(keys_zth[16:], jnp.broadcast_to(want_nth, (8, 6, 8)))
    np.testing.assert_array_equal(values_zth[16:], -keys_zth[16:])
    assert not np.asarray(keys_zth[:16]).any()  # the other slots untouched
    np.testing.assert_array_equal(got.mask, [[0] * 6, [0] * 6, [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(got.index, [0, 0, 3])
    assert got.nbytes == slots.nbytes == 2 * 2 * 3 * 8 * 6 * 8 * 4


def test_new_tokens_extend_the_key_mask_and_advance_the_index():
    cache = KVCache.init(tiny_config(), batch=2, length=6)
    cache = cache.replace(index=jnp.int32(2))
    mask = cache.with_new_tokens(jnp.array([[1, 1, 0], [1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(mask), [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    moved = cache.advance(list(cache.keys), list(cache.values), mask, 3)
    assert int(moved.index) == 5 and not moved.per_layer and moved.keys.shape == cache.keys.shape


@pytest.mark.slow
def test_both_layouts_decode_alike(tiny):
    """An unrolled model over a per-layer cache and over a stacked one: the same logits, step by step."""
    model, params = tiny.model.clone(scan_layers=False), unstack_layers(tiny.params)
    ids = random_ids(tiny.config, 2, 6)

    def run(per_layer: bool) -> list[np.ndarray]:
        cache = KVCache.init(tiny.config, 2, 6, per_layer=per_layer)
        logits, cache = model.apply({"params": params}, ids[:, :4], cache=cache)
        out = [np.asarray(logits)]
        for pos in (4, 5):
            logits, cache = model.apply({"params": params}, ids[:, pos:pos + 1], cache=cache)
            out.append(np.asarray(logits))
        assert cache.per_layer == per_layer and int(cache.index) == 6
        return out

    for a, b in zip(run(True), run(False)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_scanned_model_needs_a_stacked_cache(tiny):
    cache = KVCache.init(tiny.config, 1, 4, per_layer=True)
    with pytest.raises(BloomJaxError, match="needs a stacked KV cache"):
        tiny.model.apply({"params": tiny.params}, np.ones((1, 2), np.int32), cache=cache)
