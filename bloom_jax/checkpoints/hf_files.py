"""The files of Hugging Face checkpoints: readers for every layout, and a streaming safetensors writer.

Layouts: `model.safetensors`; `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`; `pytorch_model.bin`; `pytorch_model-0000k-of-0000n.bin` with
`pytorch_model.bin.index.json`; BigScience's `pytorch_model_0000k-of-0000n.bin`, with or without an index.
`.bin` files are read with `torch.load(weights_only=True)`, which refuses pickles that would run code. An index
may name only files inside its directory (`shard_path`): nothing outside is opened on its word.

Safetensors files are read and written here rather than by the `safetensors` library: its reader memory-maps
whole shards (whose pages count as resident memory of the process) and its writer takes every tensor of a file
at once, where conversion and export hold one tensor at a time.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.storage import Location, join

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
        file_of, checked = {}, {}  # every entry is checked before any shard is opened
        for name, entry in weight_map.items():
            if not isinstance(entry, str) or entry not in checked:  # anything but a string is refused
                checked[entry] = shard_path(self.directory, index_path.name, name, entry)
            file_of[name] = checked[entry]
        for entry, path in sorted(checked.items()):
            if not path.is_file():
                raise BloomJaxError(f"missing shard {entry}, listed in {index_path.name}")
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


_NOT_IN_A_SHARD_NAME = re.compile(r"[\\:\x00-\x1f\x7f]")  # backslash (Windows paths), colon (URLs, drives), controls


def shard_path(directory: Path, index_name: str, tensor: str, entry: object) -> Path:
    """The shard file that the checkpoint index `index_name` of `directory` names for `tensor`, checked to be a file
    inside the directory: every index is read through this, before any shard is opened.

    `entry` must be a relative path of plain names joined by '/': a flat file name as the hub's checkpoints have
    (`model-00001-of-00002.safetensors`), or one in a subfolder (`part/model-00001-of-00002.safetensors`). No
    part may be empty, '.' or '..' (so no absolute path, no climbing out, even one that would come back in); no
    backslash, colon or control character (no Windows path, no URL). Then, with its symlinks resolved, the path
    must lie under the directory's real path, or, for a huggingface_hub snapshot (`models--ORG--NAME/snapshots/
    REVISION`, whose files are links into `models--ORG--NAME/blobs`), under its repository's `blobs`. Anything else
    is a `BloomJaxError` naming the index, the entry and the tensor. Only names and links are looked at: nothing
    is opened.
    """
    name = entry if isinstance(entry, str) else ""  # a number or null names no file
    if _NOT_IN_A_SHARD_NAME.search(name) or {"", ".", ".."} & set(name.split("/")):
        raise BloomJaxError(f"{index_name} names {entry!r} for tensor {tensor!r}: a shard must be a file inside "
                            "the checkpoint directory")
    path = directory / entry
    try:
        real_directory, real = directory.resolve(), path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        real_directory = real = None
    roots = [] if real_directory is None else [real_directory]
    if (real_directory is not None and real_directory.parent.name == "snapshots"
            and real_directory.parent.parent.name.startswith("models--")):
        # Not resolved itself: a resolved path lies under it only where REPO/blobs is a directory, not a link.
        roots.append(real_directory.parent.parent / "blobs")
    if not any(real.is_relative_to(root) for root in roots):
        where = "its links loop" if real is None else f"it links to {real}"
        raise BloomJaxError(f"{index_name} names {entry!r} for tensor {tensor!r}: a shard must be a file inside "
                            f"the checkpoint directory ({where})")
    return path


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


def write_safetensors(directory: Location, tensors: list[tuple[str, tuple[int, ...]]], dtype: np.dtype,
                      max_shard_bytes: int, read: Callable[[str], np.ndarray],
                      on_bytes: Callable[[int], object] = lambda n: None) -> list[str]:
    """Writes `tensors` ((name, shape), in order) as safetensors, streaming: `read(name)` is called once per
    tensor, just before its bytes are written, so one tensor is held at a time. `directory`: a local directory
    or a URL (each file uploaded in parts as it is written).

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
        with storage.open_write(join(directory, file_name)) as f:
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
        storage.write_bytes(join(directory, _SAFETENSORS_INDEX), (json.dumps(index, indent=2) + "\n").encode())
    return file_names


def safetensors_bytes(tensors: dict[str, np.ndarray], dtype=np.float32) -> bytes:
    """A whole safetensors file in memory (small files: a LoRA adapter), every tensor stored in `dtype`."""
    buffer = io.BytesIO()
    _write_safetensors_header(buffer, [(name, value.shape) for name, value in tensors.items()], np.dtype(dtype))
    for value in tensors.values():
        buffer.write(np.ascontiguousarray(value, dtype).tobytes())
    return buffer.getvalue()


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
