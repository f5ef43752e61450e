"""Where files live: local paths and URLs (`gs://bucket/...`, `file://...`), read and written through one layer.

Local paths (and `file://` URLs, which are local paths) use the OS: atomic renames, locks and memory maps. Other
URLs go through fsspec, gcsfs for `gs://`: Orbax's own path layer (etils.epath) reaches `gs://` through gcsfs
too, so one client, one set of credentials and one endpoint setting serve every file bloom-jax reads or writes,
and it streams large reads, lists and globs, and reads byte ranges. Array data goes through TensorStore, as
Orbax writes it; `tensorstore_context()` and `orbax()` give TensorStore the retry policy gcsfs has.

GCS, and an emulator. Credentials are Google's defaults (a TPU VM's service account, `gcloud auth
application-default login`). `STORAGE_EMULATOR_HOST=http://HOST:PORT`, the setting Google's client libraries
read, points every client at a GCS emulator instead (fake-gcs-server in the tests): TensorStore's endpoint, no
credentials asked for, and gcsfs without its gRPC bucket-type lookup, which an emulator cannot answer (60 s per
call).

Faults. Requests that GCS answers 429 or 5xx, or that cannot connect, are tried 6 times with exponential
backoff (1, 2, 4, 8, 16 s apart, jittered: 31 s to a minute in all; gcsfs's policy, given to TensorStore too,
whose own default retries 32 times, up to 32 s apart: a quarter of an hour and more); then the operation
fails, and `wire_error` says why in a few words for the one line the user sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from bloom_jax.disk_faults import DISK_ERRORS, disk_error
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.log import get_logger

log = get_logger(__name__)

Location = str | os.PathLike

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
RETRIES = 6  # tries of one request, gcsfs's own count (its decorators fix it): 1 s to 16 s apart, doubling
# TensorStore's count is of retries after the first try; its delays double from 1 s, jittered up to twice that.
_TS_RETRIES = {"max_retries": RETRIES - 1, "initial_delay": "1s", "max_delay": "32s"}


def _emulator_settings() -> None:
    """`STORAGE_EMULATOR_HOST` as every client's endpoint (settings already made are kept)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore asks for no credentials
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # gcsfs, ours and Orbax's, asks for no credentials (looking for them costs seconds per client where none are).
    os.environ.setdefault("FSSPEC_GS_TOKEN", "anon")
    if "fsspec" in sys.modules:  # imported already: it read the environment then
        sys.modules["fsspec"].config.conf.setdefault("gs", {}).setdefault("token", "anon")


_emulator_settings()


# -- locations ---------------------------------------------------------------------------------------------------

def is_url(location: Location) -> bool:
    """Whether `location` is a URL (`gs://...`, `file://...`), not a plain path."""
    return bool(_URL.match(os.fspath(location)))


def is_remote(location: Location) -> bool:
    """Whether `location` is a URL other than `file://`: an object store, reached over the network."""
    return is_url(location) and not os.fspath(location).startswith("file://")


def local_path(location: Location) -> Path:
    """The path of a local location (a plain path or a `file://` URL)."""
    text = os.fspath(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def normalize(location: Location) -> str:
    """A remote URL as it is (no trailing '/'), a local location as an absolute path."""
    if is_remote(location):
        return os.fspath(location).rstrip("/")
    return str(local_path(location).absolute())


def join(root: Location, *keys: str) -> str:
    """`root/key/...` for a local path or a URL."""
    return "/".join([os.fspath(root).rstrip("/"), *keys])


def name_of(location: Location) -> str:
    """The last part of a path or URL."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: Location) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[0]


def bucket_of(location: Location) -> str:
    """The bucket of a `gs://BUCKET/...` URL."""
    return os.fspath(location).split("://", 1)[1].split("/", 1)[0]


def _filesystem(location: Location):
    import fsspec

    protocol = os.fspath(location).split("://", 1)[0]
    # No listings cache: other processes (the hosts of a run, a rerun) write the same bucket.
    return fsspec.filesystem(protocol, use_listings_cache=False)


@contextlib.contextmanager
def _remote(location: Location, doing: str) -> Iterator:
    """The location's filesystem; a fault on the wire becomes one `BloomJaxError`: "cannot DOING LOCATION: why"."""
    try:
        yield _filesystem(location)
    except BloomJaxError:
        raise
    except Exception as error:  # noqa: BLE001 - what fsspec, gcsfs and aiohttp raise varies; wire_error sorts it
        why = wire_error(error)
        if why is None:
            raise
        raise BloomJaxError(f"cannot {doing} {location}: {why}") from None


# -- reading -----------------------------------------------------------------------------------------------------

def exists(location: Location) -> bool:
    """Whether a file or directory (for a URL: an object, or objects under it as a prefix) is there."""
    if not is_remote(location):
        return local_path(location).exists()
    with _remote(location, "read") as fs:
        return fs.exists(location)


def is_file(location: Location) -> bool:
    if not is_remote(location):
        return local_path(location).is_file()
    with _remote(location, "read") as fs:
        return fs.isfile(location)


def is_dir(location: Location) -> bool:
    """A local directory, or a URL prefix with objects under it."""
    if not is_remote(location):
        return local_path(location).is_dir()
    with _remote(location, "read") as fs:
        return fs.isdir(location)


def read_bytes(location: Location) -> bytes | None:
    """A file's bytes; None if there is none."""
    if not is_remote(location):
        path = local_path(location)
        return path.read_bytes() if path.is_file() else None
    with _remote(location, "read") as fs:
        try:
            return fs.cat_file(location)
        except FileNotFoundError:
            return None


def read_range(location: Location, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file."""
    return read_ranges(location, [(start, stop)])[0]


def read_ranges(location: Location, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Bytes [start, stop) of a file for each range: for a URL, fetched concurrently, one request each."""
    if not is_remote(location):
        with open(local_path(location), "rb") as f:
            pieces = []
            for start, stop in ranges:
                f.seek(start)
                pieces.append(f.read(stop - start))
            return pieces
    with _remote(location, "read") as fs:
        return fs.cat_ranges([os.fspath(location)] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                             on_error="raise")


@contextlib.contextmanager
def open_read(location: Location) -> Iterator[IO[bytes]]:
    """A file opened for streamed binary reading (for a URL, read ahead in 8 MiB blocks)."""
    if not is_remote(location):
        with open(local_path(location), "rb") as f:
            yield f
        return
    with _remote(location, "read") as fs, fs.open(location, "rb", block_size=8 * 2**20) as f:
        yield f


def size_and_version(location: Location) -> tuple[int, int | str]:
    """A file's size and what changes whenever it is rewritten: its mtime (ns) locally, its generation in
    GCS (or its etag or mtime elsewhere)."""
    if not is_remote(location):
        stat = local_path(location).stat()
        return stat.st_size, stat.st_mtime_ns
    with _remote(location, "read") as fs:
        info = fs.info(location)
    version = info.get("generation") or info.get("ETag") or info.get("etag") or str(info.get("mtime", ""))
    return int(info["size"]), version


def list_names(location: Location) -> list[str]:
    """The names of the files and directories (prefixes) right under `location`, sorted; [] if none."""
    if not is_remote(location):
        path = local_path(location)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    with _remote(location, "list") as fs:
        try:
            return sorted({name_of(entry) for entry in fs.ls(location, detail=False)})
        except FileNotFoundError:
            return []


def find(location: Location) -> list[str]:
    """The files under `location` (recursively), as paths relative to it, sorted."""
    if not is_remote(location):
        root = local_path(location)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    with _remote(location, "list") as fs:
        prefix = fs._strip_protocol(os.fspath(location)).rstrip("/") + "/"
        try:
            return sorted(p[len(prefix):] for p in fs.find(location) if p.startswith(prefix))
        except FileNotFoundError:
            return []


def glob(pattern: str) -> list[str]:
    """The files and directories matching a glob pattern (`*`, `?`, `[`; `**` recursive), sorted: local paths,
    or URLs with the pattern's scheme."""
    if not is_remote(pattern):
        import glob as globbing

        return sorted(globbing.glob(str(local_path(pattern)), recursive=True))
    scheme = pattern.split("://", 1)[0]
    with _remote(pattern, "list") as fs:
        return sorted(f"{scheme}://{match}" for match in fs.glob(pattern))


# -- writing -----------------------------------------------------------------------------------------------------

def make_dirs(location: Location) -> None:
    """A local directory and its parents (nothing to make in an object store)."""
    if not is_remote(location):
        local_path(location).mkdir(parents=True, exist_ok=True)


def write_bytes(location: Location, data: bytes) -> None:
    """Writes a whole file, atomically: a reader sees the old file or the new one (locally: a temporary file
    renamed over it, parent directories made; an object is replaced whole by its upload)."""
    if is_remote(location):
        with _remote(location, "write") as fs:
            fs.pipe_file(os.fspath(location), data)
        return
    path = local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # mkstemp made it private
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_write(location: Location) -> Iterator[IO[bytes]]:
    """A file opened for streamed binary writing. For a URL, the object appears only if the block ends without
    an error (an upload in parts, committed at the end); locally the file is written in place."""
    if not is_remote(location):
        with open(local_path(location), "wb") as f:
            yield f
        return
    with _remote(location, "write") as fs:
        f = fs.open(location, "wb", autocommit=False)
        try:
            yield f
            f.flush(force=True)  # the upload started (a small file's too): what commit() completes
            f.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()
            raise
        finally:
            f.closed = True


def remove(location: Location) -> None:
    """Removes a file if it is there."""
    if not is_remote(location):
        local_path(location).unlink(missing_ok=True)
        return
    with _remote(location, "remove") as fs:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(os.fspath(location))


def remove_tree(location: Location) -> None:
    """Removes a directory and everything under it (a URL: every object under the prefix), if there."""
    if not is_remote(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
        return
    with _remote(location, "remove") as fs:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(os.fspath(location).rstrip("/"), recursive=True)


def move_tree(source: Location, destination: Location) -> None:
    """Moves a directory (locally a rename; in an object store, each object copied, then removed)."""
    if not is_remote(source):
        os.replace(local_path(source), local_path(destination))
        return
    with _remote(source, "move") as fs:
        fs.mv(os.fspath(source).rstrip("/"), os.fspath(destination).rstrip("/"), recursive=True)


def check_writable(location: Location) -> None:
    """Fails early, with one line, where a run could not write `location`: a missing bucket, a denied write
    (an object written and removed, to see), a local path that cannot be a directory."""
    if not is_remote(location):
        path = local_path(location)
        if path.exists() and not path.is_dir():
            raise BloomJaxError(f"{path} exists and is not a directory")
        return
    bucket = bucket_of(location)
    with _remote(location, "reach") as fs:
        try:
            fs.ls(f"{os.fspath(location).split('://', 1)[0]}://{bucket}", detail=False)
        except FileNotFoundError:
            raise BloomJaxError(f"cannot write {location}: there is no bucket {bucket}") from None
    probe = join(location, f".bloom-jax-write-check-{os.getpid()}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except BloomJaxError as error:
        raise BloomJaxError(f"cannot write {location}: {wire_error(error) or error}") from None


class AppendedFile:
    """A file that grows by `append`. Locally, an append is written and flushed at once. An object cannot grow:
    the whole file is uploaded again, by `flush`, when it changed and `interval_s` passed since the last upload
    (GCS takes one write per second to an object; 30 s keeps a long run's uploads few), and by
    `flush(force=True)`. `keep_line(line)`: what the file already holds keeps only the lines it accepts
    (`dropped` counts the others)."""

    def __init__(self, location: Location, interval_s: float = 30.0, keep_line=None):
        self.location, self.interval_s = location, interval_s
        self.remote = is_remote(location)
        self.dropped = 0
        old = read_bytes(location) or b""
        if keep_line is not None and old:
            lines = old.splitlines(keepends=True)
            kept = [line for line in lines if keep_line(line)]
            self.dropped = len(lines) - len(kept)
            if self.dropped:
                old = b"".join(kept)
                write_bytes(location, old)
        if self.remote:
            self._data, self._dirty, self._uploaded = bytearray(old), False, None
        else:
            path = local_path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab")

    def append(self, data: bytes) -> None:
        if self.remote:
            self._data += data
            self._dirty = True
            self.flush()
        else:
            self._file.write(data)
            self._file.flush()

    def flush(self, force: bool = False) -> None:
        if not self.remote or not self._dirty:
            return
        if force or self._uploaded is None or time.monotonic() - self._uploaded >= self.interval_s:
            write_bytes(self.location, bytes(self._data))
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        else:
            self._file.close()


# -- TensorStore and Orbax ---------------------------------------------------------------------------------------

def kvstore_url(location: Location) -> str:
    """A TensorStore kvstore URL ending in '/' for a local path or a URL (`gs://...`, `file://...`)."""
    url = os.fspath(location) if is_remote(location) else "file://" + str(local_path(location).absolute())
    return url.rstrip("/") + "/"


def tensorstore_context(**resources):
    """A TensorStore context with this module's GCS retry policy, and `resources`."""
    import tensorstore as ts

    return ts.Context({"gcs_request_retries": _TS_RETRIES, **resources})


_ORBAX_READY = False


def orbax():
    """`orbax.checkpoint`, its TensorStore contexts given this module's GCS retry policy (Orbax builds them with
    none set: TensorStore's default keeps a save to a stopped server going a quarter of an hour and more)."""
    global _ORBAX_READY
    import orbax.checkpoint as ocp

    if not _ORBAX_READY:
        try:  # Orbax's private defaults (0.11.26 to 0.12): a later Orbax without them keeps TensorStore's policy
            from orbax.checkpoint._src.serialization import tensorstore_utils
        except ImportError:
            tensorstore_utils = None
        for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
            getattr(tensorstore_utils, name, {}).setdefault("gcs_request_retries", _TS_RETRIES)
        _ORBAX_READY = True
    return ocp


def orbax_path(location: Location) -> str:
    """What Orbax takes: an absolute local path (also for `file://` URLs) or a remote URL such as `gs://`."""
    return normalize(location)


# -- faults on the wire ------------------------------------------------------------------------------------------

_STATUS_NAMES = {408: "408 Request Timeout", 429: "429 Too Many Requests", 500: "500 Internal Server Error",
                 502: "502 Bad Gateway", 503: "503 Service Unavailable", 504: "504 Gateway Timeout"}
_TENSORSTORE = re.compile(r"\b(NOT_FOUND|PERMISSION_DENIED|UNAUTHENTICATED|ABORTED|UNAVAILABLE|DEADLINE_EXCEEDED|"
                          r"RESOURCE_EXHAUSTED)\b: (.*)")


def wire_error(error: BaseException | None) -> str | None:
    """Why a request to an object store failed, in a few words ("permission denied (HTTP 403)", "the server
    answered 503 Service Unavailable to every try (6 tries, 1 s to 16 s apart)", "no such bucket (HTTP 404)", "the
    server could not be reached: connection refused (6 tries, ...)"), from the error or its causes, as gcsfs,
    aiohttp or TensorStore raised it; None for an error that is not one of those."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = _wire_error_of(error)
        if found is not None:
            return found
        error = error.__cause__ or error.__context__
    return None


def _retried(what: str) -> str:
    return f"{what} ({RETRIES} tries, 1 s to {2 ** (RETRIES - 2)} s apart)"


def _wire_error_of(error: BaseException) -> str | None:
    text = str(error)
    module = type(error).__module__
    status = getattr(error, "code", None) if module.startswith("gcsfs") else None
    if isinstance(status, int):
        if status in (401, 403):
            return f"permission denied (HTTP {status})"
        return _retried(f"the server answered {_STATUS_NAMES.get(status, f'HTTP {status}')} to every try")
    if module.startswith("aiohttp") or module.startswith("requests"):
        cause = error.__cause__ or getattr(error, "os_error", None)
        reason = (os.strerror(cause.errno).lower() if isinstance(cause, OSError) and cause.errno
                  else one_line(error))
        return _retried(f"the server could not be reached: {reason}")
    if isinstance(error, OSError) and text.startswith("Forbidden:"):  # gcsfs's 403
        return "permission denied (HTTP 403)"
    if isinstance(error, FileNotFoundError) and ("/storage/v1/b/" in text or text.startswith("b/")):
        return "no such bucket (HTTP 404)"  # writes and lists: a missing object is no error there
    found = _TENSORSTORE.search(text)
    if found and ("http_response_code" in text or "CURL error" in text or "retry attempts failed" in text):
        code, detail = found.groups()
        status_match = re.search(r"http_response_code='(\d+)'", text)
        status = int(status_match[1]) if status_match else None
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or status in (401, 403):
            return f"permission denied (HTTP {status or 403})"
        if code == "NOT_FOUND" or status == 404:
            return "no such bucket (HTTP 404)"
        if "CURL error" in detail:
            reason = re.search(r"CURL error ([^:\[]+)", detail)
            return _retried(f"the server could not be reached: {(reason[1] if reason else 'no connection').strip()}"
                            .lower().replace("could not connect to server", "connection refused"))
        if status is not None:
            return _retried(f"the server answered {_STATUS_NAMES.get(status, f'HTTP {status}')} to every try")
        return one_line(error)
    return None


def fault(error: BaseException, where: Location | None = None) -> str | None:
    """Why a write failed, where the storage failed it: a full or unwritable disk (`disk_faults`), or a fault
    on the wire (`wire_error`); None for anything else."""
    code = disk_error(error, where=where)
    if code is not None:
        return DISK_ERRORS[code]
    return wire_error(error)


class FailureEchoesDropped:
    """While it lasts, drops what Orbax, TensorStore and asyncio print, beside the one error reported, about a
    write that the storage failed (`fault`: a full or unwritable disk, a fault on the wire), or a read of a
    damaged checkpoint:

    - records of such a fault logged by absl (Orbax logs a failed save from each of its threads, tracebacks and
      all: 1,015 lines of stderr for one full disk) or by asyncio ("Future exception was never retrieved", for
      each of a failed save's futures, when Python collects them);
    - unraisable `RuntimeError("Event loop is closed")`: TensorStore completing a write of a failed save after
      Orbax closed the save's event loop (17 to 117 tracebacks for one full disk, from step to step);
    - unraisable "Encountered error while reading array index": the abandoned reads of a failed restore.

    Futures are collected at any later point, at exit often: once something failed (`keep()`, or the block
    raised), one set of these filters stays for the process's life (`from_now_on`); otherwise they go when the
    block ends.
    """

    _for_good: FailureEchoesDropped | None = None

    def __enter__(self) -> FailureEchoesDropped:
        self._kept = False
        self._filter = lambda record: not _of_a_fault(record)  # one per instance: each removes its own
        self._loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
        for logger in self._loggers:
            logger.addFilter(self._filter)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._hook
        return self

    def keep(self) -> None:
        self._kept = True

    @classmethod
    def from_now_on(cls) -> None:
        """For the rest of the process: a failure was reported, and its futures are collected later."""
        keeper = cls._for_good
        if keeper is None or sys.unraisablehook != keeper._hook:  # none yet, or its hook was replaced since
            cls._for_good = cls().__enter__()

    def _hook(self, unraisable) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not closed_loop and not str(error).startswith("Encountered error while reading array index"):
            self._previous_hook(unraisable)

    def __exit__(self, exc_type, exc, tb) -> None:
        for logger in self._loggers:
            logger.removeFilter(self._filter)
        if sys.unraisablehook == self._hook:  # else another hook was chained after ours: it stays
            sys.unraisablehook = self._previous_hook
        if exc_type is not None or self._kept:
            FailureEchoesDropped.from_now_on()


def _of_a_fault(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return fault(error) is not None or fault(Exception(record.getMessage())) is not None


def quiet_client_logs() -> None:
    """gcsfs logs every request that ran out of retries with its traceback, at ERROR, beside the one line the
    user gets for it: kept to its debug switch (GCSFS_DEBUG)."""
    if "GCSFS_DEBUG" not in os.environ:
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
        logging.getLogger("fsspec").setLevel(logging.CRITICAL)


quiet_client_logs()

__all__ = ["AppendedFile", "FailureEchoesDropped", "Location", "RETRIES", "check_writable",
           "exists", "fault", "find", "glob", "is_dir", "is_file", "is_remote", "is_url", "join", "kvstore_url",
           "list_names", "local_path", "make_dirs", "move_tree", "name_of", "normalize", "open_read", "open_write",
           "orbax", "orbax_path", "parent_of", "read_bytes", "read_range", "read_ranges", "remove", "remove_tree",
           "size_and_version", "tensorstore_context", "wire_error", "write_bytes"]
