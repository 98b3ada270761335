"""Writing samples to WebDataset shards, atomically and reproducibly.

Used by the filter (kept / rejected shards) and by the synthetic-data tools.
Values are written exactly as given (``encoder=False``), so bytes read from an
input shard reach the output unchanged; a fixed ``mtime`` makes the same input
give byte-identical shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import webdataset as wds

FIXED_MTIME = 0.0


class ShardSink:
    """Writes samples to ``DIR/{:05d}.tar`` shards of at most ``maxcount`` samples.

    Each shard is written under a temporary name and renamed when it is
    complete, so an interrupted run never leaves a half shard with a final name
    (DESIGN.md section 5).
    """

    def __init__(self, out_dir: str | os.PathLike, maxcount: int = 10_000):
        if maxcount < 1:
            raise ValueError("maxcount must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.maxcount = maxcount
        self.paths: list[Path] = []
        self.count = 0
        self._writer: wds.TarWriter | None = None
        self._in_shard = 0

    def write(self, sample: dict) -> None:
        """Write one sample: ``__key__`` plus ``extension -> bytes`` members."""
        if self._writer is None or self._in_shard >= self.maxcount:
            self._roll()
        self._writer.write(sample)
        self._in_shard += 1
        self.count += 1

    def _roll(self) -> None:
        self._finish()
        final = self.out_dir / f"{len(self.paths):05d}.tar"
        self._tmp = final.with_name(f".{final.name}.partial")
        self._final = final
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=FIXED_MTIME)
        self._in_shard = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self._final)
        self.paths.append(self._final)
        self._writer = None

    def close(self) -> list[Path]:
        """Finish the current shard and return the paths of all shards written."""
        self._finish()
        return self.paths

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            # Leave no partial shard behind when the run fails.
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None
