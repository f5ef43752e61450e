"""The matmul of the decode weight formats (`bloom_jax.weights`): x [b, k] . kernel^T for an out-major kernel
[n, k] stored in float32, bfloat16 or int8 (with a float32 scale per output channel).

`reference` is the plain product (int8: activations quantized per token to int8, accumulated in int32). `xla_cpu`
computes the same numbers around two XLA:CPU behaviours measured on bloom-560m decode steps: its bf16 and int8
matrix-vector path is 15x slower than its matrix-matrix one, so a single row is padded to two; and it folds the
final transpose into the dot, 2-3x slower, unless a barrier stands between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _product_nb(x_bk: jax.Array, kernel_nk: jax.Array) -> jax.Array:
    """kernel . x^T float32 [n, b] in the kernel's own type (int8: x quantized per row, int32 accumulation)."""
    if kernel_nk.dtype == jnp.float32:
        return jnp.einsum("nk,bk->nb", kernel_nk, x_bk.astype(jnp.float32))  # weights on the left: fastest
    x_bk = x_bk.astype(jnp.float32)
    if kernel_nk.dtype == jnp.int8:
        absmax_b1 = jnp.max(jnp.abs(x_bk), axis=-1, keepdims=True)
        x_scale_b1 = jnp.where(absmax_b1 > 0, absmax_b1 / 127.0, 1.0)
        x_bk = jnp.round(x_bk / x_scale_b1).astype(jnp.int8)
        y_nb = jnp.einsum("nk,bk->nb", kernel_nk, x_bk, preferred_element_type=jnp.int32)
        return y_nb.astype(jnp.float32) * x_scale_b1[:, 0]
    return jnp.einsum("nk,bk->nb", kernel_nk, x_bk.astype(kernel_nk.dtype), preferred_element_type=jnp.float32)


def reference(x: jax.Array, kernel: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [b, k] . kernel^T, float32 [b, n], for an out-major kernel [n, k] (times `scale` [n] when given)."""
    y_nb = _product_nb(x, kernel)
    if scale is not None:
        y_nb = y_nb * scale[:, None]
    return y_nb.T


def xla_cpu(x: jax.Array, kernel: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """`reference`, shaped for XLA:CPU (see the module docstring)."""
    x_bk, kernel_nk = x, kernel
    b = x_bk.shape[0]
    if kernel_nk.dtype == jnp.float32:
        y_nb = _product_nb(x_bk, kernel_nk)
    else:
        y_nb = _product_nb(jnp.pad(x_bk.astype(jnp.float32), ((0, max(0, 2 - b)), (0, 0))), kernel_nk)[:, :b]
    y_nb = lax.optimization_barrier(y_nb)  # else XLA folds the transpose below into the dot, 2-3x slower
    if scale is not None:
        y_nb = y_nb * scale[:, None]
    return y_nb.T


IMPLEMENTATIONS = {"reference": reference, "xla_cpu": xla_cpu}

__all__ = ["IMPLEMENTATIONS", "reference", "xla_cpu"]
