"""A bloom-jax command that stops dead at a chosen point, for the fault tests to SIGKILL there, or that fills
a disk there.

Usage: fault_worker.py READY_FILE CALL MODULE:OWNER.METHOD [--fill DIR] -- ARGS...   (or MODULE:FUNCTION)

Runs `bloom-jax ARGS...` with MODULE's OWNER.METHOD (or FUNCTION) patched: its CALL-th call writes READY_FILE and
then sleeps until the process is killed, so that the test knows the command is mid-way (with whatever it has
staged) when it sends SIGKILL. With `--fill DIR`, the CALL-th call is made, and waited for if it is a method of
an object with `wait_until_finished` (an Orbax CheckpointManager's asynchronous save), then the disk of DIR is
filled to its last byte (`faults.fill`) and READY_FILE written, and the command goes on to meet the full disk.
"""

import functools
import importlib
import signal
import sys
import time
from pathlib import Path

from faults import fill

from bloom_jax.cli import main

# Ctrl-C raises KeyboardInterrupt here even when the suite was started in a shell's background, which leaves
# SIGINT ignored for its children.
signal.signal(signal.SIGINT, signal.default_int_handler)
ready, call, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options, args = sys.argv[4:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
fill_dir = Path(options[1]) if options[:1] == ["--fill"] else None
module_name, _, attribute = target.partition(":")
owner_name, _, method_name = attribute.rpartition(".")
owner = functools.reduce(getattr, owner_name.split(".") if owner_name else [], importlib.import_module(module_name))
original = getattr(owner, method_name)
calls = 0


def stop_here(*a, **kw):
    global calls
    calls += 1
    if calls != call:
        return original(*a, **kw)
    if fill_dir is None:
        Path(ready).write_text("stopped")
        while True:
            time.sleep(1)
    result = original(*a, **kw)
    if a and hasattr(a[0], "wait_until_finished"):
        a[0].wait_until_finished()
    fill(fill_dir)
    Path(ready).write_text("filled")
    return result


setattr(owner, method_name, stop_here)
sys.exit(main(args))
