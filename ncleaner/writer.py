"""Writing samples to WebDataset shards, atomically and reproducibly.

Used by the filter (kept / rejected shards) and by the synthetic-data tools.
Values are written exactly as given (``encoder=False``), so bytes read from an
input shard reach the output unchanged; a fixed ``mtime`` makes the same input
give byte-identical shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from pathlib import Path

import webdataset as wds

from .errors import NcleanerError

FIXED_MTIME = 0.0


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename into ``path``: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    write(str(tmp))
    os.replace(tmp, path)


SHARD_OUTPUTS = ("[0-9][0-9][0-9][0-9][0-9].tar", ".*.partial", "manifest.json")


def prepare_output_dir(out_dir: str | Path, force: bool, owned: Sequence[str] = SHARD_OUTPUTS) -> Path:
    """Make sure ``out_dir`` can take a fresh output without losing anything of the user's.

    A non-empty directory is refused unless ``force``; even then only entries that
    match ``owned`` (files an earlier ncleaner run writes there) are removed, and a
    directory holding anything else is refused, so ``--force`` never deletes user data.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NcleanerError(f"{out}: exists and is not a directory")
    entries = list(out.iterdir()) if out.is_dir() else []
    if entries:
        if not force:
            raise NcleanerError(f"{out}: directory is not empty (use --force to overwrite)")
        foreign = [e.name for e in entries if not e.is_file() or not any(fnmatch(e.name, p) for p in owned)]
        if foreign:
            raise NcleanerError(
                f"{out}: holds files ncleaner did not write ({', '.join(sorted(foreign)[:3])}); "
                "refusing to overwrite, choose another directory"
            )
        for e in entries:
            e.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


class ShardFile:
    """One shard written under a temporary name and renamed into place by ``close``.

    An interrupted run never leaves a half shard with a final name (DESIGN.md section 5);
    ``abort`` removes the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=FIXED_MTIME)

    def write(self, sample: dict) -> None:
        """Write one sample: ``__key__`` plus ``extension -> bytes`` members."""
        self._writer.write(sample)

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()


class ShardSink:
    """Writes samples to ``DIR/{:05d}.tar`` shards of at most ``maxcount`` samples, each a ``ShardFile``."""

    def __init__(self, out_dir: str | os.PathLike, maxcount: int = 10_000):
        if maxcount < 1:
            raise ValueError("maxcount must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.maxcount = maxcount
        self.paths: list[Path] = []
        self.count = 0
        self._shard: ShardFile | None = None
        self._in_shard = 0

    def write(self, sample: dict) -> None:
        """Write one sample: ``__key__`` plus ``extension -> bytes`` members."""
        if self._shard is None or self._in_shard >= self.maxcount:
            self._finish()
            self._shard = ShardFile(self.out_dir / f"{len(self.paths):05d}.tar")
            self._in_shard = 0
        self._shard.write(sample)
        self._in_shard += 1
        self.count += 1

    def _finish(self) -> None:
        if self._shard is not None:
            self.paths.append(self._shard.close())
            self._shard = None

    def close(self) -> list[Path]:
        """Finish the current shard and return the paths of all shards written."""
        self._finish()
        return self.paths

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._shard is not None:
            self._shard.abort()
            self._shard = None
