"""BLOOM checkpoints: load any of them, save and convert to the sharded Orbax format, export to Hugging Face.

- `hub`: hub ids as local directories. `storage`: directories and URLs, staged destinations.
- `hf`, `hf_files`: the Hugging Face format (name mapping, readers for every layout, a streaming writer).
- `converted`: the converted format (Orbax params, config, tokenizer): restore and `save_pretrained`.
- `pretrained`: `from_pretrained` over all of them. `pipelines`: streaming `convert` and `export`.
"""

from bloom_jax.checkpoints.converted import TOKENIZER_FILES, OrbaxParamsWriter, is_converted, save_pretrained
from bloom_jax.checkpoints.hf import load_hf_params
from bloom_jax.checkpoints.hub import resolve_model_dir
from bloom_jax.checkpoints.pipelines import convert, export
from bloom_jax.checkpoints.pretrained import (
    checkpoint_location,
    from_pretrained,
    read_generation_config,
    read_model_config,
    read_side_file,
    read_tokenizer,
)

__all__ = [
    "TOKENIZER_FILES", "OrbaxParamsWriter", "checkpoint_location", "convert", "export", "from_pretrained",
    "is_converted", "load_hf_params", "read_generation_config", "read_model_config", "read_side_file",
    "read_tokenizer", "resolve_model_dir", "save_pretrained",
]
