"""Hugging Face directories wherever they are, as local directories: hub ids (`bigscience/bloom-560m`) through
huggingface_hub's cache, and directories in a bucket (`gs://...`) through a local mirror, both fetching the same
files (config and tokenizer files, safetensors, or `.bin` files where there are no safetensors)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.log import get_logger
from bloom_jax.storage import is_remote, join, local_path

log = get_logger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FILES = ["*.json", "*.safetensors", "tokenizer*"]  # safetensors first; .bin only for a directory without them
_BIN_FILES = ["*.json", "*.bin", "tokenizer*"]
_VERSIONS = ".bloom-jax-versions.json"  # a mirror's record: file -> [size, version] of what it holds


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory as is; a hub id (`bigscience/bloom-560m`) through huggingface_hub's cache; a directory
    in a bucket (`gs://...`) through its local mirror (`mirror`).

    The hub's own settings apply (`HF_HOME`, `HF_HUB_OFFLINE=1` to use the cache only).
    """
    if is_remote(path):
        return mirror(os.fspath(path))
    local = local_path(path)  # a file:// URL is a local directory
    if local.exists():
        if not local.is_dir():
            raise BloomJaxError(f"not a model directory: {local}")
        return local
    if not _HUB_ID.match(str(path)):
        raise BloomJaxError(f"no such directory, and not a hub id (org/name): {local}")
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(str(path), allow_patterns=_FILES))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(str(path), allow_patterns=_BIN_FILES))
    except Exception as e:  # offline, unknown repository, no access...
        raise BloomJaxError(f"no directory {path}, and cannot fetch it from the Hugging Face hub: "
                            f"{one_line(e)}") from None
    return directory


def mirror_root() -> Path:
    """Where directories in buckets are mirrored: $BLOOM_JAX_CACHE/buckets (default ~/.cache/bloom_jax)."""
    return Path(os.environ.get("BLOOM_JAX_CACHE") or Path.home() / ".cache" / "bloom_jax") / "buckets"


def mirror(url: str) -> Path:
    """The local copy of a Hugging Face directory in a bucket, under `mirror_root()`: its files fetched once, and
    again only when one changed (its size or version); each written whole (a temporary file renamed)."""
    names = storage.list_names(url)
    if not names:
        raise BloomJaxError(f"no such directory: {url}")
    if "config.json" not in names:
        raise BloomJaxError(f"{url} is neither a converted checkpoint (no params/_METADATA) nor a Hugging Face "
                            "directory (no config.json)")
    patterns = _FILES if any(name.endswith(".safetensors") for name in names) else _BIN_FILES
    wanted = [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
    local = mirror_root() / url.split("://", 1)[1].rstrip("/")
    local.mkdir(parents=True, exist_ok=True)
    record_file = local / _VERSIONS
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    stale = {}
    for name in wanted:
        size, version = storage.size_and_version(join(url, name))
        if record.get(name) != [size, version] or not (local / name).is_file():
            stale[name] = [size, version]
    if stale:
        log.info(f"fetching {len(stale)} files of {url} into {local}")
        with tqdm(total=sum(size for size, _ in stale.values()), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="fetching", file=sys.stderr, dynamic_ncols=True) as bar:
            for name, stamp in stale.items():
                _fetch(join(url, name), local / name, bar.update)
                record[name] = stamp
                storage.write_bytes(record_file, json.dumps(record).encode())
    return local


def _fetch(url: str, path: Path, on_bytes) -> None:
    staged = path.with_name(f".{path.name}.partial")
    try:
        with storage.open_read(url) as source, open(staged, "wb") as out:
            while chunk := source.read(16 * 2**20):
                out.write(chunk)
                on_bytes(len(chunk))
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise
