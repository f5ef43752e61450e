"""Loading BLOOM parameters: `from_pretrained` for Hugging Face directories and hub ids."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax import hf
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, abstract_params, make_model

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
        raise BloomJaxError(f"cannot fetch {path} from the Hugging Face hub: {hf._one_line(e)}") from None
    return directory


def load_hf_params(directory: str | os.PathLike, model: BloomForCausalLM) -> dict:
    """The parameters of a Hugging Face checkpoint directory, as `model.param_dtype` numpy arrays."""
    files = hf.WeightFiles(directory)
    tensors = ((name, files.file_of[name].name, functools.partial(files.read, name))
               for name in files.ordered_names())
    return params_from_hf_tensors(tensors, model, str(files.directory))


def params_from_hf_tensors(tensors: Iterable[tuple[str, str, Callable[[], np.ndarray]]],
                           model: BloomForCausalLM, source: str = "the checkpoint") -> dict:
    """Our parameter pytree (numpy, `model.param_dtype`) from PyTorch-named tensors.

    Args:
      tensors: `(name, file name, read)` triples; `read()` returns the array, so one tensor at a time is held.
      model: gives the config and the parameter dtype.
      source: names the checkpoint in errors.

    Every tensor is accounted for: a missing, unexpected or wrongly shaped tensor is an error naming it and its
    file. `lm_head.weight`, when present, is the tied embedding and is not read.
    """
    config = model.config
    shapes = nn.unbox(abstract_params(model))
    np_dtype = np.dtype(model.param_dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), shapes)
    seen: dict[str, str] = {}
    for name, file_name, read in tensors:
        stripped = hf.strip_prefix(name)
        if stripped == hf.TIED_HEAD:
            continue
        target = hf.target_of(stripped, config, model.scan_layers)
        if target is None:
            raise BloomJaxError(f"unexpected tensor {name} in {file_name}: not part of a {config.n_layer}-layer BLOOM")
        if stripped in seen:
            raise BloomJaxError(f"tensor {stripped} appears twice ({seen[stripped]} and {name})")
        seen[stripped] = name
        dest = _get(params, target.path)
        param_shape = dest.shape[1:] if target.layer is not None else dest.shape
        array = read()
        expected = hf.hf_shape(target.mapping, param_shape)
        if tuple(array.shape) != expected:
            raise BloomJaxError(
                f"tensor {name} in {file_name} has shape {list(array.shape)}, but config.json implies {list(expected)}"
            )
        value = hf.to_param(array, target.mapping, param_shape).astype(np_dtype)
        if target.layer is None:
            dest[...] = value
        else:
            dest[target.layer] = value
    missing = [n for n in hf.hf_names(config) if n not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BloomJaxError(f"missing tensor {missing[0]}{more} in {source}")
    return params


def _get(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


def from_pretrained(path: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
                    **model_kwargs) -> tuple[BloomForCausalLM, dict]:
    """`(model, params)` from a Hugging Face BLOOM directory or hub id.

    Args:
      path: a directory with `config.json` and weights in any Hugging Face layout, or a hub id.
      dtype: compute dtype ("float32" when None, "bfloat16", "float16").
      param_dtype: storage dtype of the parameters; defaults to `dtype`.
      **model_kwargs: other `BloomForCausalLM` attributes (`scan_layers`, `remat_policy`).

    Returns:
      The model and its parameters, a pytree of jax arrays on the default device.
    """
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) if param_dtype is not None else dtype
    directory = resolve_model_dir(path)
    config = BloomConfig.from_json(directory / "config.json")
    model = make_model(config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
    params = load_hf_params(directory, model)
    return model, jax.tree.map(jnp.asarray, params)
