"""BLOOM in JAX and Flax: load, shard, generate with, fine-tune and pretrain BigScience's BLOOM."""

from bloom_jax.config import BloomConfig, load_config, preset_names
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, abstract_params, count_params, init_params, make_model

__version__ = "0.1.0"

__all__ = [
    "BloomConfig", "BloomForCausalLM", "BloomJaxError", "Generator", "abstract_params", "count_params",
    "from_pretrained", "init_params", "load_config", "make_model", "preset_names",
]


def __getattr__(name):
    # `from_pretrained` and `Generator` pull in the checkpoint readers; import them on first use.
    if name == "from_pretrained":
        from bloom_jax.checkpoint import from_pretrained

        return from_pretrained
    if name == "Generator":
        from bloom_jax.generate import Generator

        return Generator
    raise AttributeError(f"module 'bloom_jax' has no attribute {name!r}")
