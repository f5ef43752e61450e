"""Full and unwritable disks: what they are called (`DISK_ERRORS`, by errno), which errors are theirs
(`disk_error`, also when TensorStore or Orbax only quote the OS), the one line a writer reports for them
(`write_failure`, `room`), and the echoes of such a failure that Orbax, TensorStore and asyncio print beside
it, dropped (`FailureEchoesDropped`). Data, metrics and checkpoints report their disk faults through it."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from pathlib import Path

from bloom_jax.errors import BloomJaxError

# What a full or unwritable disk is called, by errno and by the phrases TensorStore and Orbax quote the OS in.
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
_DISK_PHRASES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                 "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def disk_error(error: BaseException | None, where: str | os.PathLike | None = None) -> int | None:
    """The errno of a full or unwritable disk behind `error` (itself, or its causes, or quoted in their
    messages); None for any other error. A permission error counts only where it names `where` (given): reading
    an unreadable source file is not a destination's fault."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            code, text = error.errno, str(error.filename or "")
        else:
            text = str(error)
            code = next((code for phrase, code in _DISK_PHRASES.items() if phrase in text), None)
        if code is not None and (code != errno.EACCES or where is None or str(where) in text):
            return code
        error = error.__cause__ or error.__context__
    return None


def room(code: int, needed_bytes: int, where: Path, what: str = "it") -> str:
    """For a full disk (`code` ENOSPC or EDQUOT), " (WHAT needs about X MB, Y MB are free there)"; else ""."""
    if code not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    free = shutil.disk_usage(where).free
    return f" ({what} needs about {needed_bytes / 1e6:.1f} MB, {free / 1e6:.1f} MB are free there)"


def write_failure(error: OSError, path: Path) -> BaseException:
    """A full or unwritable disk met writing `path` as one `BloomJaxError` naming it (and, for a permission
    error, the directory it could not create); any other error as it is."""
    code = disk_error(error)
    if code is None:
        return error
    if code == errno.EACCES:
        creating = error.filename and Path(error.filename) in path.parents
        return BloomJaxError(f"cannot write {path}: permission denied" +
                             (f" (creating {error.filename})" if creating else ""))
    return BloomJaxError(f"cannot write {path}: {DISK_ERRORS[code]} in {path.parent}")


class FailureEchoesDropped:
    """While it lasts, drops what Orbax, TensorStore and asyncio print, beside the one error reported, about a
    write that a full or unwritable disk failed, or a read of a damaged checkpoint:

    - records of a disk error logged by absl (Orbax logs a failed save from each of its threads, tracebacks and
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
        self._filter = lambda record: not _of_a_disk_error(record)  # one per instance: each removes its own
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


def _of_a_disk_error(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return disk_error(error) is not None or disk_error(Exception(record.getMessage())) is not None
