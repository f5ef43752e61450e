"""The operations BLOOM needs beyond plain `jnp`, each with a reference implementation and, where measured
faster, backend-specific ones; `Kernels` says which a model uses.

- `attention`: `reference` (the [b, n, s, t] scores, as transformers) or `blockwise` (online softmax, never
  holding them); `alibi_*` and `AttentionMask` build what both read.
- `decode_matmul`: the products of the decode weight formats (float32, bfloat16, int8).
- `pick`: the next token's argmax.
- `barriers`: the gradient barrier at block boundaries and the embedding gather.

The XLA:CPU tricks (barriers against fusions, padded matrix-vector products, a two-pass argmax) are the `xla_cpu`
implementations, chosen on CPU; TPUs and GPUs get the plain XLA ones and blockwise attention.
"""

from __future__ import annotations

import dataclasses

from bloom_jax.errors import BloomJaxError
from bloom_jax.kernels import attention, barriers, decode_matmul, pick

# `kernels=` choices: the set of one platform, or the references everywhere.
KERNEL_SETS = ("auto", "xla_cpu", "reference")
ATTENTION = ("auto", "reference", "blockwise")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementation of each operation (names in each module's `IMPLEMENTATIONS`). Hashable: a model
    attribute, fixed when the model is made."""

    attention: str = "reference"
    decode_matmul: str = "reference"
    pick: str = "reference"
    gradient_barrier: str = "reference"
    gather: str = "reference"
    block_q: int = 512  # blockwise attention's query and key block sizes
    block_k: int = 512

    @classmethod
    def create(cls, kernels: str = "auto", attention: str = "auto", platform: str | None = None) -> Kernels:
        """For `platform` (default: JAX's default backend): `kernels` "auto" takes XLA:CPU's implementations on CPU
        and the references elsewhere; `attention` "auto" is the reference on CPU (faster there at the lengths
        it runs) and blockwise on accelerators."""
        if kernels not in KERNEL_SETS:
            raise BloomJaxError(f"unknown kernels {kernels!r} (choose from {', '.join(KERNEL_SETS)})")
        if attention not in ATTENTION:
            raise BloomJaxError(f"unknown attention {attention!r} (choose from {', '.join(ATTENTION)})")
        if platform is None:
            import jax

            platform = jax.default_backend()
        cpu = platform == "cpu"
        tricks = ("xla_cpu" if cpu else "reference") if kernels == "auto" else kernels
        if attention == "auto":
            attention = "reference" if cpu else "blockwise"
        return cls(attention, tricks, tricks, tricks, tricks)


def attend(kernels: Kernels, q_bnsh, k, v, mask: attention.AttentionMask, dtype, dropout=None):
    """Attention context [b, n, s, h] by `kernels.attention`. A single query row (a decode step) and dropped-out
    probabilities take the reference: one row holds only [b, n, 1, t], and the blockwise form has no dropout."""
    if kernels.attention == "blockwise" and dropout is None and q_bnsh.shape[2] > 1:
        return attention.blockwise(q_bnsh, k, v, mask, dtype, kernels.block_q, kernels.block_k)
    return attention.reference(q_bnsh, k, v, mask, dtype, dropout)


def matmul(kernels: Kernels, x, kernel, scale=None):
    return decode_matmul.IMPLEMENTATIONS[kernels.decode_matmul](x, kernel, scale)


def argmax(kernels: Kernels, x):
    return pick.IMPLEMENTATIONS[kernels.pick](x)


def gradient_barrier(kernels: Kernels, x):
    return barriers.GRADIENT_BARRIERS[kernels.gradient_barrier](x)


def gather(kernels: Kernels, table_vd, ids):
    return barriers.GATHERS[kernels.gather](table_vd, ids)


__all__ = ["ATTENTION", "KERNEL_SETS", "Kernels", "argmax", "attend", "attention", "gather", "gradient_barrier",
           "matmul"]
