"""Full and unwritable disks: what they are called (`DISK_ERRORS`, by errno), which errors are theirs
(`disk_error`, also when TensorStore or Orbax only quote the OS), the one line a writer reports for them
(`write_failure`, `room`). Data, metrics and checkpoints report their disk faults through it, and `storage`
the faults of any storage, disks and object stores alike."""

from __future__ import annotations

import errno
import os
import shutil
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
