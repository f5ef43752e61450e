"""transformers' PyTorch BLOOM as the reference: random models saved with `save_pretrained`, their logits, and
the comparison of ours against them."""

from __future__ import annotations

import functools
import math
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


def hf_model(config: BloomConfig, seed: int = 0, dtype: str = "float32"):
    """transformers' `BloomForCausalLM` with every tensor randomised away from its init.

    LayerNorm scales around 1 and biases around 0 with spread 0.3, so that a wrong LayerNorm or bias shows;
    linear weights with std 1/sqrt(fan_in) and embeddings with std 0.5, so logits have magnitude ~5 and are far
    from zero (a parity ratio against a near-zero max logit would prove nothing).
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
                p.copy_(noise / math.sqrt(p.shape[1]))
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
