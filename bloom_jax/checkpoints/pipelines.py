"""`convert` and `export`: streaming pipelines between the Hugging Face format and the converted one.

Both hold about one tensor at a time whatever the model's size, check everything they can before writing, and
show a checkpoint at the destination only when it is complete (see `storage.Destination`).
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

from bloom_jax.checkpoints.converted import (
    PARAMS_DIR,
    TOKENIZER_FILES,
    OrbaxParamsWriter,
    StoredParams,
    config_json,
    read_config,
)
from bloom_jax.checkpoints.hf import PREFIX, from_param, hf_names, hf_shape, plan_hf_tensors, target_of, to_param
from bloom_jax.checkpoints.hf_files import WeightFiles, write_safetensors
from bloom_jax.checkpoints.hub import resolve_model_dir
from bloom_jax.checkpoints.storage import Destination
from bloom_jax.config import BloomConfig, parse_dtype
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import abstract_params, make_model
from bloom_jax.storage import Location, join, read_bytes

# Source bytes the OS is asked to read ahead of the tensor being converted: enough to keep the disk busy while
# a tensor is converted, held in the page cache (not in the process's memory).
_READ_AHEAD_BYTES = 256 * 2**20


def _progress(total_bytes: int, what: str, enabled: bool):
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def convert(src: str | os.PathLike, dst: Location, dtype: Any = None, overwrite: bool = False,
            progress: bool = True) -> BloomConfig:
    """Converts a Hugging Face BLOOM checkpoint (directory or hub id) into a converted checkpoint at `dst` (a
    local directory or a URL such as `gs://bucket/path`).

    Streams: one source tensor is read, converted and written at a time. `dtype` (None: float32) is the stored
    parameter dtype. Every tensor is checked against config.json before anything is written; the output appears
    at `dst` only when complete.
    """
    param_dtype = parse_dtype(dtype)
    directory = resolve_model_dir(src)
    config = BloomConfig.from_json(directory / "config.json")
    model = make_model(config, param_dtype=param_dtype)
    files = WeightFiles(directory)
    shapes = nn.unbox(abstract_params(model))
    plan = plan_hf_tensors(files, model, shapes)
    np_dtype = np.dtype(param_dtype)
    needed = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) * np_dtype.itemsize

    with Destination(dst, overwrite, needed_bytes=needed) as out:
        writer = OrbaxParamsWriter(join(out.root, PARAMS_DIR))
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
                    value = to_param(files.read(tensor.name), tensor.target.mapping, tensor.param_shape, np_dtype)
                    pending.append((writer.write(tensor.target.path, value, tensor.target.layer), out_bytes))
                    del value  # the futures keep it alive until written
                    bar.update(tensor.nbytes)
                    bar.set_postfix_str(f"{count}/{len(plan)} tensors")
                while pending:
                    _wait(pending.popleft()[0])
        finally:
            for futures, _ in pending:  # never leave a write running on failure
                _wait(futures, raise_errors=False)
        out.write_bytes("config.json", config_json(config, np_dtype))
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                out.write_bytes(name, (directory / name).read_bytes())
        writer.finish()  # last: the metadata that makes the checkpoint restorable
    return config


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB` or a plain integer (GB = 10^9 bytes, as transformers counts)."""
    match = _SIZE.match(str(text))
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").lower()]) if match else 0
    if size < 1:
        raise BloomJaxError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    return size


def export(src: Location, dst: Location, dtype: Any = None, max_shard_size: str | int = "5GB",
           overwrite: bool = False, progress: bool = True) -> list[str]:
    """Writes a converted checkpoint (a directory or URL) as a Hugging Face directory that
    `BloomForCausalLM.from_pretrained` loads, at `dst` (a local directory or a URL such as `gs://bucket/path`).

    Safetensors with `transformer.`-prefixed names, split into `model-0000k-of-0000n.safetensors` with
    `model.safetensors.index.json` above `max_shard_size`; config.json and the tokenizer files. Streams: each
    tensor is read from its stored layer slice and written straight into its shard file. `dtype` None keeps the
    stored dtype. Returns the shard file names.
    """
    stored = StoredParams(src)
    limit = parse_size(max_shard_size)
    config = read_config(src)
    out_dtype = parse_dtype(dtype) if dtype is not None else stored.dtype(("word_embeddings", "embedding"))
    tensors, targets = [], {}  # (name, hf shape); name -> target
    for name in hf_names(config):
        target = target_of(name, config)
        shape = stored.shape(target.path)
        param_shape = shape[1:] if target.layer is not None else shape
        tensors.append((PREFIX + name, hf_shape(target.mapping, param_shape)))
        targets[PREFIX + name] = target

    def read(name: str) -> np.ndarray:
        target = targets[name]
        return from_param(stored.read(target.path, target.layer), target.mapping)

    total = sum(math.prod(shape) for _, shape in tensors) * out_dtype.itemsize
    with Destination(dst, overwrite, needed_bytes=total) as out:
        with _progress(total, "exporting", progress) as bar:
            file_names = write_safetensors(out.root, tensors, out_dtype, limit, read, bar.update)
        out.write_bytes("config.json", config_json(config, out_dtype))
        for name in TOKENIZER_FILES:
            data = read_bytes(join(src, name))
            if data is not None:
                out.write_bytes(name, data)
    return file_names


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
