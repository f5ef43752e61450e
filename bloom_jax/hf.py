"""Hugging Face BLOOM checkpoints: the one name-and-layout mapping, and readers for every file layout.

Mapping: each PyTorch tensor name (`h.3.self_attention.query_key_value.weight`, with or without the
`transformer.` prefix) corresponds to one parameter path of `bloom_jax.model` (for block tensors, one layer of a
stacked array). PyTorch linear weights are [out, in]; our kernels are [*in, *out], reshaped to name the heads.

Layouts (see `../shared/bloom-facts.md`): `model.safetensors`; `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`; `pytorch_model.bin`; `pytorch_model-0000k-of-0000n.bin` with
`pytorch_model.bin.index.json`; BigScience's `pytorch_model_0000k-of-0000n.bin`, with or without an index.
`.bin` files are read with `torch.load(weights_only=True)`, which refuses pickles that would run code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError

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


# -- file layouts -------------------------------------------------------------------------------------------------
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_SAFETENSORS_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_BIN_SHARD = re.compile(r"^pytorch_model[-_]\d+-of-\d+\.bin$")


class WeightFiles:
    """The tensors of a Hugging Face checkpoint directory: which file holds each, and a reader.

    Reads one tensor at a time (safetensors with `pread`, `.bin` memory-mapped, one file open at a time), so a
    caller that converts and drops each tensor holds about one tensor in memory. Names are kept as stored
    (with any `transformer.` prefix).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise BloomJaxError(f"not a directory: {self.directory}")
        self._open_path: Path | None = None
        self._open: object | None = None
        self._safetensors: dict[Path, SafetensorsFile] = {}  # headers only, kept: they hold no file or data
        self.file_of: dict[str, Path] = self._discover()

    # The layout is decided once, preferring safetensors: a directory may hold both formats.
    def _discover(self) -> dict[str, Path]:
        d = self.directory
        for index_name in (_SAFETENSORS_INDEX, _BIN_INDEX):
            if (d / index_name).is_file():
                return self._from_index(d / index_name)
        if (d / "model.safetensors").is_file():
            return self._scan([d / "model.safetensors"])
        shards = sorted(p for p in d.iterdir() if _SAFETENSORS_SHARD.match(p.name))
        if shards:
            return self._scan(shards)
        if (d / "pytorch_model.bin").is_file():
            return self._scan([d / "pytorch_model.bin"])
        shards = sorted(p for p in d.iterdir() if _BIN_SHARD.match(p.name))
        if shards:
            return self._scan(shards)
        raise BloomJaxError(f"no checkpoint in {d} (expected model*.safetensors or pytorch_model*.bin)")

    def _from_index(self, index_path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BloomJaxError(f"{index_path} is not a checkpoint index (no 'weight_map' object)") from None
        file_of = {name: self.directory / file for name, file in weight_map.items()}
        for path in sorted(set(file_of.values())):
            if not path.is_file():
                raise BloomJaxError(f"missing shard {path.name}, listed in {index_path.name}")
        return file_of

    def _scan(self, paths: list[Path]) -> dict[str, Path]:
        file_of: dict[str, Path] = {}
        for path in paths:
            for name in self._names_in(path):
                if name in file_of:
                    raise BloomJaxError(f"tensor {name} appears in both {file_of[name].name} and {path.name}")
                file_of[name] = path
        return file_of

    def _names_in(self, path: Path) -> list[str]:
        return list(self._handle(path).keys())

    def _handle(self, path: Path):
        """The file's reader: a safetensors header, or the open `.bin` (one at a time: the previous one is
        closed, so memory stays bounded)."""
        if path.suffix == ".safetensors":
            if path not in self._safetensors:
                self._safetensors[path] = _open_safetensors(path)
            return self._safetensors[path]
        if self._open_path != path:
            self._open, self._open_path = None, None
            self._open = _open_bin(path)
            self._open_path = path
        return self._open

    def shape_and_itemsize(self, name: str) -> tuple[tuple[int, ...], int]:
        """A tensor's shape and bytes per element, without reading its data."""
        path = self.file_of[name]
        handle = self._handle(path)
        try:
            if path.suffix == ".safetensors":
                return handle.shape_and_itemsize(name)
            tensor = handle[name]
            return tuple(tensor.shape), tensor.element_size()
        except KeyError:
            raise BloomJaxError(f"tensor {name} is listed for {path.name} but is not in it") from None

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array (bfloat16 as `ml_dtypes.bfloat16`)."""
        path = self.file_of[name]
        handle = self._handle(path)
        try:
            if path.suffix == ".safetensors":
                return handle.get_tensor(name)
            return _torch_to_numpy(handle[name])
        except KeyError:
            raise BloomJaxError(f"tensor {name} is listed for {path.name} but is not in it") from None
        except Exception as e:  # a truncated or corrupt file fails here, on first access
            raise BloomJaxError(f"cannot read tensor {name} from {path.name}: {one_line(e)}") from None

    def prefetch(self, name: str) -> None:
        """Asks the OS to start reading a safetensors tensor into its page cache, so that a later `read`
        overlaps the disk with work done meanwhile. Costs no process memory; a no-op for `.bin`."""
        path = self.file_of[name]
        if path.suffix == ".safetensors":
            self._handle(path).prefetch(name)

    def ordered_names(self) -> list[str]:
        """Names grouped by file, so a reader opens each file once."""
        return sorted(self.file_of, key=lambda n: (str(self.file_of[n]), n))


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class SafetensorsFile:
    """A safetensors file read with plain `pread`s: one tensor at a time into its own buffer, no memory map
    (mapped pages of a multi-GB shard would count as resident memory of the process)."""

    _DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
               "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise BloomJaxError(f"{path.name} is not a safetensors file (or is truncated)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BloomJaxError(f"{path.name} has a corrupt safetensors header") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = self._DTYPES.get(entry["dtype"])
            if dtype is None:
                raise BloomJaxError(f"tensor {name} in {path.name} has unsupported dtype {entry['dtype']}")
            if self._data_start + end > size:
                raise BloomJaxError(f"{path.name} is truncated: tensor {name} ends past the end of the file")
            self._entries[name] = (np.dtype(dtype), tuple(entry["shape"]), begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape_and_itemsize(self, name: str) -> tuple[tuple[int, ...], int]:
        dtype, shape, _, _ = self._entries[name]
        return shape, dtype.itemsize

    def prefetch(self, name: str) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        _, _, begin, end = self._entries[name]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, self._data_start + begin, end - begin, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def get_tensor(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        array = np.empty(shape, dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                raise BloomJaxError(f"{self.path.name} is truncated: tensor {name} is incomplete")
        return array


def _open_safetensors(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except OSError as e:
        raise BloomJaxError(f"cannot read {path.name}: {e.strerror}") from None


def _open_bin(path: Path):
    try:
        import torch
    except ImportError:
        raise BloomJaxError(
            f"{path.name} is a PyTorch .bin checkpoint: install torch to read it (pip install 'bloom-jax[torch]')"
        ) from None
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files in the legacy (pre-zip) format cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BloomJaxError(
            f"refusing to load {path.name}: it is not a plain tensor pickle ({one_line(e)})"
        ) from None
    except Exception as e:
        raise BloomJaxError(f"cannot read {path.name}: {one_line(e)}") from None


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


# -- writing -------------------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_safetensors(directory: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: np.dtype,
                      max_shard_bytes: int, read: Callable[[str], np.ndarray],
                      on_bytes: Callable[[int], object] = lambda n: None) -> list[str]:
    """Writes `tensors` ((name, shape), in order) as safetensors, streaming: `read(name)` is called once per
    tensor, just before its bytes are written, so one tensor is held at a time.

    One `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own) with `model.safetensors.index.json`. Returns the file names.
    """
    itemsize = np.dtype(dtype).itemsize
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    if len(shards) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file_name, shard in zip(file_names, shards):
        with open(directory / file_name, "wb") as f:
            _write_safetensors_header(f, shard, np.dtype(dtype))
            for name, shape in shard:
                value = np.ascontiguousarray(read(name), dtype=dtype)
                if value.shape != tuple(shape):
                    raise ValueError(f"{name}: got shape {value.shape}, declared {shape}")
                f.write(memoryview(value.reshape(-1).view(np.uint8)))
                on_bytes(value.nbytes)
    if len(shards) > 1:
        total = sum(math.prod(shape) for _, shape in tensors) * itemsize
        weight_map = {name: file_name for file_name, shard in zip(file_names, shards) for name, _ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / _SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return file_names


def _write_safetensors_header(f, shard: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> None:
    """The header for the tensors written next, in order: 8-byte length, then JSON padded to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
