"""Where XLA:CPU must be stopped from fusing: at the block boundaries of the backward pass, and between the
embedding table and its gather. Each has a `reference` (plain JAX, what accelerators get) and an `xla_cpu` form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def _materialised_gradient(x: jax.Array) -> jax.Array:
    return x


def _materialised_bwd(_, g: jax.Array) -> tuple[jax.Array]:
    # XLA never fuses into or out of a conditional. Its predicate reads the data (false only for a NaN), so it
    # cannot be folded away at compile time; both branches pass the gradient through.
    first = g[(0,) * g.ndim]
    return (lax.cond(first == first, lambda g: g, lambda g: g + 0, g),)


_materialised_gradient.defvjp(lambda x: (x, None), _materialised_bwd)


def gradient_barrier_reference(x: jax.Array) -> jax.Array:
    """The identity."""
    return x


def gradient_barrier_xla_cpu(x: jax.Array) -> jax.Array:
    """The identity, whose gradient XLA:CPU must materialise here rather than fuse across.

    At block boundaries of the unrolled layers this stops XLA:CPU from recomputing the residual stream's
    gradient, a chain of adds through every later layer, inside each fusion that reads it: without it the
    backward pass of bloom-560m at 1 x 512 took 31 s instead of 16.5 (quadratic in depth). Accelerators fuse
    differently and would pay a conditional per layer.
    """
    return _materialised_gradient(x)


def gather_reference(table_vd: jax.Array, ids: jax.Array) -> jax.Array:
    """The rows `ids` of the table, float32 [..., d]."""
    return jnp.take(table_vd, ids, axis=0).astype(jnp.float32)


def gather_xla_cpu(table_vd: jax.Array, ids: jax.Array) -> jax.Array:
    """`gather_reference`, with the table tied to the ids.

    XLA:CPU gathers from a bf16 table through float32. Unbarriered, the decode loop hoisted that convert of the
    whole table out of the loop: 0.3 s and 1 GB on every call for BLOOM's vocabulary. Tied to the ids, the table
    stays in the loop, where the convert fuses into the gather of the rows read.
    """
    table_vd, ids = lax.optimization_barrier((table_vd, ids))
    return jnp.take(table_vd, ids, axis=0).astype(jnp.float32)


GRADIENT_BARRIERS = {"reference": gradient_barrier_reference, "xla_cpu": gradient_barrier_xla_cpu}
GATHERS = {"reference": gather_reference, "xla_cpu": gather_xla_cpu}

__all__ = ["GATHERS", "GRADIENT_BARRIERS", "gather_reference", "gather_xla_cpu", "gradient_barrier_reference",
           "gradient_barrier_xla_cpu"]
