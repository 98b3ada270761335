"""The one exception type the CLI turns into a one-line message."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def printable(text: str) -> str:
    """``text`` with every character that is not printable (a newline, an escape sequence, a line
    separator) written as its Python escape, so that a name shown on one line stays on one line
    and cannot move the cursor; other unicode is kept as it is."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


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
