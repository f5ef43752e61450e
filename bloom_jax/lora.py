"""LoRA: low-rank adapters on BLOOM's linear layers, as peft defines them.

A targeted layer with kernel W [*in, *out] gets `lora_a` [*in, r] and `lora_b` [r, *out] beside it
(`bloom_jax.model.Linear`), and computes x . W + bias + scaling * (dropout(x) . lora_a) . lora_b, scaling =
alpha / r (alpha / sqrt(r) with rsLoRA). peft's tensors are the transposes: lora_A.weight [r, in] = lora_a^T and
lora_B.weight [out, r] = lora_b^T (`bloom_jax.checkpoints.peft`). `lora_a` starts as peft's (Kaiming-uniform
with a = sqrt(5): uniform within +-1/sqrt(fan_in)), `lora_b` at zero, so an untrained adapter changes nothing.

The adapters are ordinary parameters of the model's tree, so they follow the scanned or unrolled layout and the
logical sharding rules (`lora_rank` is never sharded); `split_adapters` and `merge_trees` separate them from the
frozen base for training, and `fold` adds them into the base kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bloom_jax.errors import BloomJaxError

# peft's names of BLOOM's linear layers (`target_modules`), which are also ours.
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which layers get adapters and how they scale. Hashable: a model attribute."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    param_dtype: Any = jnp.float32  # the adapters' weights (and so their optimizer state)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise BloomJaxError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise BloomJaxError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise BloomJaxError(f"lora targets must be some of {', '.join(TARGETS)}; got {list(self.targets)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # one order

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def lora_a_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """peft's init of lora_A (`kaiming_uniform_(a=sqrt(5))`): uniform within +-1/sqrt(fan_in), fan_in the product
    of every axis but the last (the rank)."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def is_adapter_path(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES


def split_adapters(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the same nested dict cut in two, the adapters being every `lora_a` / `lora_b` leaf."""
    flat = traverse_util.flatten_dict(params)
    base = {path: leaf for path, leaf in flat.items() if not is_adapter_path(path)}
    adapters = {path: leaf for path, leaf in flat.items() if is_adapter_path(path)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge_trees(base: dict, adapters: dict) -> dict:
    """The model's parameter tree from its two parts (`split_adapters`'s inverse)."""
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(adapters))
    return traverse_util.unflatten_dict(flat)


def fold(params: dict, lora: LoraConfig) -> dict:
    """`params` without adapters, each targeted kernel W replaced by W + scaling * lora_a . lora_b (computed in
    float32, stored in W's dtype): the plain model then computes what the adapted one does (up to that rounding).
    Works on numpy or JAX arrays, stacked (scanned) or per-layer."""
    base, adapters = split_adapters(params)
    flat_base, flat_adapters = traverse_util.flatten_dict(base), traverse_util.flatten_dict(adapters)
    for module in sorted({path[:-1] for path in flat_adapters}):
        a, b = (flat_adapters[module + (leaf,)] for leaf in ADAPTER_LEAVES)
        flat_base[module + ("kernel",)] = _folded(flat_base[module + ("kernel",)], a, b, lora.scaling)
    return traverse_util.unflatten_dict(flat_base)


def _folded(kernel, a, b, scaling: float):
    """kernel + scaling * a . b over the rank axis, with any leading (layer) axes batched."""
    n_lead = (a.ndim - 1) + (b.ndim - 1) - kernel.ndim
    lead, rank = kernel.shape[:n_lead], a.shape[-1]
    xp = np if isinstance(kernel, np.ndarray) else jnp
    a_lir = xp.asarray(a, np.float32).reshape(*lead, -1, rank)
    b_lro = xp.asarray(b, np.float32).reshape(*lead, rank, -1)
    delta = xp.matmul(a_lir, b_lro).reshape(kernel.shape) * np.float32(scaling)
    return (xp.asarray(kernel, np.float32) + delta).astype(kernel.dtype)


def count_adapter_params(adapters: dict) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(adapters))


__all__ = ["ADAPTER_LEAVES", "TARGETS", "LoraConfig", "count_adapter_params", "fold", "is_adapter_path",
           "lora_a_init", "merge_trees", "split_adapters"]
