"""Runs a command as a user for whom file permissions hold: `python unprivileged.py COMMAND ARGS...`.

Root ignores permission bits through two capabilities, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so a test
that `chmod`s a directory read-only proves nothing when it runs as root (CI does). Dropped from the bounding set
before `exec`, they are gone from the command's permitted set (a root process gets its bounding set on exec), and
`chmod` means to it what it means to anyone else. Run as another user, the command is simply executed.
"""

import ctypes
import os
import sys

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2

if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            sys.exit(f"unprivileged.py: cannot drop capability {capability}: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
