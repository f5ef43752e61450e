"""Quantized kernels of BLOOM's linear layers, in 8 or 4 bits: a frozen QLoRA base (`quantize_base`), dequantized
into the compute dtype where it is used (`bloom_jax.weights.WeightFormat`), and the int8 decode weights.

- `int8`: symmetric per output channel, scale = max |w| / 127 over the inputs, the kernel out-major as the decode
  weights keep it (`kernel` int8 [*out, *in], `scale` float32 [*out]): 1 byte per weight.
- `nf4`: QLoRA's 4-bit NormalFloat (the 16 levels of `NF4_LEVELS`, quantiles of a normal distribution), absmax
  per block of `NF4_BLOCK` weights along the last input axis (`kernel` uint8 [*in[:-1], in[-1] / 2, *out], two
  codes a byte, the even input in the low nibble; `kernel_absmax` float32 [*in[:-1], in[-1] / block, *out]):
  0.5625 bytes per weight at blocks of 64. The absmax values are kept in float32 (QLoRA's double quantization,
  0.127 bits per weight less, is left out).

Both keep the kernel's axes and so its logical sharding. The embedding, LayerNorms and biases stay in the
model's `param_dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bloom_jax.errors import BloomJaxError

FROZEN_FORMATS = ("int8", "nf4")
NF4_BLOCK = 64
# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E; as bitsandbytes stores them).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# The linear layers' input axes (their kernels are [*in, *out]).
KERNEL_IN_AXES = {"query_key_value": 1, "dense": 2, "dense_h_to_4h": 1, "dense_4h_to_h": 1}


def nf4_block(last_in: int) -> int:
    """The absmax block along an input axis of `last_in` weights: 64, or the largest divisor of both (bloom-3b's
    head size 80 takes 16)."""
    return math.gcd(NF4_BLOCK, last_in)


def check_format(fmt: str) -> None:
    if fmt not in FROZEN_FORMATS:
        raise BloomJaxError(f"unknown frozen weight format {fmt!r} (choose from {', '.join(FROZEN_FORMATS)})")


def stored_shapes(fmt: str, in_features: tuple[int, ...], out_features: tuple[int, ...], axes: tuple[str, ...]
                  ) -> dict[str, tuple[tuple[int, ...], Any, tuple[str, ...]]]:
    """name -> (shape, dtype, logical axes) of a kernel [*in, *out] with logical `axes` stored in `fmt` (int8:
    out-major, the axes permuted with it). The
    packed nf4 axis keeps its name; the absmax blocks take `frozen_blocks` (never sharded: 4096 / 64 = 64 blocks
    split over 8 devices would do, BLOOM-176B's 14336 / 64 = 224 over 64 would not)."""
    check_format(fmt)
    n_in = len(in_features)
    if fmt == "int8":
        return {"kernel": (out_features + in_features, jnp.int8, axes[n_in:] + axes[:n_in]),
                "scale": (out_features, jnp.float32, axes[n_in:])}
    *lead, last = in_features
    if last % 2:
        raise BloomJaxError(f"nf4 packs two weights a byte: the input axis of {last} is odd")
    block_axes = axes[: n_in - 1] + ("frozen_blocks",) + axes[n_in:]
    return {"kernel": ((*lead, last // 2, *out_features), jnp.uint8, axes),
            "kernel_absmax": ((*lead, last // nf4_block(last), *out_features), jnp.float32, block_axes)}


def int8_per_channel(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(q int8, scale float32 with `in_axes` kept at size 1): symmetric per output channel, scale = max |w| / 127
    over `in_axes` (1 where a channel is all zeros), w ~= scale * q: the one int8 scheme of every int8 weight."""
    absmax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def out_major(kernel: jax.Array, n_lead: int, n_in: int) -> jax.Array:
    """A kernel [*lead, *in, *out] transposed to [*lead, *out, *in]."""
    axes = tuple(range(kernel.ndim))
    return kernel.transpose(axes[:n_lead] + axes[n_lead + n_in:] + axes[n_lead:n_lead + n_in])


def quantize(kernel: jax.Array, n_lead: int, n_in: int, fmt: str) -> dict[str, jax.Array]:
    """A float kernel [*lead, *in, *out] stored in `fmt`: `n_lead` leading (stacked layer) axes, `n_in` input
    axes."""
    check_format(fmt)
    if fmt == "int8":
        w = out_major(kernel, n_lead, n_in).astype(jnp.float32)
        in_axes = tuple(range(w.ndim - n_in, w.ndim))
        q, scale = int8_per_channel(w, in_axes)
        return {"kernel": q, "scale": jnp.squeeze(scale, axis=in_axes)}
    w = kernel.astype(jnp.float32)
    in_axes = tuple(range(n_lead, n_lead + n_in))
    axis = in_axes[-1]  # the last input axis: blocks and pairs run along it
    last = w.shape[axis]
    block = nf4_block(last)
    blocked = w.reshape(*w.shape[:axis], last // block, block, *w.shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocked), axis=axis + 1, keepdims=True)
    normalized = blocked / jnp.where(absmax > 0, absmax, 1.0)
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normalized).reshape(w.shape).astype(jnp.uint8)  # nearest level
    pairs = codes.reshape(*w.shape[:axis], last // 2, 2, *w.shape[axis + 1:])
    low, high = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return {"kernel": low | (high << 4), "kernel_absmax": jnp.squeeze(absmax, axis=axis + 1)}


def dequantize(stored: dict[str, jax.Array], n_lead: int, n_in: int, fmt: str, dtype) -> jax.Array:
    """The kernel in `dtype` from its stored form (`quantize`'s inverse, up to rounding): [*lead, *in, *out], but
    int8's stays out-major [*lead, *out, *in]."""
    check_format(fmt)
    if fmt == "int8":
        q = stored["kernel"]
        scale = jnp.expand_dims(stored["scale"], tuple(range(q.ndim - n_in, q.ndim)))
        return (q.astype(jnp.float32) * scale).astype(dtype)
    in_axes = tuple(range(n_lead, n_lead + n_in))
    packed, absmax = stored["kernel"], stored["kernel_absmax"]
    axis = in_axes[-1]
    codes = jnp.stack([packed & 0x0F, packed >> 4], axis=axis + 1)
    codes = codes.reshape(*packed.shape[:axis], 2 * packed.shape[axis], *packed.shape[axis + 1:])
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    block = codes.shape[axis] // absmax.shape[axis]
    return (values * jnp.repeat(absmax, block, axis=axis)).astype(dtype)


def quantize_base(params: dict, fmt: str, shardings: dict | None = None, consume: bool = False) -> dict:
    """`params` (either layout) with the kernels of the four linear layers stored in `fmt`, one kernel at a time.
    `shardings`: the stored tree's NamedShardings (its model's `param_shardings`), if any. `consume`: delete each
    float kernel (a JAX array) once its stored form is made, so that the peak is the float base plus one stored
    kernel; `params` is then unusable."""
    check_format(fmt)
    flat = traverse_util.flatten_dict(params)
    placed = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    out = {}
    for path, value in flat.items():
        if path[-1] != "kernel" or path[-2] not in KERNEL_IN_AXES:
            out[path] = value
            continue
        n_lead = 1 if path[0] == "h" else 0  # stacked (scanned) blocks carry a layers axis first
        targets = {name: placed.get(path[:-1] + (name,)) for name in stored_names(fmt)}
        make = jax.jit(lambda w, n_lead=n_lead, n_in=KERNEL_IN_AXES[path[-2]]: quantize(w, n_lead, n_in, fmt),
                       out_shardings=targets if shardings is not None else None)
        for name, stored in make(value).items():
            out[path[:-1] + (name,)] = stored
        if consume and isinstance(value, jax.Array):
            value.delete()
    return traverse_util.unflatten_dict(out)


def stored_names(fmt: str) -> tuple[str, str]:
    return ("kernel", "scale") if fmt == "int8" else ("kernel", "kernel_absmax")


__all__ = ["FROZEN_FORMATS", "KERNEL_IN_AXES", "NF4_BLOCK", "NF4_LEVELS", "dequantize", "nf4_block", "quantize",
           "out_major", "quantize_base", "stored_names", "stored_shapes", "int8_per_channel"]
