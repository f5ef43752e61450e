"""The package's logger: messages on stderr, as the CLI, notebooks and scripts all want them.

`bloom_jax` logs through the standard `logging` module under the `bloom_jax` logger. It gets its own handler
(as transformers' loggers do), so that progress notes such as "resuming from step 500" show in a notebook or a
script without any logging set-up; `logging.getLogger("bloom_jax").setLevel(logging.WARNING)` quiets them.
"""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted: Jupyter and test capture replace it."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


_ROOT = logging.getLogger("bloom_jax")
if not _ROOT.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _ROOT.addHandler(_handler)
    _ROOT.setLevel(logging.INFO)
    _ROOT.propagate = False  # the handler above already prints; a configured root logger would print twice


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (`__name__`), under the package's logger."""
    return logging.getLogger(name)
