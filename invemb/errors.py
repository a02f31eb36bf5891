"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""


class InvembError(ValueError):
    """A user-facing error: bad input, a missing file, an incompatible checkpoint."""
