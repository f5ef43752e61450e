"""Shared fixtures: transformers reference checkpoints built once per session, and the default one loaded; a GCS
emulator and a new bucket in it for each test that asks."""

from __future__ import annotations

import itertools
import os
import socket

# Eight simulated CPU devices for the mesh tests; must precede the first import of jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# libtpu takes /tmp/libtpu_lockfile for the life of any process that loads it, a compile-only TPU topology
# included: without this, the second of two processes compiling for a TPU at once (`bloom-jax plan --device`,
# tpu_compile_worker.py: one per pytest-xdist worker) fails with "Internal error when accessing libtpu
# multi-process lockfile". On CPU, where the tests run, no process holds a TPU chip: only the compiler is shared.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The GCS of these tests (the `gcs` fixture starts it): this process, and every child it starts, reaches gs:// URLs
# there. Set before bloom_jax is imported, as a user sets it before running bloom-jax.
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_s.getsockname()[1]}"
# What bloom_jax derives from it: a pytest-xdist worker inherits its parent's, which point at the parent's server.
for _derived in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                 "FSSPEC_GS_TOKEN"):
    os.environ.pop(_derived, None)

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gcs import GcsServer  # noqa: E402
from reference import PROMPT_LENGTHS, hf_logits, hf_model, left_padded, save_hf, tiny_config  # noqa: E402

from bloom_jax.checkpoints import from_pretrained  # noqa: E402
from bloom_jax.config import BloomConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A random transformers `BloomForCausalLM` and the directory its `save_pretrained` wrote."""

    config: BloomConfig
    torch_model: Any
    directory: Path


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint loaded by us, with the standard batch and the reference logits on it."""

    checkpoint: Checkpoint
    model: Any
    params: Any
    ids: np.ndarray
    mask: np.ndarray
    ref: np.ndarray

    @property
    def config(self) -> BloomConfig:
        return self.checkpoint.config


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Checkpoint]:
    """`make_checkpoint(**config_overrides)`: a saved reference model, built once per distinct config.

    Same shapes give the same weights (one seed), so configs that differ only in behaviour (e.g.
    `slow_but_exact`) share their parameters. Tests must not modify the returned directory.
    """
    cache: dict[tuple, Checkpoint] = {}

    def make(**overrides) -> Checkpoint:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            config = tiny_config(**overrides)
            model = hf_model(config)
            cache[key] = Checkpoint(config, model, save_hf(model, tmp_path_factory.mktemp("checkpoint")))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny(make_checkpoint) -> Loaded:
    """The default tiny checkpoint (8 heads, hidden 64, 2 layers) loaded in float32, with reference logits."""
    checkpoint = make_checkpoint()
    model, params = from_pretrained(checkpoint.directory)
    ids, mask = left_padded(checkpoint.config, PROMPT_LENGTHS)
    return Loaded(checkpoint, model, params, ids, mask, hf_logits(checkpoint.torch_model, ids, mask))


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> GcsServer:
    """fake-gcs-server at STORAGE_EMULATOR_HOST, behind its fault proxy, for the session (each pytest-xdist worker
    has its own)."""
    server = GcsServer(tmp_path_factory.mktemp("gcs"), port=int(os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1]))
    yield server.start()
    server.stop()


_BUCKETS = itertools.count()


@pytest.fixture
def gcs(gcs_server) -> GcsServer:
    """The session's GCS server, running and with no faults set (a test may stop it or add faults)."""
    if not gcs_server.running:
        gcs_server.start()
    gcs_server.proxy.clear()
    yield gcs_server
    gcs_server.proxy.clear()
    if not gcs_server.running:
        gcs_server.start()


@pytest.fixture
def bucket(gcs) -> str:
    """A new empty bucket, gs://NAME."""
    return gcs.make_bucket(f"bloom-test-{os.getpid()}-{next(_BUCKETS)}")
