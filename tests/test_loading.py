"""Every Hugging Face checkpoint layout loads with parity-bar logits; every broken checkpoint is a clear error."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bloom_jax import BloomJaxError
from bloom_jax.checkpoint import from_pretrained
from reference import assert_parity, hf_logits, jax_logits

PREFIX = "transformer."
HEAD = "lm_head.weight"


def state_dict(torch_model, prefix: bool = True, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors (own storage each), named with or without `transformer.`, with or without the head."""
    tensors = {name: t.detach().clone().contiguous() for name, t in torch_model.state_dict().items()
               if name.startswith(PREFIX) or (lm_head and name == HEAD)}
    return tensors if prefix else {name.removeprefix(PREFIX): t for name, t in tensors.items()}


def save_config(torch_model, directory: Path) -> None:
    torch_model.config.save_pretrained(directory)


def write_bin_shards(tensors: dict[str, torch.Tensor], directory: Path, name_format: str, index: bool) -> None:
    """Two `torch.save` shards named `name_format.format(k)`, with `pytorch_model.bin.index.json` if `index`."""
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file_name = name_format.format(k)
        torch.save({name: tensors[name] for name in part}, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    if index:
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_safetensors(torch_model, d: Path) -> None:
    torch_model.save_pretrained(d)


def write_safetensors_sharded(torch_model, d: Path) -> None:
    torch_model.save_pretrained(d, max_shard_size="100KB")


def write_safetensors_file(torch_model, d: Path, prefix: bool = True, lm_head: bool = False) -> None:
    save_config(torch_model, d)
    save_file(state_dict(torch_model, prefix, lm_head), d / "model.safetensors")


def write_bin(torch_model, d: Path, legacy: bool = False) -> None:
    # transformers 5 always writes safetensors (`safe_serialization=False` is ignored): torch.save it ourselves,
    # the raw state dict as old transformers did (`lm_head.weight` sharing its storage with the embedding).
    save_config(torch_model, d)
    torch.save(torch_model.state_dict(), d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)


def write_bin_sharded(torch_model, d: Path) -> None:
    save_config(torch_model, d)
    write_bin_shards(state_dict(torch_model), d, "pytorch_model-{:05d}-of-00002.bin", index=True)


def write_bin_bigscience(torch_model, d: Path) -> None:
    """BigScience's hub layout: BloomModel names (no prefix), underscore shard names, no index."""
    save_config(torch_model, d)
    write_bin_shards(state_dict(torch_model, prefix=False), d, "pytorch_model_{:05d}-of-00002.bin", index=False)


def write_bloom_model(torch_model, d: Path) -> None:
    torch_model.transformer.save_pretrained(d)  # BloomModel: no prefix, no head


@dataclasses.dataclass(frozen=True)
class Layout:
    write: Callable
    files: str  # every weight file's name matches this regex
    min_files: int
    prefixed: bool  # tensor names carry `transformer.`
    lm_head: bool  # `lm_head.weight` is stored


LAYOUTS = {
    "safetensors": Layout(write_safetensors, r"model\.safetensors", 1, True, False),
    "safetensors_sharded": Layout(write_safetensors_sharded, r"model-\d{5}-of-\d{5}\.safetensors", 2, True, False),
    "bin": Layout(write_bin, r"pytorch_model\.bin", 1, True, True),
    "bin_legacy_format": Layout(functools.partial(write_bin, legacy=True), r"pytorch_model\.bin", 1, True, True),
    "bin_sharded_index": Layout(write_bin_sharded, r"pytorch_model-0000[12]-of-00002\.bin", 2, True, False),
    "bin_bigscience": Layout(write_bin_bigscience, r"pytorch_model_0000[12]-of-00002\.bin", 2, False, False),
    "bloom_model_no_prefix": Layout(write_bloom_model, r"model\.safetensors", 1, False, False),
    "with_lm_head": Layout(functools.partial(write_safetensors_file, lm_head=True), r"model\.safetensors", 1,
                           True, True),
    "no_prefix_with_lm_head": Layout(functools.partial(write_safetensors_file, prefix=False, lm_head=True),
                                     r"model\.safetensors", 1, False, True),
}


def stored_names(directory: Path) -> tuple[list[str], set[str]]:
    """(weight file names, tensor names over all of them)."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    names = set()
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                names.update(f.keys())
        else:
            names.update(torch.load(path, weights_only=True))
    return [p.name for p in files], names


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_with_parity(tiny, tmp_path, layout):
    spec = LAYOUTS[layout]
    spec.write(tiny.checkpoint.torch_model, tmp_path)
    # The directory holds what the layout says, so its parity proves the loader reads that layout.
    files, names = stored_names(tmp_path)
    assert len(files) >= spec.min_files and all(re.fullmatch(spec.files, f) for f in files), files
    assert (HEAD in names) == spec.lm_head
    assert {name.startswith(PREFIX) for name in names - {HEAD}} == {spec.prefixed}
    model, params = from_pretrained(tmp_path)
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), tiny.ref, tiny.mask)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_checkpoint(tiny, tmp_path, layout, storage):
    """Hub checkpoints are stored in fp16 (bloom-560m ... 7b1) or bf16 (bloom): they load exactly, as float32."""
    stored = copy.deepcopy(tiny.checkpoint.torch_model).to(storage)
    LAYOUTS[layout].write(stored, tmp_path)
    model, params = from_pretrained(tmp_path)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    upcast = stored.float()  # the same rounded weights, computed in fp32 by PyTorch
    assert_parity(jax_logits(model, params, tiny.ids, tiny.mask), hf_logits(upcast, tiny.ids, tiny.mask), tiny.mask)


# -- broken checkpoints ---------------------------------------------------------------------------------------------
def rewrite_safetensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        change(tensors)
        save_file(tensors, d / "model.safetensors")

    return damage


def without_tensor(name: str) -> Callable[[Path], None]:
    return rewrite_safetensors(lambda tensors: tensors.pop(PREFIX + name))


def with_tensor(name: str, size: int) -> Callable[[Path], None]:
    return rewrite_safetensors(lambda tensors: tensors.update({PREFIX + name: torch.ones(size)}))


def config_says(**changes) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        path = d / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return damage


def truncate(file_name: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        data = (d / file_name).read_bytes()
        (d / file_name).write_bytes(data[: len(data) // 2])

    return damage


def delete_second_shard(d: Path) -> None:
    sorted(d.glob("model-*.safetensors"))[1].unlink()


T = re.escape(PREFIX)  # tensor names in messages are as stored, with the prefix
# name: (writer of a good checkpoint, damage done to it, regexes the error message must all match, "{dir}" standing
# for the checkpoint directory). They ask for names (tensor, file, path) and key words, not for exact wording.
BROKEN: dict[str, tuple[Callable, Callable, list[str]]] = {
    "missing_tensor": (
        write_safetensors, without_tensor("h.1.mlp.dense_4h_to_h.bias"),
        [r"missing", r"h\.1\.mlp\.dense_4h_to_h\.bias"]),
    "unexpected_tensor": (
        write_safetensors, with_tensor("h.0.self_attention.rotary", 4),
        [r"unexpected", rf"{T}h\.0\.self_attention\.rotary\b", r"model\.safetensors"]),
    "extra_layer": (
        write_safetensors, with_tensor("h.2.input_layernorm.weight", 64),  # a third layer in a 2-layer model
        [r"unexpected", rf"{T}h\.2\.input_layernorm\.weight", r"model\.safetensors"]),
    "wrong_vocab": (
        write_safetensors, config_says(vocab_size=600),
        [rf"{T}word_embeddings\.weight", r"model\.safetensors", r"512, 64", r"600, 64"]),
    "wrong_hidden_size": (
        write_safetensors, config_says(hidden_size=32),
        [rf"{T}(h\.\d+\.)?[\w.]+\.(weight|bias)", r"model\.safetensors", r"shape"]),
    "missing_shard": (
        write_safetensors_sharded, delete_second_shard,
        [r"model-00002-of-\d{5}\.safetensors", r"model\.safetensors\.index\.json"]),
    "truncated_safetensors": (write_safetensors, truncate("model.safetensors"), [r"model\.safetensors"]),
    "truncated_bin": (write_bin, truncate("pytorch_model.bin"), [r"pytorch_model\.bin"]),
    "no_checkpoint": (save_config, lambda d: None, [r"no checkpoint", "{dir}"]),
    "no_config": (write_safetensors, lambda d: (d / "config.json").unlink(), [r"config\.json"]),
    "nonexistent_path": (write_safetensors, shutil.rmtree, [r"no such directory", "{dir}"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_is_a_clear_error(tiny, tmp_path, case):
    write, damage, patterns = BROKEN[case]
    d = tmp_path / "model"
    d.mkdir()
    write(tiny.checkpoint.torch_model, d)
    damage(d)
    with pytest.raises(BloomJaxError) as raised:
        from_pretrained(d)
    message = str(raised.value)
    for pattern in patterns:
        assert re.search(pattern.replace("{dir}", re.escape(str(d))), message), (pattern, message)


@pytest.mark.parametrize("argument", ["dtype", "param_dtype"])
@pytest.mark.parametrize("name", ["int8", "float64", "fp16"])
def test_unsupported_dtype(tiny, argument, name):
    with pytest.raises(BloomJaxError, match=rf"unsupported dtype.*{name}"):
        from_pretrained(tiny.checkpoint.directory, **{argument: name})


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip_format", "legacy_format"])
def test_malicious_pickle_does_not_run(tiny, tmp_path, legacy):
    d, marker = tmp_path / "model", tmp_path / "MARKER"
    d.mkdir()
    save_config(tiny.checkpoint.torch_model, d)
    tensors = {**state_dict(tiny.checkpoint.torch_model), "payload": Payload(marker)}
    torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(BloomJaxError, match=r"pytorch_model\.bin"):
        from_pretrained(d)
    assert not marker.exists()
    # The payload is live: an unsafe load does run it (so the check above is not vacuous).
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
