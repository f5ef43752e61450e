"""The operations BLOOM needs beyond plain `jnp`, each with a reference implementation and, where measured
faster, backend-specific ones; `Kernels` says which a model uses.

- `attention`: `reference` (the [b, n, s, t] scores, as transformers), `blockwise` (online softmax, never
  holding them), on NVIDIA GPUs `cudnn` (cuDNN's flash attention, with the bias materialised), and on TPUs and
  NVIDIA GPUs `flash` (`flash`: Pallas kernels that build the ALiBi bias inside); `alibi_*` and `AttentionMask`
  build what they read.
- `decode_matmul`: the products of the decode weight formats (float32, bfloat16, int8).
- `pick`: the next token's argmax.
- `barriers`: the gradient barrier at block boundaries and the embedding gather.

The XLA:CPU tricks (barriers against fusions, padded matrix-vector products, a two-pass argmax) are the `xla_cpu`
implementations, chosen on CPU; TPUs and GPUs get the plain XLA ones. Attention is blockwise everywhere by default
(the reference where one block holds it all). `Kernels` also holds the platform's layer layout for decoding
(unrolled on CPU, scanned elsewhere).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bloom_jax.errors import BloomJaxError
from bloom_jax.kernels import attention, barriers, decode_matmul, flash, pick

# `kernels=` choices: the set of one platform, or the references everywhere.
KERNEL_SETS = ("auto", "xla_cpu", "reference")
ATTENTION = ("auto", "reference", "blockwise", "cudnn", "flash")
GPU_PLATFORMS = ("gpu", "cuda")


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
    flash_backend: str = "tpu"  # which Pallas kernel `flash` runs: "tpu" (Mosaic) or "gpu" (Triton)
    flash_blocks: tuple[int, int] | None = None  # its query and key blocks (None: flash.DEFAULT_BLOCKS)
    interpret: bool = False  # Pallas kernels in interpret mode, on any backend (for tests: slow)
    # The layer layout `bloom_jax.generate.Generator` decodes with. Unrolled on CPU: the decode loop then reads
    # each layer's weights in place (25% faster at 1 x 128 on 2 cores); scanned elsewhere: one compiled block
    # whatever the depth (an unrolled BLOOM-176B compiles 70 of them).
    decode_scan_layers: bool = True

    @classmethod
    def create(cls, kernels: str = "auto", attention: str = "auto", platform: str | None = None) -> Kernels:
        """For `platform` (default: JAX's default backend): `kernels` "auto" takes XLA:CPU's implementations on CPU
        and the references elsewhere; `attention` "auto" is blockwise everywhere (which takes the reference where
        one block holds the whole score matrix, see `attention_at`); `cudnn` needs an NVIDIA GPU, `flash` a TPU
        or an NVIDIA GPU (tests run its kernels on CPU with `Kernels(attention="flash", interpret=True)`)."""
        if kernels not in KERNEL_SETS:
            raise BloomJaxError(f"unknown kernels {kernels!r} (choose from {', '.join(KERNEL_SETS)})")
        if attention not in ATTENTION:
            raise BloomJaxError(f"unknown attention {attention!r} (choose from {', '.join(ATTENTION)})")
        if platform is None:
            import jax

            platform = jax.default_backend()
        if attention == "cudnn" and platform not in GPU_PLATFORMS:
            raise BloomJaxError(f"attention 'cudnn' needs an NVIDIA GPU; this platform is {platform}")
        if attention == "flash" and platform not in ("tpu", *GPU_PLATFORMS):
            raise BloomJaxError(f"attention 'flash' needs a TPU or an NVIDIA GPU; this platform is {platform}")
        tricks = ("xla_cpu" if platform == "cpu" else "reference") if kernels == "auto" else kernels
        return cls("blockwise" if attention == "auto" else attention, tricks, tricks, tricks, tricks,
                   flash_backend="gpu" if platform in GPU_PLATFORMS else "tpu", decode_scan_layers=platform != "cpu")

    def attention_at(self, query_len: int, key_len: int) -> str:
        """The attention that `query_len` queries over `key_len` keys take, before cuDNN's own conditions: the
        reference for one query row (a decode step holds only [b, n, 1, t]) and, under `blockwise`, where one
        block holds the whole score matrix: the same buffers, and the reference's plain arithmetic is faster there
        (attention forward and backward on 2 CPU cores, `benchmarks/attention.py`: 1.25x at 8 x 16 heads x 128,
        0.9-1.1x at 512; blockwise 2x faster at 1024 and 3.2x at 2048)."""
        if self.attention == "reference" or query_len == 1:
            return "reference"
        if self.attention == "blockwise" and query_len <= self.block_q and key_len <= self.block_k:
            return "reference"
        return self.attention


def attend(kernels: Kernels, q_bnsh, k, v, mask: attention.AttentionMask, dtype, dropout=None):
    """Attention context [b, n, s, h] by `kernels.attention_at` its shape. Dropped-out probabilities take the
    reference (the fused forms have no dropout); `flash` takes every shape but one query row; `cudnn` falls back
    to `blockwise` where cuDNN does not apply (a prefill chunk into a cache, odd lengths, float32). Packed rows
    (segment ids) keep their implementation: each masks other examples' keys."""
    s, t = q_bnsh.shape[2], k.shape[-2]
    chosen = kernels.attention_at(s, t)
    if chosen == "cudnn" and not attention.cudnn_applies(q_bnsh, k, mask, dtype):
        chosen = dataclasses.replace(kernels, attention="blockwise").attention_at(s, t)
    if chosen == "blockwise" and jnp.ndim(mask.query_start) > 0:
        chosen = "reference"  # a few queries per row at rows' own positions (speculative verification): small
    if dropout is not None or chosen == "reference":
        return attention.reference(q_bnsh, k, v, mask, dtype, dropout)
    if chosen == "cudnn":
        return attention.cudnn(q_bnsh, k, v, mask, dtype)
    if chosen == "flash":
        return attention.flash(q_bnsh, k, v, mask, dtype, kernels.flash_backend, kernels.flash_blocks,
                               kernels.interpret)
    return attention.blockwise(q_bnsh, k, v, mask, dtype, kernels.block_q, kernels.block_k)


def matmul(kernels: Kernels, x, kernel, scale=None):
    return decode_matmul.IMPLEMENTATIONS[kernels.decode_matmul](x, kernel, scale)


def argmax(kernels: Kernels, x):
    return pick.IMPLEMENTATIONS[kernels.pick](x)


def gradient_barrier(kernels: Kernels, x):
    return barriers.GRADIENT_BARRIERS[kernels.gradient_barrier](x)


def gather(kernels: Kernels, table_vd, ids):
    return barriers.GATHERS[kernels.gather](table_vd, ids)


__all__ = ["ATTENTION", "KERNEL_SETS", "Kernels", "argmax", "attend", "attention", "flash", "gather",
           "gradient_barrier", "matmul"]
