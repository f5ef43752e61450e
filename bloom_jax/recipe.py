"""Training recipes: every setting of a run, from a YAML file (`configs/train/`) plus `key=value` overrides,
typed and checked before anything starts. No JAX here: a bad recipe fails in a fraction of a second."""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bloom_jax import storage
from bloom_jax.config import configs_dir
from bloom_jax.errors import BloomJaxError
from bloom_jax.records import load_dataset_files

SCHEDULES = ("cosine", "linear", "constant")
# How a LoRA run stores its frozen base weights (`lora.base`): plain, or the linear layers quantized for QLoRA
# (bloom_jax.quantize; the rest in bfloat16).
LORA_BASES = ("float32", "bfloat16", "int8", "nf4")
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # = bloom_jax.lora.TARGETS
# What the training files hold (bloom_jax.sft): plain text, or instruction examples; auto: what their lines say.
SFT_FORMATS = ("prompt_completion", "chat")
DATA_FORMATS = ("auto", "text", *SFT_FORMATS)
TOO_LONG = ("truncate", "drop")  # an instruction example longer than seq_len + 1 tokens


def _setting(default: Any, help: str, key: str | None = None) -> Any:
    """A recipe key: its default and the one line `bloom-jax train --help` shows for it; `key` is its name in
    recipes when that is not the field's (`lora.rank` for `lora_rank`: a YAML mapping `lora:` holds them)."""
    metadata = {"help": help, "key": key}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _recipe_key(field: dataclasses.Field) -> str:
    return field.metadata["key"] or field.name


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run (`bloom-jax train RECIPE key=value ...`); each field's help is its documentation."""

    # Model.
    model: str = _setting("bloom-tiny", "preset or config.json to train from scratch")
    init_from: str | None = _setting(None, "checkpoint to fine-tune (converted: a directory or gs:// URL; Hugging "
                                           "Face dir; hub id)")
    compute_dtype: str = _setting("float32", "activations and matmuls: float32 or bfloat16")
    param_dtype: str = _setting("float32", "master weights and optimizer state: float32 or bfloat16")
    scan_layers: bool = _setting(True, "one compiled block under nn.scan (false: unrolled, faster on CPU)")
    remat_policy: str = _setting("none", "activation checkpointing: none, full, dots, dots_no_batch")
    dropout: bool = _setting(False, "apply the config's hidden and attention dropout")
    kernels: str = _setting("auto", "kernel set: auto (the platform's), xla_cpu or reference (bloom_jax.kernels)")
    attention: str = _setting("auto", "attention: auto (blockwise, the reference where one block holds it all), "
                                      "reference, blockwise, cudnn (NVIDIA GPUs), flash (TPUs, NVIDIA GPUs)")
    loss_chunk_tokens: int = _setting(1024, "tokens per device whose logits the loss makes at once")
    # LoRA (needs init_from): adapters trained, the base frozen.
    lora_rank: int = _setting(0, "LoRA rank r (0: full fine-tuning)", "lora.rank")
    lora_alpha: float = _setting(32.0, "LoRA alpha: the adapters' output is scaled by alpha / r", "lora.alpha")
    lora_dropout: float = _setting(0.0, "dropout on the adapters' input", "lora.dropout")
    lora_targets: list[str] = _setting(list(LORA_TARGETS), "layers given adapters: any of "
                                       + ", ".join(LORA_TARGETS), "lora.targets")
    lora_base: str = _setting("bfloat16", "storage of the frozen base weights: " + ", ".join(LORA_BASES),
                              "lora.base")
    # Data.
    train_data: list[str] = _setting([], "text files (a document each), JSONL, Parquet or Arrow files, saved "
                                         "Hugging Face datasets, directories or globs: paths or gs:// URLs")
    jsonl_field: str = _setting("text", "the field of a JSONL line (or a table's row) that holds its document")
    # A Hugging Face dataset (`datasets.load_dataset`), read beside train_data: offline from its cache with
    # HF_DATASETS_OFFLINE=1.
    dataset_path: str | None = _setting(None, "load_dataset's path: a hub dataset, a local directory, or a "
                                              "builder (json, parquet, arrow) with data_files", "hf_dataset.path")
    dataset_name: str | None = _setting(None, "load_dataset's name (the configuration)", "hf_dataset.name")
    dataset_split: str = _setting("train", "load_dataset's split", "hf_dataset.split")
    dataset_data_files: list[str] = _setting([], "load_dataset's data_files", "hf_dataset.data_files")
    dataset_revision: str | None = _setting(None, "load_dataset's revision", "hf_dataset.revision")
    dataset_cache_dir: str | None = _setting(None, "load_dataset's cache_dir (default: HF_DATASETS_CACHE)",
                                             "hf_dataset.cache_dir")
    data_format: str = _setting("auto", "text, prompt_completion or chat (instruction data: the loss on answers); "
                                        "auto: what the files' first lines hold")
    prompt_field: str = _setting("prompt", "prompt_completion: the prompt's field (xP3's inputs/targets are found "
                                           "too)")
    completion_field: str = _setting("completion", "prompt_completion: the answer's field")
    messages_field: str = _setting("messages", "chat: the field of the conversation, a list of {role, content}")
    chat_template: str | None = _setting(None, "chat: a Jinja template (a file, URL or its text; default: "
                                               "init_from's tokenizer config's)")
    completion_only_loss: bool = _setting(True, "instruction data: the loss on the answers only (false: on every "
                                                "token of the examples)")
    too_long: str = _setting("truncate", "an instruction example longer than seq_len + 1 tokens: truncate (the "
                                         "prompt's start cut first) or drop; counted in the log")
    packing: bool = _setting(False, "instruction data: pack as many examples as fit into each row (best fit), each "
                                    "attending only to itself")
    tokenizer: str | None = _setting(None, "directory or URL with tokenizer.json (default: init_from's, else trained)")
    tokenizer_vocab_size: int = _setting(8192, "vocabulary of a tokenizer trained on the data")
    seq_len: int = _setting(512, "tokens per training window")
    eval_fraction: float = _setting(0.01, "fraction of the documents held out for evaluation")
    data_cache: str | None = _setting(None, "where tokenized data is cached, a directory or URL (default: "
                                            "OUTPUT_DIR/data-cache)")
    # Optimisation.
    batch_size: int = _setting(8, "global batch: sequences per optimizer step")
    grad_accum: int = _setting(1, "micro-batches per step (batch_size must divide by it)")
    steps: int = _setting(1000, "optimizer steps")
    learning_rate: float = _setting(3e-4, "peak learning rate")
    warmup_steps: int = _setting(100, "linear warmup from 0")
    schedule: str = _setting("cosine", "after warmup: cosine, linear or constant")
    min_lr_ratio: float = _setting(0.1, "final learning rate / peak")
    adam_b1: float = _setting(0.9, "AdamW beta1")
    adam_b2: float = _setting(0.95, "AdamW beta2")
    adam_eps: float = _setting(1e-8, "AdamW epsilon")
    weight_decay: float = _setting(0.1, "AdamW weight decay (not on LayerNorms and biases)")
    grad_clip: float = _setting(1.0, "global gradient norm clip")
    seed: int = _setting(0, "initialisation, data order and dropout")
    # Parallelism.
    mesh: str = _setting("fsdp=-1", "mesh spec, e.g. data=2,fsdp=-1,tensor=4")
    rules: str = _setting("fsdp_tensor", "sharding rules preset of configs/sharding")
    # Output.
    output_dir: str = _setting("runs/bloom", "checkpoints, metrics.jsonl, tensorboard/ and final/: a directory or "
                                             "a URL (gs://BUCKET/PATH)")
    save_every: int = _setting(500, "steps between checkpoints")
    keep: int = _setting(3, "checkpoints kept")
    eval_every: int = _setting(200, "steps between evaluations")
    eval_batches: int = _setting(8, "batches per evaluation")
    log_every: int = _setting(10, "steps between logged metrics")
    peak_tflops: float | None = _setting(None, "per-device peak for MFU (default: known accelerators, else measured)")

    def __post_init__(self):
        checks = [
            (self.compute_dtype in ("float32", "bfloat16"), "compute_dtype must be float32 or bfloat16"),
            (self.param_dtype in ("float32", "bfloat16"), "param_dtype must be float32 or bfloat16"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.data_format in DATA_FORMATS, f"data_format must be one of {', '.join(DATA_FORMATS)}"),
            (self.too_long in TOO_LONG, f"too_long must be one of {', '.join(TOO_LONG)}"),
            (self.seq_len >= 1, "seq_len must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0,
             f"batch_size ({self.batch_size}) must divide by grad_accum ({self.grad_accum})"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.loss_chunk_tokens >= 1, "loss_chunk_tokens must be >= 1"),
            (self.lora_rank >= 0, "lora.rank must be >= 0"),
            (0 <= self.lora_dropout < 1, "lora.dropout must be in [0, 1)"),
            (bool(self.lora_targets) and all(t in LORA_TARGETS for t in self.lora_targets),
             f"lora.targets must be some of {', '.join(LORA_TARGETS)}"),
            (self.lora_base in LORA_BASES, f"lora.base must be one of {', '.join(LORA_BASES)}"),
            (self.lora_rank == 0 or self.init_from is not None, "LoRA (lora.rank > 0) needs init_from, the base"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.warmup_steps, "warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 < self.eval_fraction < 1, "eval_fraction must be in (0, 1)"),
            (min(self.save_every, self.keep, self.eval_every, self.log_every) >= 1,
             "save_every, keep, eval_every and log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise BloomJaxError(f"train config: {message}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
        """A recipe file (a path or a URL, or a name of configs/train/) with `key=value` overrides (values in
        YAML)."""
        import yaml

        recipe, shipped = Path(path), configs_dir() / "train" / f"{path}.yaml"
        if not storage.is_remote(path) and not recipe.is_file() and shipped.is_file():
            recipe = shipped
        try:
            text = storage.read_bytes(path) if storage.is_remote(path) else recipe.read_bytes()
            if text is None:
                raise BloomJaxError(f"cannot read {path}: no such file")
            data = yaml.safe_load(text) or {}
        except OSError as e:
            raise BloomJaxError(f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise BloomJaxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise BloomJaxError(f"{path} must be a mapping of settings")
        data = _dotted(data)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BloomJaxError(f"override {item!r} is not key=value")
            data[key.strip()] = yaml.safe_load(value) if value.strip() else None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "train config") -> TrainConfig:
        """From recipe keys (`lora.rank`, or a mapping `lora:` of `rank` ...), values checked against the types."""
        hints = typing.get_type_hints(cls)
        by_key = {_recipe_key(f): f.name for f in dataclasses.fields(cls)}
        data = _dotted(data)
        unknown = sorted(set(data) - set(by_key))
        if unknown:
            raise BloomJaxError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(by_key))})")
        return cls(**{by_key[key]: _typed(key, value, hints[by_key[key]], source) for key, value in data.items()})

    def to_dict(self) -> dict:
        """Recipe keys to values (`from_dict`'s inverse)."""
        return {_recipe_key(f): getattr(self, f.name) for f in dataclasses.fields(self)}


def _dotted(data: dict) -> dict:
    """A recipe with its nested mappings (`lora: {rank: 16}`) spelled as dotted keys (`lora.rank`)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in _dotted(value).items()})
        else:
            flat[key] = value
    return flat


def _typed(key: str, value: Any, hint: Any, source: str) -> Any:
    """`value` checked against a field's type (ints accepted for floats, one string for a list of strings)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_float(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if option is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, str):
            return [value]
        if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    expected = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise BloomJaxError(f"{source}: {key} must be {expected}, got {value!r}")


def recipe_keys() -> list[str]:
    """One line per recipe key: name, type, default and help (what `bloom-jax train --help` lists)."""
    hints = typing.get_type_hints(TrainConfig)
    lines = []
    for field in dataclasses.fields(TrainConfig):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        hint = hints[field.name]
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "null")
        lines.append(f"{_recipe_key(field)} ({kind}, default {default!r}): {field.metadata['help']}")
    return lines


def data_files(cfg: TrainConfig) -> list[str]:
    """The recipe's data paths, with `{python_stdlib}` standing for the directory of Python's standard library
    (real text on any machine with Python: the quickstart recipe trains on it), then the Arrow files of its
    Hugging Face dataset (`hf_dataset`), if any."""
    if not cfg.train_data and cfg.dataset_path is None:
        raise BloomJaxError("train config: train_data is empty (text, JSONL, Parquet or Arrow files, directories or "
                            "globs) and no hf_dataset is given")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [path.replace("{python_stdlib}", stdlib) for path in cfg.train_data]
    if cfg.dataset_path is not None:
        arguments = {"path": cfg.dataset_path, "name": cfg.dataset_name, "split": cfg.dataset_split,
                     "data_files": cfg.dataset_data_files or None, "revision": cfg.dataset_revision,
                     "cache_dir": cfg.dataset_cache_dir}
        files += load_dataset_files({key: value for key, value in arguments.items() if value is not None})
    return files


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")
