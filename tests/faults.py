"""Faults for the tests to inject: a bloom-jax command in a child process stopped dead at a chosen call
(`fault_worker.py`), then signalled or SIGKILLed; small and read-only filesystems."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("fault_worker.py")


def stopped(tmp_path: Path, call: int, target: str, *args: str) -> subprocess.Popen:
    """`bloom-jax ARGS` in a child process, stopped dead at the `call`-th call of `target` (see fault_worker)."""
    ready, output = (tmp_path / f"{what}-{time.monotonic_ns()}" for what in ("ready", "output"))
    with open(output, "w") as log:  # a file, not a pipe: a chatty child would block on a full pipe
        child = subprocess.Popen([sys.executable, str(WORKER), str(ready), str(call), target, "--", *args],
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
