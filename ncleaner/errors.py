"""The one exception type the CLI turns into a one-line message."""


class NcleanerError(Exception):
    """A user-facing failure: bad input, a missing file, a refused overwrite.

    The message names the file and the reason on one line; the CLI prints it
    without a traceback and exits non-zero.
    """
