"""BLOOM checkpoints: `from_pretrained` (converted, Hugging Face or hub), streaming `convert` of Hugging Face
checkpoints into Orbax, `export` back to Hugging Face safetensors.

A converted checkpoint is a directory or URL holding `config.json`, the tokenizer files and `params/`, an Orbax
PyTree checkpoint in the scanned parameter layout that any mesh restores shard by shard.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from bloom_jax import hf
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, abstract_params, make_model, unstack_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_dtype(dtype: Any) -> jnp.dtype:
    """`"float32"`, `"bfloat16"`, `"float16"` or the dtype itself; anything else is an error."""
    if dtype is None:
        return jnp.dtype(jnp.float32)
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise BloomJaxError(f"unsupported dtype {name!r} (choose from {', '.join(DTYPES)})")
    return jnp.dtype(DTYPES[name])


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory as is; a hub id (`bigscience/bloom-560m`) through huggingface_hub's cache.

    The hub's own settings apply (`HF_HOME`, `HF_HUB_OFFLINE=1` to use the cache only).
    """
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise BloomJaxError(f"not a model directory: {local}")
        return local
    if not _HUB_ID.match(str(path)):
        raise BloomJaxError(f"no such directory, and not a hub id (org/name): {local}")
    from huggingface_hub import snapshot_download

    try:
        # Safetensors first; only a repository without them costs a .bin download.
        directory = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.bin", "tokenizer*"]))
    except Exception as e:  # offline, unknown repository, no access...
        raise BloomJaxError(f"no directory {path}, and cannot fetch it from the Hugging Face hub: "
                            f"{hf.one_line(e)}") from None
    return directory


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One checkpoint tensor, checked against the config: where it is stored and where it goes."""

    name: str  # as stored, with any `transformer.` prefix
    file_name: str
    nbytes: int
    target: hf.TensorTarget
    param_shape: tuple[int, ...]  # our shape of this tensor (one layer's slice for stacked parameters)


def plan_hf_tensors(files: hf.WeightFiles, model: BloomForCausalLM, shapes: dict | None = None
                    ) -> list[PlannedTensor]:
    """Checks every stored tensor against the config before any is read, in file order.

    A missing, unexpected, duplicated or wrongly shaped tensor is an error naming it and its file.
    `lm_head.weight` (the tied embedding) is skipped.
    """
    config = model.config
    shapes = shapes if shapes is not None else nn.unbox(abstract_params(model))
    plan, seen = [], {}
    for name in files.ordered_names():
        stripped = hf.strip_prefix(name)
        file_name = files.file_of[name].name
        if stripped == hf.TIED_HEAD:
            continue
        target = hf.target_of(stripped, config, model.scan_layers)
        if target is None:
            raise BloomJaxError(f"unexpected tensor {name} in {file_name}: not part of a {config.n_layer}-layer BLOOM")
        if stripped in seen:
            raise BloomJaxError(f"tensor {stripped} appears twice ({seen[stripped]} and {name})")
        seen[stripped] = name
        full_shape = _get(shapes, target.path).shape
        param_shape = full_shape[1:] if target.layer is not None else full_shape
        shape, itemsize = files.shape_and_itemsize(name)
        expected = hf.hf_shape(target.mapping, param_shape)
        if shape != expected:
            raise BloomJaxError(
                f"tensor {name} in {file_name} has shape {list(shape)}, but config.json implies {list(expected)}"
            )
        plan.append(PlannedTensor(name, file_name, math.prod(shape) * itemsize, target, param_shape))
    missing = [n for n in hf.hf_names(config) if n not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BloomJaxError(f"missing tensor {missing[0]}{more} in {files.directory}")
    return plan


def hf_tensor_shapes(config: BloomConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, PyTorch shape) of every tensor a BLOOM checkpoint of `config` holds, in model order."""
    shapes = nn.unbox(abstract_params(make_model(config)))
    out = []
    for name in hf.hf_names(config):
        target = hf.target_of(name, config)
        full_shape = _get(shapes, target.path).shape
        out.append((name, hf.hf_shape(target.mapping, full_shape[1:] if target.layer is not None else full_shape)))
    return out


def load_hf_params(directory: str | os.PathLike, model: BloomForCausalLM) -> dict:
    """The parameters of a Hugging Face checkpoint directory, as `model.param_dtype` numpy arrays."""
    files = hf.WeightFiles(directory)
    plan = plan_hf_tensors(files, model)
    np_dtype = np.dtype(model.param_dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), nn.unbox(abstract_params(model)))
    for tensor in plan:
        dest = _get(params, tensor.target.path)
        value = hf.to_param(files.read(tensor.name), tensor.target.mapping, tensor.param_shape, np_dtype)
        dest[tensor.target.layer if tensor.target.layer is not None else ...] = value
    return params


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# -- converted checkpoints (Orbax) ---------------------------------------------------------------------------------
# A converted checkpoint is a directory (or URL) with config.json, the tokenizer files, and `params/`: an Orbax
# PyTree checkpoint (zarr arrays, no OCDBT) that `ocp.StandardCheckpointer().restore` reads. We write its arrays
# with tensorstore one source tensor at a time, so a conversion never holds more than about one tensor.
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_CHUNK_BYTES = 64 * 2**20  # chunks small enough that one shard of a restore reads little it does not need
_ORBAX_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    return bool(_URL.match(str(location)))


def _kvstore_url(location: str | os.PathLike) -> str:
    """A tensorstore kvstore URL ending in '/' for a local path or a URL (`gs://...`, `file://...`)."""
    url = str(location) if is_url(location) else "file://" + str(Path(location).resolve())
    return url.rstrip("/") + "/"


def _kvstore(location: str | os.PathLike):
    import tensorstore as ts

    try:
        return ts.KvStore.open(_kvstore_url(location)).result()
    except Exception as e:
        raise BloomJaxError(f"cannot open {location}: {hf.one_line(e)}") from None


def is_converted(location: str | os.PathLike) -> bool:
    """True for a directory or URL holding a converted checkpoint (`params/_METADATA`)."""
    if not is_url(location):
        return (Path(location) / PARAMS_DIR / "_METADATA").is_file()
    try:
        return _kvstore(location).read(f"{PARAMS_DIR}/_METADATA").result().state == "value"
    except BloomJaxError:
        return False


def _read_bytes(location: str | os.PathLike, key: str) -> bytes | None:
    """A file of a local directory or URL, exactly as stored; None if there is none."""
    if not is_url(location):
        path = Path(location) / key
        return path.read_bytes() if path.is_file() else None
    result = _kvstore(location).read(key).result()
    return bytes(result.value) if result.state == "value" else None


def _read_config(location: str | os.PathLike) -> BloomConfig:
    data = _read_bytes(location, "config.json")
    if data is None:
        raise BloomJaxError(f"{location} has parameters but no config.json")
    try:
        return BloomConfig.from_json_text(data.decode(), f"{location}/config.json")
    except UnicodeDecodeError:
        raise BloomJaxError(f"{location}/config.json is not UTF-8 text") from None


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
    return "bfloat16" if dtype == jnp.bfloat16 else np.dtype(dtype).str


class OrbaxParamsWriter:
    """Writes a parameter pytree into an Orbax PyTree checkpoint piece by piece.

    `open(path, shape, dtype, stacked)` creates one zarr array; `write(path, value, index)` fills it (a layer of
    a stacked array, or all of it); `finish()` writes the metadata that makes the checkpoint restorable, last,
    so an interrupted writer leaves nothing that Orbax would restore.
    """

    def __init__(self, location: str):
        self.url = _kvstore_url(location)
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
        self._arrays[path] = ts.open(spec, create=True, delete_existing=True).result()

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
        kv = _kvstore(self.url)
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
        kv.write("_sharding", json.dumps(shardings)).result()
        metadata = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        kv.write("_METADATA", json.dumps(metadata)).result()
        now = time.time_ns()
        kv.write("_CHECKPOINT_METADATA", json.dumps({
            "item_handlers": _ORBAX_HANDLER, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now, "custom_metadata": {}})).result()


def _wait(futures: list, raise_errors: bool = True) -> None:
    try:
        for future in futures:
            try:
                future.result()
            except Exception:
                if raise_errors:
                    raise
    finally:
        futures.clear()


class _Destination:
    """Where a conversion or export writes: a local directory (staged beside it, then renamed into place) or a
    URL (written in place, the files that make it loadable last). A non-empty destination needs `overwrite`."""

    def __init__(self, location: str | os.PathLike, overwrite: bool):
        self.location, self.overwrite = str(location), overwrite
        if is_url(location):
            self._kv = _kvstore(location)
            if self._kv.list().result() and not overwrite:
                raise BloomJaxError(f"{location} is not empty (use --overwrite to replace it)")
            self.root = self.location
        else:
            final = Path(location)
            if final.exists() and not final.is_dir():
                raise BloomJaxError(f"{final} exists and is not a directory")
            if final.is_dir() and any(final.iterdir()) and not overwrite:
                raise BloomJaxError(f"{final} is not empty (use --overwrite to replace it)")
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                self.root = tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)
            except OSError as e:
                raise BloomJaxError(f"cannot write in {final.parent}: {e.strerror}") from None

    def __enter__(self) -> _Destination:
        if is_url(self.location) and self.overwrite:
            import tensorstore as ts

            self._kv.delete_range(ts.KvStore.KeyRange()).result()
        return self

    def write_bytes(self, key: str, data: bytes) -> None:
        if is_url(self.root):
            self._kv.write(key, data).result()
        else:
            (Path(self.root) / key).write_bytes(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        if is_url(self.location):
            return  # an incomplete URL destination lacks _METADATA, so nothing will restore it
        if exc_type is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        final = Path(self.location)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.root, 0o777 & ~umask)  # mkdtemp made it private
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.root, final)


# Source bytes the OS is asked to read ahead of the tensor being converted: enough to keep the disk busy while
# a tensor is converted, held in the page cache (not in the process's memory).
_READ_AHEAD_BYTES = 256 * 2**20


def _progress(total_bytes: int, what: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, overwrite: bool = False,
            progress: bool = True) -> BloomConfig:
    """Converts a Hugging Face BLOOM checkpoint (directory or hub id) into a converted checkpoint at `dst`.

    Streams: one source tensor is read, converted and written at a time. `dtype` (None: float32) is the stored
    parameter dtype. Every tensor is checked against config.json before anything is written; the output appears
    at `dst` only when complete.
    """
    param_dtype = parse_dtype(dtype)
    directory = resolve_model_dir(src)
    config = BloomConfig.from_json(directory / "config.json")
    model = make_model(config, param_dtype=param_dtype)
    files = hf.WeightFiles(directory)
    shapes = nn.unbox(abstract_params(model))
    plan = plan_hf_tensors(files, model, shapes)
    np_dtype = np.dtype(param_dtype)

    with _Destination(dst, overwrite) as out:
        writer = OrbaxParamsWriter(_join(out.root, PARAMS_DIR))
        for path, leaf in flatten_dict(shapes).items():
            writer.open(path, leaf.shape, np_dtype, stacked=path[0] == "h")
        # Writes run in tensorstore's threads while the next tensors are read and converted; the bytes held
        # (written, read, converted) stay under twice the largest tensor.
        budget = 2 * max(max(t.nbytes, math.prod(t.param_shape) * np_dtype.itemsize) for t in plan)
        pending: collections.deque = collections.deque()  # (futures, bytes) of writes in flight, oldest first
        try:
            with _progress(sum(t.nbytes for t in plan), "converting", progress) as bar:
                prefetched = 0  # plan[:prefetched] have been handed to the OS's read-ahead
                for count, tensor in enumerate(plan, 1):
                    prefetched = max(prefetched, count)
                    ahead = sum(t.nbytes for t in plan[count:prefetched])
                    while prefetched < len(plan) and ahead < _READ_AHEAD_BYTES:
                        files.prefetch(plan[prefetched].name)
                        ahead += plan[prefetched].nbytes
                        prefetched += 1
                    out_bytes = math.prod(tensor.param_shape) * np_dtype.itemsize
                    while pending and sum(b for _, b in pending) + tensor.nbytes + out_bytes > budget:
                        _wait(pending.popleft()[0])
                    value = hf.to_param(files.read(tensor.name), tensor.target.mapping, tensor.param_shape,
                                        np_dtype)
                    pending.append((writer.write(tensor.target.path, value, tensor.target.layer), out_bytes))
                    del value  # the futures keep it alive until written
                    bar.update(tensor.nbytes)
                    bar.set_postfix_str(f"{count}/{len(plan)} tensors")
                while pending:
                    _wait(pending.popleft()[0])
        finally:
            for futures, _ in pending:  # never leave a write running on failure
                _wait(futures, raise_errors=False)
        out.write_bytes("config.json", _config_json(config, np_dtype))
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                out.write_bytes(name, (directory / name).read_bytes())
        writer.finish()  # last: the metadata that makes the checkpoint restorable
    return config


def _config_json(config: BloomConfig, dtype: np.dtype) -> bytes:
    """config.json declaring the stored dtype (`dtype` for transformers v5, `torch_dtype` for v4)."""
    out = config.replace(extra={**config.extra, "torch_dtype": dtype.name, "dtype": dtype.name})
    return (json.dumps(out.to_dict(), indent=2) + "\n").encode()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB` or a plain integer (GB = 10^9 bytes, as transformers counts)."""
    match = _SIZE.match(str(text))
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").lower()]) if match else 0
    if size < 1:
        raise BloomJaxError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    return size


def export(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, max_shard_size: str | int = "5GB",
           overwrite: bool = False, progress: bool = True) -> list[str]:
    """Writes a converted checkpoint as a Hugging Face directory that `BloomForCausalLM.from_pretrained` loads.

    Safetensors with `transformer.`-prefixed names, split into `model-0000k-of-0000n.safetensors` with
    `model.safetensors.index.json` above `max_shard_size`; config.json and the tokenizer files. Streams: each
    tensor is read from its stored layer slice and written straight into its shard file. `dtype` None keeps the
    stored dtype. Returns the shard file names.
    """
    import tensorstore as ts

    if is_url(dst):
        raise BloomJaxError(f"export writes a local directory, not {dst}")
    if not is_converted(src):
        raise BloomJaxError(
            f"no converted checkpoint at {src} (expected {PARAMS_DIR}/_METADATA; see bloom-jax convert)")
    limit = parse_size(max_shard_size)
    config = _read_config(src)
    root = _kvstore_url(_location_str(src)) + PARAMS_DIR + "/"
    stored: dict[tuple[str, ...], Any] = {}

    def array(path: tuple[str, ...]):
        if path not in stored:
            try:
                stored[path] = ts.open({"driver": "zarr", "kvstore": root + ".".join(path) + "/"}, open=True).result()
            except Exception as e:
                name = ".".join(path)
                raise BloomJaxError(f"cannot read parameter {name} of {src}: {hf.one_line(e)}") from None
        return stored[path]

    stored_dtype = array(("word_embeddings", "embedding")).dtype.numpy_dtype
    out_dtype = np.dtype(parse_dtype(dtype) if dtype is not None else stored_dtype)
    tensors, targets = [], {}  # (name, hf shape); name -> target
    for name in hf.hf_names(config):
        target = hf.target_of(name, config)
        shape = tuple(array(target.path).shape)
        param_shape = shape[1:] if target.layer is not None else shape
        tensors.append((hf.PREFIX + name, hf.hf_shape(target.mapping, param_shape)))
        targets[hf.PREFIX + name] = target

    def read(name: str) -> np.ndarray:
        target = targets[name]
        stored_array = array(target.path)
        value = (stored_array if target.layer is None else stored_array[target.layer]).read().result()
        return hf.from_param(value, target.mapping)

    total = sum(math.prod(shape) for _, shape in tensors) * out_dtype.itemsize
    with _Destination(dst, overwrite) as out:
        with _progress(total, "exporting", progress) as bar:
            file_names = hf.write_safetensors(Path(out.root), tensors, out_dtype, limit, read, bar.update)
        out.write_bytes("config.json", _config_json(config, out_dtype))
        for name in TOKENIZER_FILES:
            data = _read_bytes(src, name)
            if data is not None:
                out.write_bytes(name, data)
    return file_names


def _join(root: str, key: str) -> str:
    return root.rstrip("/") + "/" + key


def restore_params(location: str | os.PathLike, model: BloomForCausalLM, mesh: jax.sharding.Mesh | None = None,
                   rules: str | Sequence = "fsdp_tensor") -> dict:
    """A converted checkpoint's parameters, cast to `model.param_dtype`, each array read into its shards.

    Without a mesh every array lands on the first device; with one, each device reads only its shard, as the
    sharding rules (a preset name of `configs/sharding/` or rules) place it. The stored layout is scanned; an
    unrolled model gets it unstacked after the restore.
    """
    import orbax.checkpoint as ocp

    stored = make_model(model.config, dtype=model.dtype, param_dtype=model.param_dtype, scan_layers=True)
    shapes = nn.unbox(abstract_params(stored))
    shardings = _placement(stored, mesh, rules)
    target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(_join(_location_str(location), PARAMS_DIR), target)
    except Exception as e:
        raise BloomJaxError(f"cannot restore {location}: {hf.one_line(e)}") from None
    return params if model.scan_layers else unstack_layers(params)


def _location_str(location: str | os.PathLike) -> str:
    """What Orbax takes: a local path (also for `file://` URLs) or a cloud URL such as `gs://`."""
    text = str(location)
    if text.startswith("file://"):
        return text[len("file://"):]
    return text if is_url(text) else str(Path(text).resolve())


def from_pretrained(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None,
                    param_dtype: Any = None, rules: str | Sequence = "fsdp_tensor",
                    **model_kwargs) -> tuple[BloomForCausalLM, dict]:
    """`(model, params)` from a converted checkpoint, a Hugging Face BLOOM directory or a hub id.

    Args:
      path: a converted checkpoint (`bloom-jax convert`; a directory or a URL such as `gs://...`), a directory
        with `config.json` and weights in any Hugging Face layout, or a hub id.
      mesh: devices to shard the parameters over (`bloom_jax.sharding.make_mesh`); None: the first device.
      dtype: compute dtype ("float32" when None, "bfloat16", "float16").
      param_dtype: storage dtype of the parameters, cast on load; defaults to `dtype`.
      rules: sharding rules with a mesh: a preset of `configs/sharding/` or (logical, mesh axes) pairs.
      **model_kwargs: other `BloomForCausalLM` attributes (`scan_layers`, `remat_policy`).

    Returns:
      The model and its parameters, a pytree of jax arrays.
    """
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) if param_dtype is not None else dtype
    if is_converted(path):
        config = _read_config(path)
        model = make_model(config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
        return model, restore_params(path, model, mesh, rules)
    if is_url(path):
        raise BloomJaxError(f"no converted checkpoint at {path} (expected {PARAMS_DIR}/_METADATA)")
    directory = resolve_model_dir(path)
    config = BloomConfig.from_json(directory / "config.json")
    model = make_model(config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
    params = load_hf_params(directory, model)
    return model, jax.device_put(params, _placement(model, mesh, rules))


def read_tokenizer(path: str | os.PathLike):
    """The `bloom_jax.tokenizer.Tokenizer` of the tokenizer.json beside a checkpoint (converted, a Hugging Face
    directory, a hub id or a URL); None if there is none."""
    from bloom_jax.tokenizer import Tokenizer

    location = path if is_converted(path) or is_url(path) else resolve_model_dir(path)
    data = _read_bytes(location, "tokenizer.json")
    return None if data is None else Tokenizer.from_json(data, f"{location}/tokenizer.json")


def _placement(model: BloomForCausalLM, mesh: jax.sharding.Mesh | None, rules: str | Sequence) -> Any:
    """Where each parameter goes: the first device, or its shards on `mesh` under `rules`."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nn.unbox(abstract_params(model)))
    from bloom_jax import sharding

    return sharding.param_shardings(model, mesh, sharding.load_rules(rules) if isinstance(rules, str) else rules)
