"""Where checkpoints live: local directories and URLs (`gs://...`, `file://...`) read and written through
TensorStore's key-value stores, and destinations that never show a half-written checkpoint, never leave one
behind a killed writer, and never take two writers at once."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from bloom_jax.disk_faults import DISK_ERRORS, FailureEchoesDropped, disk_error, room
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.log import get_logger

log = get_logger(__name__)

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    return bool(_URL.match(str(location)))


def kvstore_url(location: str | os.PathLike) -> str:
    """A TensorStore kvstore URL ending in '/' for a local path or a URL (`gs://...`, `file://...`)."""
    url = str(location) if is_url(location) else "file://" + str(Path(location).resolve())
    return url.rstrip("/") + "/"


def open_kvstore(location: str | os.PathLike):
    """The TensorStore key-value store of a directory or URL."""
    import tensorstore as ts

    try:
        return ts.KvStore.open(kvstore_url(location)).result()
    except Exception as e:
        raise BloomJaxError(f"cannot open {location}: {one_line(e)}") from None


def read_bytes(location: str | os.PathLike, key: str) -> bytes | None:
    """A file of a local directory or URL, exactly as stored; None if there is none."""
    if not is_url(location):
        path = Path(location) / key
        return path.read_bytes() if path.is_file() else None
    result = open_kvstore(location).read(key).result()
    return bytes(result.value) if result.state == "value" else None


def write_bytes(location: str | os.PathLike, key: str, data: bytes) -> None:
    """Writes the file `key` of a local directory or URL."""
    if is_url(location):
        open_kvstore(location).write(key, data).result()
    else:
        (Path(location) / key).write_bytes(data)


def has_file(location: str | os.PathLike, key: str) -> bool:
    """Whether a directory or URL holds the file `key`; False for one that cannot be opened."""
    if not is_url(location):
        return (Path(location) / key).is_file()
    try:
        return open_kvstore(location).read(key).result().state == "value"
    except BloomJaxError:
        return False


def orbax_path(location: str | os.PathLike) -> str:
    """What Orbax takes: an absolute local path (also for `file://` URLs) or a cloud URL such as `gs://`."""
    text = str(location)
    if text.startswith("file://"):
        return text[len("file://"):]
    return text if is_url(text) else str(Path(text).resolve())


def join(root: str | os.PathLike, key: str) -> str:
    return str(root).rstrip("/") + "/" + key


def refuse_non_empty(location: str | os.PathLike, overwrite: bool) -> None:
    """An error unless `location` is absent, an empty directory, or may be overwritten."""
    if is_url(location):
        if not overwrite and open_kvstore(location).list().result():
            raise BloomJaxError(f"{location} is not empty (use --overwrite to replace it)")
        return
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise BloomJaxError(f"{path} exists and is not a directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise BloomJaxError(f"{path} is not empty (use --overwrite to replace it)")


def clear(location: str | os.PathLike) -> None:
    """Removes everything at `location` (a local directory is left empty; a URL prefix, without its keys)."""
    if is_url(location):
        import tensorstore as ts

        open_kvstore(location).delete_range(ts.KvStore.KeyRange()).result()
        return
    path = Path(location)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


_NO_LOCKS = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WriterLock:
    """The lock a writer of local directory `final` holds beside it, `.NAME.lock`: an exclusive `flock`, which
    the kernel drops when its process ends however it ends (SIGKILL too). Held, it means a live writer; free,
    every `.NAME.partial-*` staging directory beside `final` belongs to a dead one."""

    def __init__(self, final: Path):
        self.path = final.parent / f".{final.name}.lock"
        self.held = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BloomJaxError(f"another process is writing {final} (it holds {self.path}): wait for it to "
                                    "finish or stop it") from None
            except OSError as e:  # a filesystem without locks (some FUSE mounts): write unlocked, say so
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                log.warning(f"{final.parent} takes no file locks: a second writer of {final} would not be noticed, "
                            "and the staging of interrupted writes is left for you to remove")
                self.held = False
                break
            try:  # the holder before us may have removed the file between our open and our lock: lock anew
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter that opened it will see it gone
            os.close(self.fd)
            self.fd = None


def remove_stale_staging(final: Path) -> None:
    """Removes the staging directories of killed writers of `final` (call with its `WriterLock` held)."""
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file())
        shutil.rmtree(stale, ignore_errors=True)
        log.info(f"removed {stale} ({size / 1e6:.1f} MB), left by an interrupted write of {final}")


class Destination:
    """Where a conversion, export or save writes: a local directory (staged beside it, then renamed into place)
    or a URL (written in place, the files that make it loadable last). A non-empty destination needs
    `overwrite`. Use as a context manager: on an error the staged data is removed. A local destination is locked
    while it is written (`WriterLock`: a second writer is refused), and the staging left by a killed writer is
    removed first. A full or unwritable disk becomes one `BloomJaxError` naming the place and, given
    `needed_bytes`, what the write needed beside what is free."""

    def __init__(self, location: str | os.PathLike, overwrite: bool, needed_bytes: int | None = None):
        self.location, self.overwrite, self.lock = str(location), overwrite, None
        self.needed_bytes = needed_bytes
        if is_url(location):
            refuse_non_empty(location, overwrite)
            self.root = self.location
            return
        final = Path(location)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.lock = WriterLock(final)
        except OSError as e:
            raise BloomJaxError(f"cannot write in {final.parent}: {e.strerror}") from None
        try:
            refuse_non_empty(location, overwrite)
            if self.lock.held:  # unlocked, another writer's staging cannot be told from a dead one's
                remove_stale_staging(final)
            self.root = tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)
        except BaseException as e:
            self.lock.release()
            if isinstance(e, OSError):
                raise BloomJaxError(f"cannot write in {final.parent}: {e.strerror}") from None
            raise

    def __enter__(self) -> Destination:
        if is_url(self.location) and self.overwrite:
            clear(self.location)
        self._echoes = FailureEchoesDropped().__enter__()
        return self

    def write_bytes(self, key: str, data: bytes) -> None:
        write_bytes(self.root, key, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._echoes.__exit__(exc_type, exc, tb)  # kept after a failure: its futures report when collected
        if is_url(self.location):
            return  # an incomplete URL destination lacks the metadata written last, so nothing will load it
        final = Path(self.location)
        try:
            if exc_type is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                code = disk_error(exc, where=final.parent)
                if code is not None:
                    raise BloomJaxError(self._disk_message(final, code)) from None
                return
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.root, 0o777 & ~umask)  # mkdtemp made it private
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.root, final)
        finally:
            self.lock.release()

    def _disk_message(self, final: Path, code: int) -> str:
        message = f"cannot write {final}: {DISK_ERRORS[code]} in {final.parent}"
        if self.needed_bytes:
            message += room(code, self.needed_bytes, final.parent)  # measured after the partial data went
        return message
