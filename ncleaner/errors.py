"""The one exception type the CLI turns into a one-line message."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NcleanerError(Exception):
    """A user-facing failure: bad input, a missing file, a refused overwrite.

    The message names the file and the reason on one line; the CLI prints it
    without a traceback and exits non-zero.
    """


class UnreadableShard(NcleanerError):
    """A shard that cannot be opened, or holds no readable tar header at all.

    Commands stop at it, or skip and record it with ``--on-bad-shard skip``. A
    shard that is readable up to some point is not this: its samples are flagged
    ``truncated_shard`` instead.
    """
