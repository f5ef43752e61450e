"""BLOOM in JAX and Flax: load, shard, generate with, fine-tune and pretrain BigScience's BLOOM."""

from bloom_jax.config import BloomConfig, load_config, preset_names
from bloom_jax.errors import BloomJaxError, RunFailed
from bloom_jax.model import BloomForCausalLM, abstract_params, count_params, init_params, make_model

__version__ = "0.1.0"

__all__ = [
    "BloomConfig", "BloomForCausalLM", "BloomJaxError", "Generator", "RunFailed", "abstract_params",
    "count_params", "from_pretrained", "init_params", "load_config", "make_model", "preset_names",
    "save_pretrained",
]

# Loaded on first use: they pull in the checkpoint readers, Orbax and the tokenizer.
_LAZY = {"from_pretrained": "bloom_jax.checkpoints", "save_pretrained": "bloom_jax.checkpoints",
         "Generator": "bloom_jax.generate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bloom_jax' has no attribute {name!r}")
