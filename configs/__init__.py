"""Named presets shipped with bloom_jax (installed as the `bloom_jax.configs` package).

`models/*.json` are Hugging Face `config.json` files: the six released BLOOM sizes and tiny sizes for tests.
"""
