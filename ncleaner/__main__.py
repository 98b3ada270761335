"""``python -m ncleaner``: the same command as ``ncleaner``."""

from .cli import main

main()
