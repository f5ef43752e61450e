"""transformers' PyTorch BLOOM as the reference: random models saved with `save_pretrained` or in any other Hugging
Face layout, broken checkpoints, their logits, and the comparison of ours against them."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from bloom_jax.config import BloomConfig

# The fp32 parity bar: max |ours - ref| <= PARITY_RTOL * max |ref| over real (non-pad) tokens.
PARITY_RTOL = 2e-5
# The standard batch: prompts of different lengths (one of them a single token), padded to the longest.
PROMPT_LENGTHS = [7, 4, 1]


def tiny_config(**overrides) -> BloomConfig:
    """A small BLOOM: vocab 512, hidden 64, 2 layers, 8 heads, unless overridden."""
    base = dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=8, pad_token_id=3)
    return BloomConfig(**{**base, **overrides})


def hf_model(config: BloomConfig, seed: int = 0, dtype: str = "float32", linear_gain: float = 1.0):
    """transformers' `BloomForCausalLM` with every tensor randomised away from its init.

    LayerNorm scales around 1 and biases around 0 with spread 0.3, so that a wrong LayerNorm or bias shows;
    linear weights with std linear_gain/sqrt(fan_in) and embeddings with std 0.5, so logits have magnitude ~5 and
    are far from zero (a parity ratio against a near-zero max logit would prove nothing). A larger `linear_gain`
    lets the blocks outweigh the tied embedding, so that greedy continuations do not repeat one token.
    """
    import torch
    import transformers

    hf_config = transformers.BloomConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.BloomForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("word_embeddings.weight"):
                p.copy_(0.5 * noise)
            elif "layernorm.weight" in name or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(linear_gain * noise / math.sqrt(p.shape[1]))
    return model.to(getattr(torch, dtype))


def save_hf(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits float32 [b, s, v]."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(input_ids, dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def hf_generate(model, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                eos_token_id: int = 2) -> np.ndarray:
    """transformers' greedy continuation int [b, max_new_tokens] of a left-padded batch, padded with the model's
    `pad_token_id` once a row has met `eos_token_id`."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id, eos_token_id=eos_token_id)
    return out.numpy()[:, input_ids.shape[1]:]


def random_ids(config: BloomConfig, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, config.vocab_size, size=(batch, seq), dtype=np.int32)


def padded(config: BloomConfig, lengths: list[int], side: str = "left",
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random prompts of the given lengths, padded on `side` with `pad_token_id`: (ids, mask)."""
    seq = max(lengths)
    ids = random_ids(config, len(lengths), seq, seed)
    mask = np.zeros_like(ids)
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    for row, n in enumerate(lengths):
        real = slice(seq - n, seq) if side == "left" else slice(0, n)
        mask[row, real] = 1
    ids = np.where(mask == 1, ids, config.pad_token_id).astype(np.int32)
    return ids, mask


def left_padded(config: BloomConfig, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random prompts of the given lengths, left-padded with `pad_token_id`: (ids, mask)."""
    return padded(config, lengths, "left", seed)


def relative_max_error(ours: np.ndarray, ref: np.ndarray, keep: np.ndarray | None = None) -> float:
    """max |ours - ref| / max |ref| over kept positions (keep: [b, s] bool, or all)."""
    if keep is not None:
        ours, ref = ours[keep.astype(bool)], ref[keep.astype(bool)]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def assert_parity(ours: np.ndarray, ref: np.ndarray, keep: np.ndarray | None = None, rtol: float = PARITY_RTOL):
    """The parity bar, on a reference whose logits are large enough for a relative bar to mean something."""
    kept = ref if keep is None else ref[keep.astype(bool)]
    assert np.max(np.abs(kept)) > 1.0, f"reference logits too small ({np.max(np.abs(kept)):.3g}) for a relative bar"
    error = relative_max_error(ours, ref, keep)
    assert error <= rtol, f"relative max error {error:.3g} exceeds {rtol:.3g}"


@functools.partial(jax.jit, static_argnums=0, static_argnames="deterministic")
def _apply(model, params, input_ids, attention_mask, rngs, deterministic):
    return model.apply({"params": params}, input_ids, attention_mask, deterministic=deterministic, rngs=rngs)


def jax_logits(model, params, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               deterministic: bool = True, rngs: dict | None = None) -> np.ndarray:
    """Our logits as numpy (jitted once per model, shapes and `deterministic`)."""
    return np.asarray(_apply(model, params, input_ids, attention_mask, rngs, deterministic=deterministic))


# -- Hugging Face checkpoint layouts ---------------------------------------------------------------------------------
PREFIX = "transformer."
HEAD = "lm_head.weight"


def state_dict(torch_model, prefix: bool = True, lm_head: bool = False) -> dict:
    """The model's tensors (own storage each), named with or without `transformer.`, with or without the head."""
    tensors = {name: t.detach().clone().contiguous() for name, t in torch_model.state_dict().items()
               if name.startswith(PREFIX) or (lm_head and name == HEAD)}
    return tensors if prefix else {name.removeprefix(PREFIX): t for name, t in tensors.items()}


def save_config(torch_model, directory: Path) -> None:
    torch_model.config.save_pretrained(directory)


def write_bin_shards(tensors: dict, directory: Path, name_format: str, index: bool) -> None:
    """Two `torch.save` shards named `name_format.format(k)`, with `pytorch_model.bin.index.json` if `index`."""
    import torch

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
    from safetensors.torch import save_file

    save_config(torch_model, d)
    save_file(state_dict(torch_model, prefix, lm_head), d / "model.safetensors")


def write_bin(torch_model, d: Path, legacy: bool = False) -> None:
    # transformers 5 always writes safetensors (`safe_serialization=False` is ignored): torch.save it ourselves,
    # the raw state dict as old transformers did (`lm_head.weight` sharing its storage with the embedding).
    import torch

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


def stored_tensors(directory: Path) -> dict:
    """Every tensor in a Hugging Face directory's weight files (`*.safetensors`, `*.bin`), by stored name."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")):
        tensors.update(load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True))
    return tensors


def stored_names(directory: Path) -> tuple[list[str], set[str]]:
    """(weight file names, tensor names over all of them)."""
    files = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    return files, set(stored_tensors(directory))


# -- broken checkpoints: each a `damage(directory)` applied to a good one -------------------------------------------
def rewrite_safetensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        change(tensors)
        save_file(tensors, d / "model.safetensors")

    return damage


def without_tensor(name: str) -> Callable[[Path], None]:
    return rewrite_safetensors(lambda tensors: tensors.pop(PREFIX + name))


def with_tensor(name: str, size: int) -> Callable[[Path], None]:
    import torch

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


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_malicious_bin(torch_model, d: Path, marker: Path, legacy: bool = False) -> None:
    """A complete `pytorch_model.bin` plus one extra entry whose unpickling would create `marker`."""
    import torch

    save_config(torch_model, d)
    tensors = {**state_dict(torch_model), "payload": Payload(marker)}
    torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
