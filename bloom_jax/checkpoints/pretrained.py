"""Loading any BLOOM checkpoint: converted (a directory or URL), a Hugging Face directory, or a hub id."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax

from bloom_jax.checkpoints.converted import is_converted, read_config, restore_params
from bloom_jax.checkpoints.hf import load_hf_params
from bloom_jax.checkpoints.hub import resolve_model_dir
from bloom_jax.config import BloomConfig, parse_dtype
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, make_model
from bloom_jax.sharding import ShardingPlan
from bloom_jax.storage import join, read_bytes


def from_pretrained(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None,
                    param_dtype: Any = None, rules: str | Sequence = "fsdp_tensor",
                    **model_kwargs) -> tuple[BloomForCausalLM, dict]:
    """`(model, params)` from a converted checkpoint, a Hugging Face BLOOM directory or a hub id.

    Args:
      path: a converted checkpoint (`bloom-jax convert`, `save_pretrained`; a directory or a URL such as
        `gs://...`), a directory with `config.json` and weights in any Hugging Face layout (local, or in a
        bucket: fetched into a local mirror first), or a hub id.
      mesh: devices to shard the parameters over (`bloom_jax.sharding.make_mesh`); None: the first device.
      dtype: compute dtype ("float32" when None, "bfloat16", "float16").
      param_dtype: storage dtype of the parameters, cast on load; defaults to `dtype`.
      rules: sharding rules with a mesh: a preset of `configs/sharding/` or (logical, mesh axes) pairs.
      **model_kwargs: other `BloomForCausalLM` attributes (`scan_layers`, `remat_policy`) and `make_model`'s
        `kernels` and `attention`.

    Returns:
      The model and its parameters, a pytree of jax arrays.
    """
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) if param_dtype is not None else dtype
    sharding = ShardingPlan.create(mesh, rules) if mesh is not None else None
    location = checkpoint_location(path)  # a hub id resolved once
    converted = is_converted(location)
    model = make_model(read_model_config(location, converted), dtype=dtype, param_dtype=param_dtype,
                       **model_kwargs)
    if converted:
        return model, restore_params(location, model, sharding)
    params = load_hf_params(location, model)
    if sharding is None:
        return model, jax.device_put(params, jax.devices()[0])
    return model, jax.device_put(params, sharding.param_shardings(model))


def read_model_config(path: str | os.PathLike, converted: bool | None = None) -> BloomConfig:
    """The `config.json` of a converted checkpoint, a Hugging Face directory or a hub id (`converted`: whether
    it is known to be a converted checkpoint; None: look)."""
    if is_converted(path) if converted is None else converted:
        return read_config(path)
    return BloomConfig.from_json(resolve_model_dir(path) / "config.json")


def read_tokenizer(path: str | os.PathLike):
    """The `bloom_jax.tokenizer.Tokenizer` of the tokenizer.json beside a checkpoint (converted, a Hugging Face
    directory, a hub id or a URL); None if there is none."""
    from bloom_jax.tokenizer import Tokenizer

    data = read_side_file(path, "tokenizer.json")
    return None if data is None else Tokenizer.from_json(data, f"{path}/tokenizer.json")


def read_generation_config(path: str | os.PathLike) -> dict | None:
    """The `generation_config.json` beside a checkpoint as a dict (transformers' names: `eos_token_id`,
    `pad_token_id`, `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`, `max_new_tokens`);
    None if there is none."""
    data = read_side_file(path, "generation_config.json")
    if data is None:
        return None
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BloomJaxError(f"{path}/generation_config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise BloomJaxError(f"{path}/generation_config.json does not hold a JSON object")
    return config


def checkpoint_location(path: str | os.PathLike) -> str | os.PathLike:
    """Where a checkpoint's files are: a converted checkpoint itself (a directory or URL), a Hugging Face
    directory, a hub id's directory in huggingface_hub's cache, or a bucket directory's local mirror (either
    fetched if need be). Resolve a hub id once with this and pass the
    result on: each resolution of a hub id online asks the hub."""
    return path if is_converted(path) else resolve_model_dir(path)


def read_side_file(path: str | os.PathLike, name: str) -> bytes | None:
    """A file beside a checkpoint's weights (`tokenizer_config.json`, ...), None if there is none."""
    return read_bytes(join(checkpoint_location(path), name))
