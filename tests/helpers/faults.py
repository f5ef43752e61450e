"""Faults for the tests to inject: a bloom-jax command in a child process stopped dead at a chosen call
(`fault_worker.py`), then signalled or SIGKILLed, or a disk filled at that call; small and read-only
filesystems; a child command for which `chmod` holds even under root (`unprivileged.py`)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("fault_worker.py")
UNPRIVILEGED = Path(__file__).with_name("unprivileged.py")
FILLER = ".filler"


def cli(*args, unprivileged: bool = False, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> tuple[int, str, str]:
    """`bloom-jax ARGS` in a child process: see `in_child`."""
    return in_child("-m", "bloom_jax.cli", *args, unprivileged=unprivileged, env=env, cwd=cwd)


def in_child(*args, unprivileged: bool = False, env: dict[str, str] | None = None, cwd: Path | None = None
             ) -> tuple[int, str, str]:
    """`python ARGS` in a child process (with `unprivileged`, one that permission bits stop even under root;
    `env` added to the environment; in `cwd`): (exit status, stdout, stderr). Skips the test where root cannot
    shed its permission overrides."""
    import pytest

    command = [sys.executable, *map(str, args)]
    done = subprocess.run([sys.executable, str(UNPRIVILEGED), *command] if unprivileged else command,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=cwd)
    if unprivileged and done.stderr.startswith("unprivileged.py: "):
        pytest.skip(done.stderr.strip())
    return done.returncode, done.stdout, done.stderr


def fill(directory: Path) -> None:
    """Fills the filesystem of `directory` to its last byte with DIRECTORY/.filler (a real ENOSPC for the next
    write that needs a block)."""
    fd = os.open(directory / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def stopped(tmp_path: Path, call: int, target: str, *args: str, filling: Path | None = None) -> subprocess.Popen:
    """`bloom-jax ARGS` in a child process, stopped dead at the `call`-th call of `target`, or, with `filling`,
    going on after that call with the disk of `filling` full (see fault_worker)."""
    ready, output = (tmp_path / f"{what}-{time.monotonic_ns()}" for what in ("ready", "output"))
    options = ["--fill", str(filling)] if filling is not None else []
    with open(output, "w") as log:  # a file, not a pipe: a chatty child would block on a full pipe
        child = subprocess.Popen([sys.executable, str(WORKER), str(ready), str(call), target, *options, "--", *args],
                                 stdout=log, stderr=subprocess.STDOUT)
    child.output_path = output
    deadline = time.monotonic() + 180
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait(30)
            raise AssertionError(f"the worker never reached call {call}: {output.read_text()[-2000:]}")
        time.sleep(0.05)
    return child


def finished(child: subprocess.Popen) -> tuple[int, str]:
    """Waits for a child of `stopped(..., filling=...)` to end: (its exit status, everything it printed)."""
    child.wait(600)
    return child.returncode, child.output_path.read_text()


def kill(child: subprocess.Popen) -> None:
    assert signalled(child, signal.SIGKILL)[0] == -signal.SIGKILL


def signalled(child: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Sends `signum` to a stopped child: (its exit status, everything it printed)."""
    child.send_signal(signum)
    child.wait(60)
    return child.returncode, child.output_path.read_text()


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` mounted at `where` for the block (a full disk, or with `read_only` an unwritable one);
    skips the test where it cannot be mounted (it needs root: CI runs as root)."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
