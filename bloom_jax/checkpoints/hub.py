"""Hugging Face hub ids (`bigscience/bloom-560m`) as local directories, through huggingface_hub's cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.storage import local_path

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory as is; a hub id (`bigscience/bloom-560m`) through huggingface_hub's cache.

    The hub's own settings apply (`HF_HOME`, `HF_HUB_OFFLINE=1` to use the cache only).
    """
    local = local_path(path)  # a file:// URL is a local directory
    if local.exists():
        if not local.is_dir():
            raise BloomJaxError(f"not a model directory: {local}")
        return local
    if not _HUB_ID.match(str(path)):
        raise BloomJaxError(f"no such directory, and not a hub id (org/name): {local}")
    from huggingface_hub import snapshot_download

    try:
        # Safetensors first; only a repository without them costs a .bin download.
        directory = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.bin", "tokenizer*"]))
    except Exception as e:  # offline, unknown repository, no access...
        raise BloomJaxError(f"no directory {path}, and cannot fetch it from the Hugging Face hub: "
                            f"{one_line(e)}") from None
    return directory
