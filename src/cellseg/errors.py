"""One exception type for expected failures (bad input, missing files): the CLI prints its message
as a single line and exits with status 2, never a traceback."""


class CellsegError(Exception):
    """An expected, user-facing failure. ``str(err)`` is the one-line message shown to the user."""
