"""The one exception type for mistakes a user can fix (bad paths, bad configs, bad checkpoints)."""


class BloomJaxError(Exception):
    """A user-facing error: the CLI prints its message as one line on stderr and exits non-zero."""
