"""The KV cache of generation: its shapes, dtype, layouts, in-place update and logical axes, in one place.

Each layer's keys and values are [b*n, T, h]: batch and heads merged, batch-major, as transformers' BLOOM lays out
its keys. With [b, n, T, h], at batch 1 XLA:CPU squeezed the size-1 axis for the attention products and, to do
so, copied every layer's cache several times per token (197 copies, 10% of a bloom-560m decode step).

Two layouts of the layers: stacked [l, b*n, T, h] (for a scanned model, whose `nn.scan` slices it), or a tuple of
l arrays (for an unrolled model: each updated in place, none sliced or restacked per token). The key mask [b, T]
marks the positions written with real tokens: ALiBi positions count its ones, so left padding and cached tokens
get the positions transformers gives them.

The write position `index` is one for the whole batch (int32 []), or one per row (int32 [b]) for a server's
decode slots, whose sequences sit at different lengths (`bloom_jax.serving`): the write is then a scatter, and
`insert_row` copies a prefilled prompt into a slot.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from bloom_jax.config import BloomConfig

# Logical axes of one layer's keys or values [b*n, T, h]: the rules shard the merged axis over the batch's mesh
# axes, then the heads' (see configs/sharding).
LAYER_AXES = ("activation_batch_heads", None, None)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `batch` sequences of up to `length` positions, the key mask and the
    next position to write. A pytree: it passes through `jit`, `while_loop` and donation as is."""

    keys: jax.Array | tuple[jax.Array, ...]  # [l, b*n, T, h], or l arrays [b*n, T, h]
    values: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array  # int32 [b, T]: 1 where a real token was written
    index: jax.Array  # int32 [] or [b]: where the next tokens go (for all rows, or for each)

    @classmethod
    def init(cls, config: BloomConfig, batch: int, length: int, dtype=jnp.float32, per_layer: bool = False,
             per_row: bool = False) -> KVCache:
        """An empty cache: stacked layers, or (`per_layer`, for unrolled models) one array per layer; one write
        position for the batch, or (`per_row`, a server's decode slots) one per row."""
        layer_shape = (batch * config.n_head, length, config.head_dim)
        if per_layer:
            keys = tuple(jnp.zeros(layer_shape, dtype) for _ in range(config.n_layer))
            values = tuple(jnp.zeros(layer_shape, dtype) for _ in range(config.n_layer))
        else:
            # Two buffers, not one twice: a donated state may not hold the same buffer twice.
            keys, values = (jnp.zeros((config.n_layer, *layer_shape), dtype) for _ in range(2))
        return cls(keys, values, jnp.zeros((batch, length), jnp.int32),
                   jnp.zeros((batch,) if per_row else (), jnp.int32))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.keys, tuple)

    @property
    def per_row(self) -> bool:
        """Whether each row has its own write position (a server's slots)."""
        return jnp.ndim(self.index) == 1

    @property
    def length(self) -> int:
        """T, the positions the cache has room for."""
        return self.mask.shape[1]

    @property
    def nbytes(self) -> int:
        """The keys and values of every layer, in bytes."""
        return sum(x.nbytes for x in jax.tree.leaves((self.keys, self.values)))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Layer i's keys and values [b*n, T, h]."""
        return self.keys[i], self.values[i]

    def with_new_tokens(self, attention_mask: jax.Array) -> jax.Array:
        """The key mask [b, T] once tokens with this mask [b, s] are written at `index`."""
        new_bs = attention_mask.astype(self.mask.dtype)
        if self.per_row:
            return _write_rows(self.mask, new_bs, self.index[: new_bs.shape[0]])
        return lax.dynamic_update_slice(self.mask, new_bs, (0, self.index))

    def advance(self, keys: jax.Array | tuple[jax.Array, ...], values: jax.Array | tuple[jax.Array, ...],
                mask: jax.Array, steps: int) -> KVCache:
        """The cache after `steps` tokens were written: the updated layers (stacked, or one array each, restacked
        if this cache is stacked), their key mask and the index moved on."""
        if isinstance(keys, (tuple, list)) and not self.per_layer:
            keys, values = jnp.stack(keys), jnp.stack(values)
        elif isinstance(keys, list):
            keys, values = tuple(keys), tuple(values)
        return KVCache(keys, values, mask, self.index + steps)

    def insert_row(self, prefilled: KVCache, row: jax.Array, slot: jax.Array, length: jax.Array) -> KVCache:
        """This cache of decode slots (`per_row`) with row `row` of `prefilled` (a prompt of `length` tokens,
        left-padded to `prefilled.length`) copied into row `slot`: its keys and values rolled so that the prompt
        starts at position 0 (its positions then do not depend on its padding), the slot's key mask its `length`
        ones and its write position `length`. Both caches have the same layer layout."""
        if not self.per_row:
            raise ValueError("insert_row copies into a cache with a write position per row (per_row)")
        batch, pad = self.mask.shape[0], prefilled.length - length
        keep = min(prefilled.length, self.length)  # a prompt fits the slot; its padded length may not

        def copy(slots_zth, prefilled_zth):
            axis = slots_zth.ndim - 3  # where [b*n, T, h] starts: 1 for stacked layers
            n_head = slots_zth.shape[axis] // batch
            rows_nth = lax.dynamic_slice_in_dim(prefilled_zth, row * n_head, n_head, axis=axis)
            rows_nth = jnp.roll(rows_nth, -pad, axis=axis + 1)
            rows_nth = lax.slice_in_dim(rows_nth, 0, keep, axis=axis + 1)
            start = [0] * slots_zth.ndim
            start[axis] = slot * n_head
            return lax.dynamic_update_slice(slots_zth, rows_nth.astype(slots_zth.dtype), start)

        keys, values = jax.tree.map(copy, self.keys, prefilled.keys), jax.tree.map(copy, self.values, prefilled.values)
        mask_t = (jnp.arange(self.length) < length).astype(self.mask.dtype)
        mask = lax.dynamic_update_slice(self.mask, mask_t[None], (slot, 0))
        return KVCache(keys, values, mask, self.index.at[slot].set(length))

    @staticmethod
    def logical_axes(config: BloomConfig, per_layer: bool = False) -> KVCache:
        """The logical `PartitionSpec` of every array of a cache of this layout (for explicit shardings)."""
        layer = PartitionSpec(*LAYER_AXES)
        if per_layer:
            keys = values = (layer,) * config.n_layer
        else:
            keys = values = PartitionSpec(None, *LAYER_AXES)
        return KVCache(keys, values, PartitionSpec("activation_batch", None), PartitionSpec())


def write_layer(keys_zth: jax.Array, values_zth: jax.Array, k_bnsh: jax.Array, v_bnsh: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's cache [b*n, T, h] with the new keys and values [b, n, s, h] written at position `index`, in
    place, and constrained to the cache's logical sharding (the attention heads', batch first)."""
    b, n, s, h = k_bnsh.shape
    k_zsh, v_zsh = k_bnsh.reshape(b * n, s, h).astype(keys_zth.dtype), v_bnsh.reshape(b * n, s, h).astype(
        values_zth.dtype)
    if jnp.ndim(index) == 1:  # a position per sequence (its first b), the same for its heads
        index_z = jnp.repeat(index[:b], n)
        keys_zth, values_zth = _write_rows(keys_zth, k_zsh, index_z), _write_rows(values_zth, v_zsh, index_z)
    else:
        keys_zth = lax.dynamic_update_slice(keys_zth, k_zsh, (0, index, 0))
        values_zth = lax.dynamic_update_slice(values_zth, v_zsh, (0, index, 0))
    return nn.with_logical_constraint(keys_zth, LAYER_AXES), nn.with_logical_constraint(values_zth, LAYER_AXES)


def _write_rows(cache_zt: jax.Array, new_zs: jax.Array, index_z: jax.Array) -> jax.Array:
    """`cache_zt` [Z, T, ...] with its first z rows' new entries [z, s, ...] written from position index_z[i]
    (one scatter, in place; rows past z untouched, positions past T dropped)."""
    z, s = new_zs.shape[:2]
    rows_zs = jnp.broadcast_to(jnp.arange(z)[:, None], (z, s))
    return cache_zt.at[rows_zs, index_z[:, None] + jnp.arange(s)].set(new_zs, mode="drop")


__all__ = ["KVCache", "LAYER_AXES", "write_layer"]
