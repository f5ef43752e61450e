"""Where checkpoints are written: destinations (local directories and URLs, through `bloom_jax.storage`) that
never show a half-written checkpoint, never leave one behind a killed writer, and never take two writers at
once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from bloom_jax import storage
from bloom_jax.disk_faults import DISK_ERRORS, disk_error, room
from bloom_jax.errors import BloomJaxError
from bloom_jax.log import get_logger
from bloom_jax.storage import FailureEchoesDropped, Location, is_remote, join, local_path

log = get_logger(__name__)


def refuse_non_empty(location: Location, overwrite: bool) -> None:
    """An error unless `location` is absent, an empty directory (or URL prefix), or may be overwritten."""
    if not is_remote(location):
        path = local_path(location)
        if path.exists() and not path.is_dir():
            raise BloomJaxError(f"{path} exists and is not a directory")
    if not overwrite and storage.list_names(location):
        raise BloomJaxError(f"{location} is not empty (use --overwrite to replace it)")


def clear(location: Location) -> None:
    """Removes everything at `location` (a local directory is left empty; a URL prefix, without its objects)."""
    storage.remove_tree(location)
    storage.make_dirs(location)


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
    or a URL (written in place, the files that make it loadable last; removed again if the write fails). A
    non-empty destination needs `overwrite`. Use as a context manager: on an error the staged data is removed.
    A local destination is locked while it is written (`WriterLock`: a second writer is refused), and the
    staging left by a killed writer is removed first. A full or unwritable disk, or a fault on the wire, becomes
    one `BloomJaxError` naming the place and, for a full disk given `needed_bytes`, what the write needed beside
    what is free."""

    def __init__(self, location: Location, overwrite: bool, needed_bytes: int | None = None):
        self.location, self.overwrite, self.lock = os.fspath(location), overwrite, None
        self.needed_bytes = needed_bytes
        if is_remote(location):
            storage.check_writable(location)
            refuse_non_empty(location, overwrite)
            self.root = self.location
            return
        final = local_path(location)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.lock = WriterLock(final)
        except OSError as e:
            raise BloomJaxError(f"cannot write in {final.parent}: {e.strerror}") from None
        try:
            refuse_non_empty(final, overwrite)
            if self.lock.held:  # unlocked, another writer's staging cannot be told from a dead one's
                remove_stale_staging(final)
            self.root = tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)
        except BaseException as e:
            self.lock.release()
            if isinstance(e, OSError):
                raise BloomJaxError(f"cannot write in {final.parent}: {e.strerror}") from None
            raise

    def __enter__(self) -> Destination:
        if is_remote(self.location) and self.overwrite:
            clear(self.location)
        self._echoes = FailureEchoesDropped().__enter__()
        return self

    def write_bytes(self, key: str, data: bytes) -> None:
        storage.write_bytes(join(self.root, key), data)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._echoes.__exit__(exc_type, exc, tb)  # kept after a failure: its futures report when collected
        if is_remote(self.location):
            if exc_type is not None:
                self._remove_remote_partial(exc)
            return
        final = local_path(self.location)
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

    def _remove_remote_partial(self, exc: BaseException) -> None:
        """What a failed write left at a URL goes (it lacks the files written last, so nothing would load it);
        after a fault on the wire it stays (removing it would meet the same fault), and the one line says so."""
        why = storage.wire_error(exc)
        if why is None:  # not the wire's fault (a bad tensor, Ctrl-C): the error goes on as it is
            with contextlib.suppress(BloomJaxError):
                storage.remove_tree(self.location)
            return
        message = str(exc) if isinstance(exc, BloomJaxError) else f"cannot write {self.location}: {why}"
        raise BloomJaxError(f"{message}; what was written is left there, incomplete (it does not load: write "
                            "again with --overwrite)") from None

    def _disk_message(self, final: Path, code: int) -> str:
        message = f"cannot write {final}: {DISK_ERRORS[code]} in {final.parent}"
        if self.needed_bytes:
            message += room(code, self.needed_bytes, final.parent)  # measured after the partial data went
        return message
