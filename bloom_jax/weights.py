"""How the linear layers and the embedding store their weights and multiply by them: the one `WeightFormat` that
`bloom_jax.model.Linear` and `Embed` ask, so that no layer branches on formats itself.

- float (the default): trainable kernels [*in, *out] in the model's `param_dtype`, multiplied by XLA's dot.
- decode (`decode`, a key of `DECODE_WEIGHTS`): inference weights made by `to_decode_weights`, the kernels
  out-major [*out, *in] in float32, bfloat16 or int8 and the embedding [v, d] in the same dtype, multiplied by
  `kernels.decode_matmul` (read at memory speed in matrix-vector products).
- frozen (`frozen`, a key of `bloom_jax.quantize.FROZEN_FORMATS`): a QLoRA base made by `quantize_base`, the linear
  layers' kernels in int8 or nf4 dequantized into the compute dtype inside a rematerialised product; the embedding
  stays float.
- LoRA (`lora`) beside any of them: `lora_a` [*in, r] and `lora_b` [r, *out] on the layers it targets.

There is one int8 scheme: symmetric per output channel (`bloom_jax.quantize.int8_per_channel`), the kernel int8
out-major [*out, *in] with a float32 `scale` [*out] (the embedding: a `scale` per vocabulary row). Decode weights
and a frozen int8 base hold the same arrays; only the product differs (int8 activations and int32 accumulation
for decoding, a dequantized kernel for training adapters through it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bloom_jax import kernels as ops
from bloom_jax.errors import BloomJaxError
from bloom_jax.kernels import Kernels
from bloom_jax.lora import LoraConfig, lora_a_init
from bloom_jax.quantize import (FROZEN_FORMATS, KERNEL_IN_AXES, dequantize, int8_per_channel, out_major, quantize,
                               stored_shapes)

# The decode formats: kernels out-major [*out, *in], which XLA:CPU reads 1.1-3x faster in matrix-vector products
# than [*in, *out]; float32, bfloat16 (activations rounded to bfloat16 for the product) or int8.
DECODE_WEIGHTS: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a model's weights are stored and multiplied (see the module docstring). Hashable: a module attribute.

    Attributes:
      decode: None, or a key of `DECODE_WEIGHTS`: inference weights, out-major.
      frozen: None, or a key of `bloom_jax.quantize.FROZEN_FORMATS`: a quantized base for adapters.
      lora: low-rank adapters beside the kernels of the layers it targets.
    """

    decode: str | None = None
    frozen: str | None = None
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.decode is not None and self.decode not in DECODE_WEIGHTS:
            raise BloomJaxError(f"unknown decode weights {self.decode!r} (choose from {', '.join(DECODE_WEIGHTS)})")
        if self.frozen is not None and self.frozen not in FROZEN_FORMATS:
            raise BloomJaxError(f"unknown frozen weights {self.frozen!r} "
                                f"(choose from {', '.join(FROZEN_FORMATS)})")
        if self.decode is not None and self.frozen is not None:
            raise BloomJaxError("decode weights are made from float ones (to_decode_weights), not from a frozen base")

    def kernel(self, module: nn.Module, in_features: tuple[int, ...], out_features: tuple[int, ...],
               axes: tuple[str, ...], init: Callable, param_dtype) -> dict[str, jax.Array]:
        """Declares a linear layer's kernel in `module` (its logical `axes`: inputs then outputs) and returns the
        stored arrays by name."""
        if self.decode is None and self.frozen is None:
            return {"kernel": module.param("kernel", nn.with_logical_partitioning(init, axes),
                                           in_features + out_features, param_dtype)}
        storage = self.frozen or self.decode
        # Converted from float weights (`to_decode_weights`, `quantize_base`): the initial values only give shapes.
        return {name: module.param(name, nn.with_logical_partitioning(
                    nn.initializers.ones if name == "scale" else nn.initializers.zeros, names), shape, dtype)
                for name, (shape, dtype, names) in _stored(storage, in_features, out_features, axes).items()}

    def multiply(self, kernels: Kernels, x: jax.Array, stored: dict[str, jax.Array], in_features: tuple[int, ...],
                 out_features: tuple[int, ...], dtype) -> jax.Array:
        """x [..., *in] times the stored kernel: [..., *out] in `dtype`."""
        n_in = len(in_features)
        if self.decode is not None:
            size_in, size_out = math.prod(in_features), math.prod(out_features)
            lead = x.shape[: x.ndim - n_in]
            scale = stored["scale"].reshape(-1) if "scale" in stored else None
            y = ops.matmul(kernels, x.reshape(-1, size_in), stored["kernel"].reshape(size_out, size_in), scale)
            return y.reshape(*lead, *out_features).astype(dtype)
        x = x.astype(dtype)
        if self.frozen is not None:
            return _dequantized_product(x, stored, n_in, self.frozen, dtype)
        return in_major_product(x, stored["kernel"].astype(dtype), n_in)

    def adapts(self, layer: str) -> bool:
        """Whether the linear layer named `layer` has an adapter beside its kernel."""
        return self.lora is not None and layer in self.lora.targets

    def adapter(self, module: nn.Module, x: jax.Array, in_features: tuple[int, ...], out_features: tuple[int, ...],
                axes: tuple[str, ...], dtype, deterministic: bool) -> jax.Array:
        """Declares the adapter in `module` and returns its term scaling * (dropout(x) . lora_a) . lora_b [..., *out]
        in `dtype`, as peft's LoRA computes it."""
        lora, n_in = self.lora, len(in_features)
        lora_a = module.param("lora_a", nn.with_logical_partitioning(lora_a_init, axes[:n_in] + ("lora_rank",)),
                              in_features + (lora.rank,), lora.param_dtype)
        lora_b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     ("lora_rank",) + axes[n_in:]),
                              (lora.rank,) + out_features, lora.param_dtype)
        if lora.dropout > 0 and not deterministic:
            x = nn.Dropout(lora.dropout)(x, deterministic=False)
        x_r = in_major_product(x, lora_a.astype(dtype), n_in)
        delta = in_major_product(x_r, lora_b.astype(dtype), 1)
        return delta * jnp.asarray(lora.scaling, dtype)

    def embedding(self, module: nn.Module, vocab_size: int, features: int, init: Callable, param_dtype
                  ) -> tuple[jax.Array, jax.Array | None]:
        """Declares the embedding table [v, d] in `module`: (table, int8's `scale` [v] or None)."""
        if self.decode is None:
            return module.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (vocab_size, features), param_dtype), None
        table = module.param("embedding", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab", "embed")),
                             (vocab_size, features), DECODE_WEIGHTS[self.decode])
        scale = None
        if self.decode == "int8":
            scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("vocab",)),
                                 (vocab_size,), jnp.float32)
        return table, scale

    def logits(self, kernels: Kernels, x_bsd: jax.Array, table_vd: jax.Array, scale_v: jax.Array | None,
               dtype) -> jax.Array:
        """The tied head: float32 logits [b, s, v] = x . table^T, accumulated in float32."""
        if self.decode is not None:
            b, s, d = x_bsd.shape
            return ops.matmul(kernels, x_bsd.reshape(b * s, d), table_vd, scale_v).reshape(b, s, -1)
        return jnp.einsum("bsd,vd->bsv", x_bsd, table_vd.astype(dtype), preferred_element_type=jnp.float32)


def _stored(storage: str, in_features, out_features, axes) -> dict:
    """name -> (shape, dtype, logical axes) of a kernel stored in `storage` (a decode or frozen format)."""
    if storage in FROZEN_FORMATS:
        return stored_shapes(storage, in_features, out_features, axes)
    n_in = len(in_features)
    return {"kernel": (out_features + in_features, DECODE_WEIGHTS[storage], axes[n_in:] + axes[:n_in])}


@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def _dequantized_product(x: jax.Array, stored: dict, n_in: int, fmt: str, dtype) -> jax.Array:
    """x . dequantize(stored): rematerialised, so that the backward pass rebuilds the kernel (one layer's, in
    the compute dtype) instead of keeping it per layer for the input gradient."""
    kernel = dequantize(stored, 0, n_in, fmt, dtype)
    if fmt == "int8":  # out-major [*out, *in]: contract the trailing axes of both
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(kernel.ndim - n_in, kernel.ndim)))
        return lax.dot_general(x, kernel, (contract, ((), ())))
    return in_major_product(x, kernel, n_in)


def in_major_product(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] . kernel [*in, *out] -> [..., *out]. (Merging the axes into one [in, out] product instead cost
    the TPU compiler's BLOOM-176B decode step 1.2 GiB more per v5p chip, 87.1 against 85.9.)"""
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return lax.dot_general(x, kernel, (contract, ((), ())))


def to_decode_weights(params: dict, decode_weights: str) -> dict:
    """Float parameters (scanned or unrolled layout) as those of the same model with `decode_weights`: kernels
    transposed out-major, kernels and the embedding stored in that dtype; int8 in the one int8 scheme (the
    embedding per vocabulary row)."""
    WeightFormat(decode=decode_weights)  # a known format, or one line saying which are
    from flax.traverse_util import flatten_dict, unflatten_dict

    out = {}
    for path, value in flatten_dict(params).items():
        name = path[-1]
        if name not in ("kernel", "embedding"):
            out[path] = value
            continue
        value = jnp.asarray(value)
        if name == "embedding":  # [v, d]: already out-major
            if decode_weights == "int8":
                value, scale_v1 = int8_per_channel(value.astype(jnp.float32), (1,))
                out[path[:-1] + ("scale",)] = scale_v1[:, 0]
            out[path] = value.astype(DECODE_WEIGHTS[decode_weights])
            continue
        n_lead, n_in = (1 if path[0] == "h" else 0), KERNEL_IN_AXES[path[-2]]  # [*lead, *in, *out]
        if decode_weights == "int8":
            out.update({path[:-1] + (key,): array for key, array in quantize(value, n_lead, n_in, "int8").items()})
        else:
            out[path] = out_major(value, n_lead, n_in).astype(jnp.float32).astype(DECODE_WEIGHTS[decode_weights])
    return unflatten_dict(out)


__all__ = ["DECODE_WEIGHTS", "WeightFormat", "in_major_product", "to_decode_weights"]
