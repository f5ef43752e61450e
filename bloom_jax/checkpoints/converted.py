"""The converted checkpoint format, its one owner: what `convert`, `save_pretrained` and the trainer write and
what `from_pretrained` restores.

A converted checkpoint is a directory or URL holding `config.json` (declaring the stored dtype), the tokenizer
files, and `params/`: an Orbax PyTree checkpoint in the scanned parameter layout, one zarr array per parameter
(no OCDBT, no compression, chunks of at most 64 MiB), that `orbax.checkpoint.StandardCheckpointer().restore`
reads and that any mesh restores shard by shard. `params/_METADATA` is written last: without it nothing loads.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from bloom_jax import storage
from bloom_jax.checkpoints.storage import Destination, clear, refuse_non_empty
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.model import BloomForCausalLM, abstract_params, stack_layers, unstack_layers
from bloom_jax.sharding import ShardingPlan
from bloom_jax.storage import Location, is_remote, join, kvstore_url, orbax_path

PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_CHUNK_BYTES = 64 * 2**20  # chunks small enough that one shard of a restore reads little it does not need


def is_converted(location: Location) -> bool:
    """True for a directory or URL holding a converted checkpoint (`params/_METADATA`, written last)."""
    try:
        return storage.is_file(join(location, PARAMS_DIR, "_METADATA"))
    except BloomJaxError:  # an unreachable URL holds nothing that loads; its read says why
        return False


def read_config(location: Location) -> BloomConfig:
    """The `config.json` of a converted checkpoint."""
    data = storage.read_bytes(join(location, "config.json"))
    if data is None:
        raise BloomJaxError(f"{location} has parameters but no config.json")
    try:
        return BloomConfig.from_json_text(data.decode(), f"{location}/config.json")
    except UnicodeDecodeError:
        raise BloomJaxError(f"{location}/config.json is not UTF-8 text") from None


def config_json(config: BloomConfig, dtype: np.dtype) -> bytes:
    """config.json declaring the stored dtype (`dtype` for transformers v5, `torch_dtype` for v4)."""
    out = config.replace(extra={**config.extra, "torch_dtype": np.dtype(dtype).name, "dtype": np.dtype(dtype).name})
    return (json.dumps(out.to_dict(), indent=2) + "\n").encode()


def _chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool) -> list[int]:
    """One layer per chunk for stacked arrays, then the largest axis halved until a chunk is <= 64 MiB."""
    chunk = list(shape)
    if stacked:
        chunk[0] = 1
    while math.prod(chunk) * itemsize > _CHUNK_BYTES:
        axis = max(range(len(chunk)), key=lambda i: chunk[i])
        chunk[axis] = -(-chunk[axis] // 2)
    return chunk


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).str


class OrbaxParamsWriter:
    """Writes a parameter pytree into an Orbax PyTree checkpoint piece by piece, as Orbax itself lays one out
    without OCDBT (one zarr array per parameter; a test holds the metadata to what Orbax writes).

    `open(path, shape, dtype, stacked)` creates one zarr array; `write(path, value, index)` fills it (a layer of
    a stacked array, or all of it); `finish()` writes the metadata that makes the checkpoint restorable, last,
    so an interrupted writer leaves nothing that Orbax would restore.
    """

    def __init__(self, location: Location):
        self.location, self.url = location, kvstore_url(location)
        self._arrays: dict[tuple[str, ...], Any] = {}

    def open(self, path: tuple[str, ...], shape: tuple[int, ...], dtype: np.dtype, stacked: bool) -> None:
        import tensorstore as ts

        spec = {
            "driver": "zarr",
            "kvstore": self.url + ".".join(path) + "/",
            "metadata": {"shape": list(shape), "chunks": _chunk_shape(shape, np.dtype(dtype).itemsize, stacked),
                         "dtype": _zarr_dtype(dtype), "compressor": None},
            # No fsync per file, for speed: the metadata written last guards against interrupted runs, not
            # against the OS losing recent writes in a crash.
            "context": {"file_io_sync": False},
        }
        self._arrays[path] = ts.open(spec, create=True, delete_existing=True,
                                     context=storage.tensorstore_context()).result()

    def write(self, path: tuple[str, ...], value: np.ndarray, index: int | None = None) -> list:
        """Starts writing `value` into the whole array, or into layer `index` of a stacked one, in pieces of at
        most 64 MiB. Returns the pieces' futures; `value` must stay alive and unchanged until they are done."""
        array = self._arrays[path]
        if index is not None:
            array = array[index]
        if value.ndim == 0:
            return [array.write(value)]
        rows, futures = value.shape[0], []
        step = max(1, _CHUNK_BYTES // max(1, value[0].nbytes))
        for start in range(0, rows, step):
            stop = min(start + step, rows)  # tensorstore does not clip slices as numpy does
            futures.append(array[start:stop].write(value[start:stop]))
        return futures

    def finish(self) -> None:
        tree, shardings = {}, {}
        for path, array in self._arrays.items():
            name = ".".join(path)
            tree[str(path)] = {
                "key_metadata": [{"key": key, "key_type": 2} for key in path],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                   "write_shape": list(array.shape)},
            }
            shardings[base64.b64encode(name.encode()).decode()] = json.dumps(
                {"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
        storage.write_bytes(join(self.location, "_sharding"), json.dumps(shardings).encode())
        # Orbax's own writer also names its handler's private class path here; restoring does not read it.
        now = time.time_ns()
        storage.write_bytes(join(self.location, "_CHECKPOINT_METADATA"), json.dumps({
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {}}).encode())
        if is_remote(self.location):  # what Orbax restores from an object store only where it is (no renames)
            storage.write_bytes(join(self.location, "commit_success.txt"), b"Checkpoint commit was successful")
        metadata = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        storage.write_bytes(join(self.location, "_METADATA"), json.dumps(metadata).encode())  # last: it loads


class StoredParams:
    """A converted checkpoint's parameters, read one array (or one layer of a stacked one) at a time with
    TensorStore: what streaming readers such as `export` use instead of a restore of the whole tree."""

    def __init__(self, location: Location):
        if not is_converted(location):
            raise BloomJaxError(
                f"no converted checkpoint at {location} (expected {PARAMS_DIR}/_METADATA; see bloom-jax convert)")
        self.location = location
        self._root = kvstore_url(location) + PARAMS_DIR + "/"
        self._arrays: dict[tuple[str, ...], Any] = {}

    def _array(self, path: tuple[str, ...]):
        import tensorstore as ts

        if path not in self._arrays:
            try:
                spec = {"driver": "zarr", "kvstore": self._root + ".".join(path) + "/"}
                self._arrays[path] = ts.open(spec, open=True, context=storage.tensorstore_context()).result()
            except Exception as e:
                raise BloomJaxError(f"cannot read parameter {'.'.join(path)} of {self.location}: {one_line(e)}"
                                    ) from None
        return self._arrays[path]

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._array(path).shape)

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._array(path).dtype.numpy_dtype)

    def read(self, path: tuple[str, ...], layer: int | None = None) -> np.ndarray:
        """The array at `path` (with `layer`: that layer of a stacked array)."""
        array = self._array(path)
        return (array if layer is None else array[layer]).read().result()


def restore_params(location: Location, model: BloomForCausalLM, sharding: ShardingPlan | None = None) -> dict:
    """A converted checkpoint's parameters, cast to `model.param_dtype`, each array read into its shards.

    Without a plan every array lands on the first device; with one, each device reads only its shard, as the
    plan's rules place it. The stored layout is scanned; an unrolled model gets it unstacked after the restore.
    """
    ocp = storage.orbax()
    stored = model.clone(scan_layers=True)
    if sharding is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              nn.unbox(abstract_params(stored)))
    else:
        target = sharding.abstract_params(stored)
    try:
        params = ocp.StandardCheckpointer().restore(join(orbax_path(location), PARAMS_DIR), target)
    except Exception as e:
        raise BloomJaxError(f"cannot restore {location}: {storage.wire_error(e) or one_line(e)}") from None
    return params if model.scan_layers else unstack_layers(params)


def save_pretrained(params: Any, config: BloomConfig, dst: Location, tokenizer=None, *,
                    extra_files: Mapping[str, bytes] | None = None, overwrite: bool = False) -> None:
    """Writes `params` (either layer layout, stored in their own dtype) as a converted checkpoint at `dst`, with
    `config` and, if given, the `bloom_jax.tokenizer.Tokenizer`: what `from_pretrained`, `bloom-jax generate`
    and `export` read. `extra_files`: more files by name, written beside `config.json` as they are (a base
    checkpoint's `generation_config.json`, `tokenizer_config.json`, ...).

    A non-empty `dst` is refused without `overwrite`. On one process the checkpoint is staged beside a local
    `dst` and renamed into place when complete. In a multi-process run every process must call this (each writes
    its own shards, to a `dst` they share); it is then written in place, `params/` last.
    """
    if "h" not in params:
        params = stack_layers(params, config.n_layer)
    files = {"config.json": config_json(config, params["word_embeddings"]["embedding"].dtype)}
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer.to_json().encode()
    for name, data in (extra_files or {}).items():
        if name in files or name == PARAMS_DIR or "/" in name or name.startswith("."):
            raise BloomJaxError(f"save_pretrained: {name!r} is not a file this may add beside the checkpoint")
        files[name] = data
    if jax.process_count() == 1:
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(params)) + sum(len(d) for d in files.values())
        with Destination(dst, overwrite, needed_bytes=needed) as out:
            for key, data in files.items():
                out.write_bytes(key, data)
            _save_params(join(out.root, PARAMS_DIR), params)
        return
    _save_in_place(params, files, dst, overwrite)


def _save_in_place(params: Any, files: dict[str, bytes], dst: Location, overwrite: bool) -> None:
    """`save_pretrained` across processes: the processes agree that `dst` may be written, process 0 writes the
    files, then all write `params/`, which Orbax renames into place once every process is done."""
    from jax.experimental import multihost_utils

    location = orbax_path(dst)
    refuse_non_empty(dst, overwrite)
    multihost_utils.sync_global_devices(f"bloom_jax.save_pretrained {location}: checked")
    if jax.process_index() == 0:
        if overwrite:  # nothing of what was there survives, as when one process renames a staged copy over it
            clear(dst)
        storage.make_dirs(location)
        for key, data in files.items():
            storage.write_bytes(join(dst, key), data)
    multihost_utils.sync_global_devices(f"bloom_jax.save_pretrained {location}: files")
    _save_params(join(location, PARAMS_DIR), params)


def _save_params(location: str, params: Any) -> None:
    """Orbax writes `params` (sharded arrays: each process its own shards) in this module's layout."""
    ocp = storage.orbax()
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_no_ocdbt_merge_warning)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(orbax_path(location), args=ocp.args.PyTreeSave(params, save_args=save_args),
                              force=True)
    finally:
        absl_logger.removeFilter(_no_ocdbt_merge_warning)


def _no_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """Orbax (0.11.26 to 0.12) looks for per-process OCDBT files to merge after every save and warns when it finds
    none, which is every save of this format (no OCDBT, on purpose): a warning about nothing, kept off stderr."""
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()
