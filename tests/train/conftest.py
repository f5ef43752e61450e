"""The trainer's shared runs: run A (RECIPE from scratch), which the trainer's tests and its fault tests start from,
and JAX's persistent compilation cache, in which each run after A finds its programs."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from runs import persistent_compilation_cache, write_recipe

from bloom_jax.recipe import TrainConfig
from bloom_jax.train import Trainer


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory) -> Path:
    """The directory of JAX's persistent compilation cache, one for every module that turns it on."""
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(compilation_cache_dir):
    """JAX's persistent compilation cache on for each module here (then the previous settings back)."""
    with persistent_compilation_cache(compilation_cache_dir):
        yield


@pytest.fixture(scope="session")
def recipe_file(tmp_path_factory) -> Path:
    """RECIPE as a YAML file."""
    return write_recipe(tmp_path_factory.mktemp("recipe") / "recipe.yaml")


@pytest.fixture(scope="session")
def run_a(recipe_file, compilation_cache_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Run A: RECIPE from scratch on the 8 devices, uninterrupted (the Trainer trains its tokenizer):
    (output_dir, returned metrics). Shared by the modules here: a test copies its directory before changing it."""
    if jax.device_count() < 8:
        pytest.skip("run A needs 8 (simulated) devices")
    output_dir = tmp_path_factory.mktemp("run") / "a"
    with persistent_compilation_cache(compilation_cache_dir):  # session-scoped: set up before a module's cache
        return output_dir, Trainer(TrainConfig.from_yaml(recipe_file, [f"output_dir={output_dir}"]),
                                   progress=False).run()
