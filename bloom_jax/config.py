"""BLOOM hyper-parameters: Hugging Face `config.json` in and out, validation, named presets.

The field names are those of transformers' `BloomConfig`; the aliases it accepts (`n_embed`,
`num_attention_heads`, `num_hidden_layers`) are read too. Keys this package does not use are kept in `extra` and
written back, so a round trip through `BloomConfig` loses nothing a Hugging Face loader needs.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bloom_jax.errors import BloomJaxError

# The floating-point types parameters and activations may have, by name.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

# Hugging Face alias -> canonical field.
_ALIASES = {"n_embed": "hidden_size", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Architecture of a BLOOM model (what `config.json` holds).

    Attributes:
      vocab_size: V, rows of the (tied) embedding.
      hidden_size: h.
      n_layer: number of transformer blocks.
      n_head: H; the head size is h / H.
      layer_norm_epsilon: epsilon of every LayerNorm.
      initializer_range: std of the normal init of embeddings and linear kernels.
      apply_residual_connection_post_layernorm: the residual is the LayerNorm output instead of its input.
      hidden_dropout: dropout on each branch output, before the residual add.
      attention_dropout: dropout on attention probabilities.
      pretraining_tp: tensor-parallel degree of the Megatron training run (used with `slow_but_exact`).
      slow_but_exact: compute `self_attention.dense` and `mlp.dense_4h_to_h` as `pretraining_tp` partial sums
        (without bias), as transformers does.
      seq_length: the training sequence length, if known (ALiBi itself has no length limit).
      bos_token_id, eos_token_id, pad_token_id, unk_token_id: special tokens.
      tie_word_embeddings: must be True: BLOOM's head is the transposed embedding.
      extra: every other key of `config.json`, written back unchanged.
    """

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pretraining_tp: int = 1
    slow_but_exact: bool = False
    seq_length: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 3
    unk_token_id: int | None = 0
    tie_word_embeddings: bool = True
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def mlp_dim(self) -> int:
        return 4 * self.hidden_size

    @property
    def num_params(self) -> int:
        """Published formula V*h + L*(12h^2 + 13h) + 4h (tied head)."""
        h = self.hidden_size
        return self.vocab_size * h + self.n_layer * (12 * h * h + 13 * h) + 4 * h

    # -- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "pretraining_tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BloomJaxError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise BloomJaxError(
                f"config: hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise BloomJaxError(f"config: {name} must be in [0, 1), got {value!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise BloomJaxError(f"config: layer_norm_epsilon must be a positive number, got {eps!r}")
        if self.seq_length is not None and (not isinstance(self.seq_length, int) or self.seq_length < 1):
            raise BloomJaxError(f"config: seq_length must be a positive integer or null, got {self.seq_length!r}")
        if self.pretraining_tp > self.hidden_size:
            raise BloomJaxError(
                f"config: pretraining_tp ({self.pretraining_tp}) exceeds hidden_size ({self.hidden_size})"
            )
        for name in ("apply_residual_connection_post_layernorm", "slow_but_exact", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise BloomJaxError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if not self.tie_word_embeddings:
            raise BloomJaxError("config: tie_word_embeddings=false is not BLOOM (its head is the tied embedding)")

    # -- Hugging Face config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BloomConfig:
        """Builds a config from a `config.json` dictionary, resolving aliases and keeping unknown keys."""
        data = dict(data)
        model_type = data.get("model_type", "bloom")
        if model_type != "bloom":
            raise BloomJaxError(f"config: model_type is {model_type!r}, not 'bloom'")
        for alias, canonical in _ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                if canonical in data and data[canonical] != value:
                    raise BloomJaxError(
                        f"config: {alias}={value!r} disagrees with {canonical}={data[canonical]!r}"
                    )
                data[canonical] = value
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dictionary: canonical names plus every kept unknown key."""
        out = dict(self.extra)
        for field in dataclasses.fields(self):
            if field.name != "extra":
                value = getattr(self, field.name)
                out[field.name] = list(value) if isinstance(value, tuple) else value
        out["model_type"] = "bloom"
        out.setdefault("architectures", ["BloomForCausalLM"])
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BloomConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise BloomJaxError(f"config: no such file: {path}") from None
        except OSError as e:
            raise BloomJaxError(f"config: cannot read {path}: {e.strerror}") from None
        return cls.from_json_text(text, str(path))

    @classmethod
    def from_json_text(cls, text: str, where: str) -> BloomConfig:
        """A config from the text of a `config.json`; `where` names it in errors."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BloomJaxError(f"config: {where} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise BloomJaxError(f"config: {where} does not hold a JSON object")
        return cls.from_dict(data)

    def to_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes) -> BloomConfig:
        return dataclasses.replace(self, **changes)


def parse_dtype(dtype: Any) -> np.dtype:
    """`"float32"`, `"bfloat16"`, `"float16"` or such a dtype itself (None: float32); anything else is an error."""
    if dtype is None:
        return DTYPES["float32"]
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise BloomJaxError(f"unsupported dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


# -- presets -------------------------------------------------------------------------------------------------------
def configs_dir() -> Path:
    """The shipped `configs/` directory (model presets, sharding rules)."""
    try:
        return Path(str(importlib.resources.files("bloom_jax.configs")))
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parent.parent / "configs"


def _presets_dir() -> Path:
    return configs_dir() / "models"


def preset_names() -> list[str]:
    """Names of the shipped presets: the released sizes and tiny test sizes."""
    return sorted(p.stem for p in _presets_dir().glob("*.json"))


def load_config(name_or_path: str | os.PathLike) -> BloomConfig:
    """A preset name (`bloom-560m`), a model directory holding `config.json`, or a JSON file."""
    path = Path(name_or_path)
    if path.exists():
        return BloomConfig.from_json(path)
    preset = _presets_dir() / f"{name_or_path}.json"
    if preset.is_file():
        return BloomConfig.from_json(preset)
    raise BloomJaxError(
        f"no preset or path named {str(name_or_path)!r} (presets: {', '.join(preset_names())})"
    )
