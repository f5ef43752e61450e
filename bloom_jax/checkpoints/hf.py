"""The Hugging Face BLOOM format: the one name-and-layout mapping between PyTorch tensors and our parameters,
the check of a checkpoint's tensors against its config, and loading them.

Each PyTorch tensor name (`h.3.self_attention.query_key_value.weight`, with or without the `transformer.` prefix)
corresponds to one parameter path of `bloom_jax.model` (for block tensors, one layer of a stacked array).
PyTorch linear weights are [out, in]; our kernels are [*in, *out], reshaped to name the heads. The files
themselves are read and written by `bloom_jax.checkpoints.hf_files`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from bloom_jax.checkpoints.hf_files import WeightFiles
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, abstract_params, make_model

PREFIX = "transformer."
TIED_HEAD = "lm_head.weight"  # equal to the embedding when present; not a separate parameter


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One PyTorch tensor <-> one parameter (one layer of it when `per_layer`).

    `kind` says how to convert: "copy" (same layout), "linear_weight" ([out, in] -> [*in, *out]) or
    "linear_bias" ([out] -> [*out]). `in_ndim` is how many leading kernel axes are inputs.
    """

    hf_suffix: str
    path: tuple[str, ...]
    kind: str
    per_layer: bool
    in_ndim: int = 1


_BLOCK = (
    TensorMap("input_layernorm.weight", ("input_layernorm", "scale"), "copy", True),
    TensorMap("input_layernorm.bias", ("input_layernorm", "bias"), "copy", True),
    TensorMap("self_attention.query_key_value.weight", ("self_attention", "query_key_value", "kernel"),
              "linear_weight", True),
    TensorMap("self_attention.query_key_value.bias", ("self_attention", "query_key_value", "bias"),
              "linear_bias", True),
    TensorMap("self_attention.dense.weight", ("self_attention", "dense", "kernel"), "linear_weight", True, 2),
    TensorMap("self_attention.dense.bias", ("self_attention", "dense", "bias"), "linear_bias", True),
    TensorMap("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "copy", True),
    TensorMap("post_attention_layernorm.bias", ("post_attention_layernorm", "bias"), "copy", True),
    TensorMap("mlp.dense_h_to_4h.weight", ("mlp", "dense_h_to_4h", "kernel"), "linear_weight", True),
    TensorMap("mlp.dense_h_to_4h.bias", ("mlp", "dense_h_to_4h", "bias"), "linear_bias", True),
    TensorMap("mlp.dense_4h_to_h.weight", ("mlp", "dense_4h_to_h", "kernel"), "linear_weight", True),
    TensorMap("mlp.dense_4h_to_h.bias", ("mlp", "dense_4h_to_h", "bias"), "linear_bias", True),
)
_GLOBAL = (
    TensorMap("word_embeddings.weight", ("word_embeddings", "embedding"), "copy", False),
    TensorMap("word_embeddings_layernorm.weight", ("word_embeddings_layernorm", "scale"), "copy", False),
    TensorMap("word_embeddings_layernorm.bias", ("word_embeddings_layernorm", "bias"), "copy", False),
    TensorMap("ln_f.weight", ("ln_f", "scale"), "copy", False),
    TensorMap("ln_f.bias", ("ln_f", "bias"), "copy", False),
)
_BY_SUFFIX = {m.hf_suffix: m for m in _BLOCK + _GLOBAL}
_LAYER_RE = re.compile(r"^h\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class TensorTarget:
    """Where one PyTorch tensor goes: the parameter path, the mapping, and for the scanned layout (block
    parameters stacked under `h`) the layer index; the unrolled layout has paths under `h_{i}` and no index."""

    path: tuple[str, ...]
    layer: int | None
    mapping: TensorMap


def hf_names(config: BloomConfig) -> list[str]:
    """Every tensor name (without prefix) a BLOOM checkpoint of `config` must hold, in model order."""
    names = [m.hf_suffix for m in _GLOBAL[:3]]
    names += [f"h.{i}.{m.hf_suffix}" for i in range(config.n_layer) for m in _BLOCK]
    return names + [m.hf_suffix for m in _GLOBAL[3:]]


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def target_of(name: str, config: BloomConfig, scan_layers: bool = True) -> TensorTarget | None:
    """The parameter a (prefix-stripped) tensor name maps to, or None if it is not a BLOOM tensor."""
    match = _LAYER_RE.match(name)
    if match:
        layer, suffix = int(match.group(1)), match.group(2)
        mapping = _BY_SUFFIX.get(suffix)
        if mapping is None or not mapping.per_layer or layer >= config.n_layer:
            return None
        if scan_layers:
            return TensorTarget(("h",) + mapping.path, layer, mapping)
        return TensorTarget((f"h_{layer}",) + mapping.path, None, mapping)
    mapping = _BY_SUFFIX.get(name)
    if mapping is None or mapping.per_layer:
        return None
    return TensorTarget(mapping.path, None, mapping)


def to_param(array: np.ndarray, mapping: TensorMap, param_shape: tuple[int, ...], dtype) -> np.ndarray:
    """A PyTorch tensor as our parameter (one layer's slice for block tensors) of `dtype`, with at most one copy.

    `param_shape` is without the layers axis.
    """
    if mapping.kind == "linear_weight":
        return _transpose(array, dtype).reshape(param_shape)
    if array.dtype == dtype:
        return np.ascontiguousarray(array).reshape(param_shape)
    out = np.empty(array.shape, dtype)
    if array.ndim == 0:
        out[...] = array
    else:
        _by_rows(array.shape[0], 1, lambda lo, hi: out.__setitem__(slice(lo, hi), array[lo:hi]))
    return out.reshape(param_shape)


def _transpose(matrix: np.ndarray, dtype) -> np.ndarray:
    """matrix.T as a new contiguous array of `dtype`, cast in the same pass.

    Done by XLA on the host CPU: its tiled transpose is 2.5x faster than numpy's blocked copy, and its casts
    between float32, float16 and bfloat16 round exactly as numpy's (tested bit for bit, denormals included).
    """
    dtype = np.dtype(dtype)
    if matrix.dtype not in _XLA_FLOATS:  # float64 would be silently narrowed by JAX without x64
        matrix = matrix.astype(dtype)
    cpu = jax.local_devices(backend="cpu")[0]
    return np.asarray(_transposer(dtype)(jax.device_put(matrix, cpu)))


_XLA_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@functools.cache
def _transposer(dtype: np.dtype) -> Callable:
    return jax.jit(lambda matrix: matrix.T.astype(dtype))


_POOL: ThreadPoolExecutor | None = None


def _by_rows(rows: int, align: int, fn: Callable[[int, int], None]) -> None:
    """fn(lo, hi) over `rows` split into one range per CPU core (numpy copies and casts release the GIL)."""
    global _POOL
    workers = os.cpu_count() or 1
    if _POOL is None:
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="bloom-jax-convert")
    step = -(-rows // workers)
    step = -(-step // align) * align
    list(_POOL.map(lambda lo: fn(lo, min(lo + step, rows)), range(0, rows, step)))


def from_param(param: np.ndarray, mapping: TensorMap) -> np.ndarray:
    """Inverse of `to_param`: our parameter (one layer) as the PyTorch tensor."""
    if mapping.kind == "linear_weight":
        size_in = math.prod(param.shape[: mapping.in_ndim])
        return _transpose(param.reshape(size_in, -1), param.dtype)
    if mapping.kind == "linear_bias":
        return param.reshape(-1)
    return param


def hf_shape(mapping: TensorMap, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a tensor whose (per-layer) parameter shape is `param_shape`."""
    if mapping.kind == "linear_weight":
        return (math.prod(param_shape[mapping.in_ndim:]), math.prod(param_shape[: mapping.in_ndim]))
    if mapping.kind == "linear_bias":
        return (math.prod(param_shape),)
    return tuple(param_shape)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One checkpoint tensor, checked against the config: where it is stored and where it goes."""

    name: str  # as stored, with any `transformer.` prefix
    file_name: str
    nbytes: int
    target: TensorTarget
    param_shape: tuple[int, ...]  # our shape of this tensor (one layer's slice for stacked parameters)


def plan_hf_tensors(files: WeightFiles, model: BloomForCausalLM, shapes: dict | None = None
                    ) -> list[PlannedTensor]:
    """Checks every stored tensor against the config before any is read, in file order.

    A missing, unexpected, duplicated or wrongly shaped tensor is an error naming it and its file.
    `lm_head.weight` (the tied embedding) is skipped.
    """
    config = model.config
    shapes = shapes if shapes is not None else nn.unbox(abstract_params(model))
    plan, seen = [], {}
    for name in files.ordered_names():
        stripped = strip_prefix(name)
        file_name = files.file_of[name].name
        if stripped == TIED_HEAD:
            continue
        target = target_of(stripped, config, model.scan_layers)
        if target is None:
            raise BloomJaxError(f"unexpected tensor {name} in {file_name}: not part of a {config.n_layer}-layer BLOOM")
        if stripped in seen:
            raise BloomJaxError(f"tensor {stripped} appears twice ({seen[stripped]} and {name})")
        seen[stripped] = name
        full_shape = get_path(shapes, target.path).shape
        param_shape = full_shape[1:] if target.layer is not None else full_shape
        shape, itemsize = files.shape_and_itemsize(name)
        expected = hf_shape(target.mapping, param_shape)
        if shape != expected:
            raise BloomJaxError(
                f"tensor {name} in {file_name} has shape {list(shape)}, but config.json implies {list(expected)}"
            )
        plan.append(PlannedTensor(name, file_name, math.prod(shape) * itemsize, target, param_shape))
    missing = [n for n in hf_names(config) if n not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BloomJaxError(f"missing tensor {missing[0]}{more} in {files.directory}")
    return plan


def hf_tensor_shapes(config: BloomConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, PyTorch shape) of every tensor a BLOOM checkpoint of `config` holds, in model order."""
    shapes = nn.unbox(abstract_params(make_model(config)))
    out = []
    for name in hf_names(config):
        target = target_of(name, config)
        full_shape = get_path(shapes, target.path).shape
        out.append((name, hf_shape(target.mapping, full_shape[1:] if target.layer is not None else full_shape)))
    return out


def load_hf_params(directory: str | os.PathLike, model: BloomForCausalLM) -> dict:
    """The parameters of a Hugging Face checkpoint directory, as `model.param_dtype` numpy arrays."""
    files = WeightFiles(directory)
    plan = plan_hf_tensors(files, model)
    np_dtype = np.dtype(model.param_dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), nn.unbox(abstract_params(model)))
    for tensor in plan:
        dest = get_path(params, tensor.target.path)
        value = to_param(files.read(tensor.name), tensor.target.mapping, tensor.param_shape, np_dtype)
        dest[tensor.target.layer if tensor.target.layer is not None else ...] = value
    return params


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    """The subtree (or leaf) of a nested dict at `path`."""
    for key in path:
        tree = tree[key]
    return tree
