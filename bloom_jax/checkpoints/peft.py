"""LoRA adapters in peft's format: `adapter_config.json` and `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(BloomForCausalLM.from_pretrained(base), directory)` loads, and which peft writes.

peft names BLOOM's adapter tensors `base_model.model.transformer.h.{i}.{self_attention|mlp}.{layer}.lora_A.weight`
([r, in]) and `...lora_B.weight` ([out, r]); ours are `lora_a` [*in, r] and `lora_b` [r, *out] beside each kernel
(`bloom_jax.lora`), in the scanned (stacked under `h`) or unrolled (`h_{i}`) layout. What peft can express and
these adapters cannot (DoRA, per-layer ranks, adapters on some layers only, extra trained modules) is refused
with its name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bloom_jax import storage
from bloom_jax.checkpoints.hf import get_path, target_of
from bloom_jax.checkpoints.hf_files import SafetensorsFile, safetensors_bytes
from bloom_jax.checkpoints.hub import resolve_model_dir
from bloom_jax.checkpoints.storage import Destination
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.lora import TARGETS, LoraConfig
from bloom_jax.storage import Location

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.transformer."
_PARENT = {"query_key_value": "self_attention", "dense": "self_attention", "dense_h_to_4h": "mlp",
           "dense_4h_to_h": "mlp"}
_TENSOR_RE = re.compile(r"^h\.(\d+)\.(self_attention|mlp)\.(\w+)\.lora_([AB])\.weight$")


def peft_tensor_name(layer: int, target: str, which: str) -> str:
    """peft's name of one layer's `lora_A` or `lora_B` (`which`) weight."""
    return f"{PREFIX}h.{layer}.{_PARENT[target]}.{target}.lora_{which}.weight"


def _module_path(layer: int, target: str, config: BloomConfig, scan_layers: bool) -> tuple[tuple[str, ...], int | None]:
    """(path of the targeted Linear in our tree, layer index into stacked arrays or None)."""
    where = target_of(f"h.{layer}.{_PARENT[target]}.{target}.weight", config, scan_layers)
    return where.path[:-1], where.layer


def adapter_config_json(lora: LoraConfig, base_model_name_or_path: str | None) -> dict:
    """peft's LoRA config for these adapters (the fields peft reads; the rest take its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
        "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True, "revision": None,
        "auto_mapping": {"base_model_class": "BloomForCausalLM",
                         "parent_library": "transformers.models.bloom.modeling_bloom"},
    }


def save_adapter(adapters: dict, lora: LoraConfig, config: BloomConfig, dst: Location, *,
                 base_model_name_or_path: str | None = None, overwrite: bool = False) -> None:
    """Writes `adapters` (the `lora_a`/`lora_b` tree, either layout, host-readable arrays) at `dst` in peft's
    format, float32, naming the base checkpoint. Staged and renamed into place: never a half-written adapter."""
    scan_layers = "h" in adapters
    tensors: dict[str, np.ndarray] = {}
    for layer in range(config.n_layer):
        for target in lora.targets:
            path, index = _module_path(layer, target, config, scan_layers)
            module = get_path(adapters, path)
            a, b = (np.asarray(module[leaf], np.float32) for leaf in ("lora_a", "lora_b"))
            if index is not None:
                a, b = a[index], b[index]
            tensors[peft_tensor_name(layer, target, "A")] = a.reshape(-1, lora.rank).T
            tensors[peft_tensor_name(layer, target, "B")] = b.reshape(lora.rank, -1).T
    config_bytes = (json.dumps(adapter_config_json(lora, base_model_name_or_path), indent=2) + "\n").encode()
    with Destination(dst, overwrite) as out:
        out.write_bytes(WEIGHTS_FILE, safetensors_bytes(tensors))
        out.write_bytes(CONFIG_FILE, config_bytes)


@contextlib.contextmanager
def _adapter_directory(location: Location) -> Iterator[Path]:
    """The local directory of an adapter: a directory, a hub id's (huggingface_hub's cache), or, for a URL, a
    temporary one its files (small) are fetched into."""
    if not storage.is_remote(location):
        yield resolve_model_dir(location)
        return
    with tempfile.TemporaryDirectory(prefix="bloom-jax-adapter-") as directory:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            data = storage.read_bytes(storage.join(location, name))
            if data is not None:
                (Path(directory) / name).write_bytes(data)
        yield Path(directory)


def read_adapter_config(location: Location) -> dict:
    """The adapter's `adapter_config.json` (a directory, a hub id or a URL)."""
    with _adapter_directory(location) as directory:
        return _read_adapter_config(directory, location)


def _read_adapter_config(directory: Path, location: Location) -> dict:
    path = directory / CONFIG_FILE
    source = storage.join(location, CONFIG_FILE)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BloomJaxError(f"{location} is not a LoRA adapter: no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BloomJaxError(f"cannot read {source}: {e}") from None
    if not isinstance(data, dict):
        raise BloomJaxError(f"{source} is not a JSON object")
    return data


def lora_config_of(data: dict, source: str) -> LoraConfig:
    """Our `LoraConfig` of a peft config, or a one-line error naming what it cannot express."""
    if data.get("peft_type", "LORA") != "LORA":
        raise BloomJaxError(f"{source}: peft_type {data.get('peft_type')!r} is not LORA")
    refused = [(key, data.get(key)) for key in ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora")
               if data.get(key)]
    refused += [(key, data.get(key)) for key in ("rank_pattern", "alpha_pattern", "modules_to_save",
                                                  "layers_to_transform", "trainable_token_indices")
                if data.get(key) not in (None, {}, [])]
    if data.get("bias", "none") != "none":
        refused.append(("bias", data["bias"]))
    if refused:
        key, value = refused[0]
        raise BloomJaxError(f"{source}: {key}={value!r} is not supported (plain LoRA on whole layers only)")
    try:
        return LoraConfig(rank=int(data["r"]), alpha=float(data.get("lora_alpha", 8)),
                          dropout=float(data.get("lora_dropout", 0.0) or 0.0),
                          use_rslora=bool(data.get("use_rslora", False)))
    except KeyError:
        raise BloomJaxError(f"{source}: no rank (r)") from None
    except (TypeError, ValueError) as e:
        raise BloomJaxError(f"{source}: {e}") from None


def load_adapter(location: Location, config: BloomConfig, scan_layers: bool = True
                 ) -> tuple[LoraConfig, dict, str | None]:
    """(its `LoraConfig`, the adapters as float32 numpy arrays in the `scan_layers` layout, the base it names) of
    a peft LoRA adapter: a directory, a hub id or a URL. The tensors present say which layers are targeted; each
    must be on every layer, with the shapes `config` implies."""
    with _adapter_directory(location) as directory:
        data = _read_adapter_config(directory, location)
        lora = lora_config_of(data, str(location))
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            where = directory if not storage.is_remote(location) else location
            if storage.is_file(storage.join(where, "adapter_model.bin")):
                raise BloomJaxError(f"{location} holds adapter_model.bin, a pickle, which is not read (code could "
                                    "run from it): save it with safetensors (peft's default)")
            raise BloomJaxError(f"{location} has no {WEIGHTS_FILE}")
        return _read_adapter(SafetensorsFile(weights), data, lora, config, scan_layers, location)


def _read_adapter(stored: SafetensorsFile, data: dict, lora: LoraConfig, config: BloomConfig, scan_layers: bool,
                  location: Location) -> tuple[LoraConfig, dict, str | None]:
    found: dict[tuple[int, str, str], str] = {}
    for name in stored.keys():
        stripped = name.removeprefix("base_model.model.").removeprefix("transformer.")
        match = _TENSOR_RE.match(stripped)
        if not match or match.group(3) not in TARGETS or _PARENT[match.group(3)] != match.group(2):
            raise BloomJaxError(f"{location}: unexpected tensor {name} (not a LoRA weight of a BLOOM layer)")
        layer = int(match.group(1))
        if layer >= config.n_layer:
            raise BloomJaxError(f"{location}: tensor {name} is for layer {layer} of a {config.n_layer}-layer model")
        found[(layer, match.group(3), match.group(4))] = name
    targets = tuple(t for t in TARGETS if any(key[1] == t for key in found))
    if not targets:
        raise BloomJaxError(f"{location}: {WEIGHTS_FILE} holds no LoRA weights")
    missing = [(layer, t, w) for layer in range(config.n_layer) for t in targets for w in "AB"
               if (layer, t, w) not in found]
    if missing:
        layer, target, which = missing[0]
        raise BloomJaxError(f"{location}: no {peft_tensor_name(layer, target, which)} (adapters on some layers "
                            "only are not supported)")
    lora = LoraConfig(lora.rank, lora.alpha, lora.dropout, targets, lora.use_rslora)
    return lora, _adapter_tree(stored, found, lora, config, scan_layers, str(location)), \
        data.get("base_model_name_or_path")


def _adapter_tree(stored: SafetensorsFile, found: dict, lora: LoraConfig, config: BloomConfig, scan_layers: bool,
                  source: str) -> dict:
    import flax.linen as nn

    from bloom_jax.model import abstract_params, make_model

    shapes = nn.unbox(abstract_params(make_model(config, scan_layers=scan_layers, lora=lora)))
    tree: dict[str, Any] = {}
    for layer in range(config.n_layer):
        for target in lora.targets:
            path, index = _module_path(layer, target, config, scan_layers)
            module_shapes, module = shapes, tree
            for key in path:
                module_shapes = module_shapes[key]
                module = module.setdefault(key, {})
            for leaf, which in (("lora_a", "A"), ("lora_b", "B")):
                shape = module_shapes[leaf].shape
                per_layer = shape[1:] if index is not None else shape
                name = found[(layer, target, which)]
                value = stored.get_tensor(name).astype(np.float32)
                # peft's [r, in] and [out, r]
                expected = (lora.rank, math.prod(per_layer[:-1])) if which == "A" else (math.prod(per_layer[1:]),
                                                                                         lora.rank)
                if value.shape != expected:
                    raise BloomJaxError(f"{source}: {name} has shape {list(value.shape)}, but r={lora.rank} and "
                                        f"the base's config imply {list(expected)}")
                value = value.T.reshape(per_layer)
                if index is None:
                    module[leaf] = value
                else:
                    module.setdefault(leaf, np.zeros(shape, np.float32))[index] = value
    return tree


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, dst: str | os.PathLike, *,
                  hugging_face: bool = False, dtype: Any = "float32", overwrite: bool = False) -> None:
    """Folds a LoRA adapter into its base (`bloom_jax.lora.fold`) and writes the result at `dst`: a converted
    checkpoint, or with `hugging_face` a Hugging Face directory; the base's tokenizer and generation settings
    carried. Computed in float32, stored in `dtype`."""
    import jax

    from bloom_jax.checkpoints.converted import TOKENIZER_FILES, save_pretrained
    from bloom_jax.checkpoints.pipelines import export
    from bloom_jax.checkpoints.pretrained import (
        checkpoint_location,
        from_pretrained,
        read_side_file,
        read_tokenizer,
    )
    from bloom_jax.config import parse_dtype
    from bloom_jax.lora import fold, merge_trees

    location = checkpoint_location(base)
    model, params = from_pretrained(location)
    lora, adapters, _ = load_adapter(adapter, model.config, model.scan_layers)
    merged = fold(merge_trees(jax.tree.map(np.asarray, params), adapters), lora)
    merged = jax.tree.map(lambda x: x.astype(parse_dtype(dtype)), merged)
    side = {name: read_side_file(location, name) for name in TOKENIZER_FILES if name != "tokenizer.json"}
    side = {name: data for name, data in side.items() if data is not None}
    if not hugging_face:
        save_pretrained(merged, model.config, dst, read_tokenizer(location), extra_files=side, overwrite=overwrite)
        return
    with tempfile.TemporaryDirectory(prefix="bloom-jax-merge-") as staging:
        save_pretrained(merged, model.config, Path(staging) / "merged", read_tokenizer(location), extra_files=side)
        export(Path(staging) / "merged", dst, overwrite=overwrite, progress=False)


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "adapter_config_json", "load_adapter",
           "merge_adapter", "peft_tensor_name", "read_adapter_config", "save_adapter"]
