"""BLOOM in JAX and Flax: load, shard, generate with, fine-tune and pretrain BigScience's BLOOM.

The names below are loaded on first use, so that `import bloom_jax.recipe` (say) imports neither JAX nor the
checkpoint readers.
"""

from importlib.metadata import PackageNotFoundError, version

from bloom_jax.platforms import skip_absent_tpu

skip_absent_tpu()  # before JAX starts its backends, whatever imports it next

try:
    __version__ = version("bloom-jax")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

_LAZY = {  # public name -> the module that defines it
    "BloomConfig": "bloom_jax.config", "load_config": "bloom_jax.config", "preset_names": "bloom_jax.config",
    "BloomJaxError": "bloom_jax.errors", "RunFailed": "bloom_jax.errors",
    "BloomForCausalLM": "bloom_jax.model", "abstract_params": "bloom_jax.model", "count_params": "bloom_jax.model",
    "init_params": "bloom_jax.model", "make_model": "bloom_jax.model",
    "from_pretrained": "bloom_jax.checkpoints", "save_pretrained": "bloom_jax.checkpoints",
    "Generator": "bloom_jax.generate",
    "LoraConfig": "bloom_jax.lora", "load_adapter": "bloom_jax.checkpoints.peft",
    "save_adapter": "bloom_jax.checkpoints.peft",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    import importlib.util

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # The modules too, as a package that imports them eagerly would have them: `bloom_jax.model.stack_layers`.
    if not name.startswith("_") and importlib.util.find_spec(f"bloom_jax.{name}") is not None:
        return importlib.import_module(f"bloom_jax.{name}")
    raise AttributeError(f"module 'bloom_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
