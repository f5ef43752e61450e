"""The exceptions a user sees as one line: mistakes they can fix, and runs that failed."""


class BloomJaxError(Exception):
    """A user-facing error (a bad path, config, checkpoint or flag): the CLI prints its message as one line on
    stderr and exits with status 2."""


class RunFailed(BloomJaxError):
    """A run that started correctly and then failed (a training loss that became NaN): exit status 1."""


class Terminated(BaseException):
    """SIGTERM arrived (`bloom_jax.cli` raises it from the signal): like KeyboardInterrupt, not an Exception, so
    that nothing catches it on the way out but the context managers that remove partial output. Exit status 143."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (a library's error, quoted inside ours), or its type's name."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
