"""Running the `bloom-jax` command from the tests: in this process (`run_cli`), and the pieces of a run of
several processes (`free_port` for their coordinator, `WORKERS` where their scripts are)."""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

from bloom_jax.cli import main

# The scripts the tests start as child processes (fault_worker.py, multihost_worker.py, ...) sit beside this one.
WORKERS = Path(__file__).resolve().parent


def run_cli(*argv) -> tuple[int, str, str]:
    """`bloom-jax ARGV` in this process: (exit status, stdout, stderr), captured by redirection (so usable from
    module-scoped fixtures, unlike capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one line a failed command printed, asserted to be all of stderr and a `bloom-jax: error:` line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bloom-jax: error: "), err
    return lines[0]


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a multi-process run's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
