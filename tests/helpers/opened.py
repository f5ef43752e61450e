"""The files this process opens while a test records them, for tests that a file is never read: `with OPENED as
paths: ...` (Python's "open" audit event: builtins.open, io.open, os.open)."""

from __future__ import annotations

import os
import sys


class OpenedFiles:
    """Records the paths opened inside its `with` block. Its audit hook, installed at the first use, stays for the
    process's life (Python removes none) and does nothing outside a block."""

    def __init__(self):
        self.paths: list[str] | None = None
        self.hooked = False

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and self.paths is not None:
            path = args[0]
            self.paths.append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path))

    def __enter__(self) -> list[str]:
        if not self.hooked:
            sys.addaudithook(self._hook)
            self.hooked = True
        self.paths = []
        return self.paths

    def __exit__(self, *exc) -> None:
        self.paths = None


OPENED = OpenedFiles()
