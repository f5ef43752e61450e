"""Picking the next token: the index of the largest logit of each row.

`reference` is `jnp.argmax`. `xla_cpu` finds the same index in two passes: XLA:CPU's argmax is a variadic (value,
index) reduction that does not vectorise, and over BLOOM's 250,880 logits it took 1.2 ms at batch 1 and 4.9 ms
at batch 8, against 0.1 and 1.7 ms for a max over blocks of 1024 entries, then an argmax over the block maxima and
one within the winning block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` of x [b, v] as int32 [b] (the first maximum)."""
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def xla_cpu(x: jax.Array, block: int = 1024) -> jax.Array:
    """`reference` in two passes (see the module docstring). Rows holding NaN get an unspecified index (XLA:CPU's
    max reduction drops NaN); NaN logits leave no right token anyway."""
    x_bv = x
    b, v = x_bv.shape
    block = min(block, v)
    blocks = -(-v // block)
    if blocks * block != v:  # -inf padding is never picked before a real entry (first index wins ties)
        x_bv = jnp.pad(x_bv, ((0, 0), (0, blocks * block - v)), constant_values=-jnp.inf)
    x_bkc = x_bv.reshape(b, blocks, block)
    best_b = jnp.argmax(jnp.max(x_bkc, axis=-1), axis=-1)
    best_bc = jnp.take_along_axis(x_bkc, best_b[:, None, None], axis=1)[:, 0]
    return (best_b * block + jnp.argmax(best_bc, axis=-1)).astype(jnp.int32)


IMPLEMENTATIONS = {"reference": reference, "xla_cpu": xla_cpu}

__all__ = ["IMPLEMENTATIONS", "reference", "xla_cpu"]
