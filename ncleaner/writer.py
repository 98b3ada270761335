"""Writing outputs safely: shards, whole output directories, single files.

Three promises hold for everything ncleaner writes:

- nothing appears under its final name before it is complete (``atomic_write``,
  ``ShardFile``, ``StagedDir``), and a failed or interrupted write leaves no
  partial file behind where it can;
- the same input gives byte-identical shards: members are written with their
  names, bytes and order as read, and a fixed mtime, owner and mode;
- nothing of the user's is deleted: an output directory is replaced only when
  every file in it is one an earlier run of the same command recorded as its
  own, and never when it is, holds, or lies inside the directory of an input.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path

from .errors import NcleanerError, first_line
from .shards import Entry, RawSample, is_local, member_name

logger = logging.getLogger(__name__)

FIXED_MTIME = 0
MANIFEST = "manifest.json"
PARTIAL_PATTERN = ".*.partial"


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that is unique per process and call and records the pid, so
    that two runs never share one and a later run can tell whether its writer is still alive."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}")


def _left_by_dead_process(entry: Path) -> bool:
    """Whether a ``_sibling`` name belongs to a process that no longer exists."""
    pid = entry.name.rsplit(".", 2)[-2].split("-")[0]
    return pid.isdigit() and not _process_alive(int(pid))


def _temp_name(path: Path) -> Path:
    return _sibling(path, "partial")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename into ``path``: readers never see a half-written file."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from exc
        raise


def write_npy(path: str | Path, array) -> None:
    """Write ``array`` as ``.npy``, atomically (through a file object: ``np.save`` would add
    ``.npy`` to a temporary name)."""
    import numpy as np

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, save)


def remove_stale_partials(directory: str | Path, *, of: str | None = None) -> None:
    """Remove temporary files that killed runs left in ``directory`` (their process is gone); with
    ``of``, only those of that one file (a directory of the user's, where ``inspect`` writes).

    A live run's temporary files are left alone, so two runs can share a directory.
    """
    pattern = PARTIAL_PATTERN if of is None else f".{glob.escape(of)}.*.partial"
    for tmp in Path(directory).glob(pattern):
        if _left_by_dead_process(tmp):
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class ShardFile:
    """One tar shard written under a temporary name and renamed into place by ``close``.

    Members are written exactly as given: names (extension case, leading
    underscores and extension-less names included), bytes and order. Owner,
    mode and mtime are fixed so that the same samples give the same bytes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = _temp_name(self.path)
        try:
            self._file = open(self._tmp, "xb")
        except OSError as exc:
            raise output_error(self.path, exc) from exc
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, sample: dict) -> None:
        """Write one sample given as ``__key__`` plus ``extension -> bytes`` members."""
        key = sample["__key__"]
        self.write_entries(key, [Entry(ext, data) for ext, data in sample.items() if ext != "__key__"])

    def write_raw(self, raw: RawSample, replace: dict[str, bytes] | None = None) -> None:
        """Write a sample as it was read; ``replace`` swaps (or adds) members by extension."""
        replace = dict(replace or {})
        entries = [Entry(e.ext, replace.pop(e.ext), e.type, e.linkname) if e.ext in replace else e for e in raw.entries]
        self.write_entries(raw.key, entries + [Entry(ext, data) for ext, data in replace.items()])

    def write_entries(self, key: str, entries: Iterable[Entry]) -> None:
        """Write members of sample ``key`` in the order given."""
        for e in entries:
            info = tarfile.TarInfo(member_name(key, e.ext))
            info.type, info.linkname = e.type, e.linkname
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = FIXED_MTIME, 0o444, 0, 0, "", ""
            try:
                self._tar.addfile(info, io.BytesIO(e.data) if e.type == tarfile.REGTYPE else None)
            except OSError as exc:
                raise output_error(self.path, exc) from exc

    def close(self) -> Path:
        try:
            self._tar.close()
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise output_error(self.path, exc) from exc
            raise
        return self.path

    def abort(self) -> None:
        """Remove the partial file, even when closing it fails (a full disk fails the close too)."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()


class ShardPiece(ShardFile):
    """Samples written exactly as ``ShardFile`` writes them, remembering the byte offset where each
    one ends, so that ``write_shard_from_pieces`` can cut pieces written by many workers into the
    very shards one ``ShardSink`` would have written (``filter --engine ray``).

    A tar member's bytes do not depend on where it lies in the archive, so a sample copied
    from a piece into a shard is the same bytes ``ShardSink`` would have put there.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.ends: list[int] = []

    def write_entries(self, key: str, entries: Iterable[Entry]) -> None:
        super().write_entries(key, entries)
        self.ends.append(self._file.tell())


def shard_layout(pieces: Iterable[tuple[str | os.PathLike, list[int]]], maxcount: int) -> list[list[tuple]]:
    """The ``(piece, start, end)`` byte ranges of each shard ``ShardSink(maxcount)`` would write
    from the samples of ``pieces`` (each a path and its samples' end offsets), in order."""
    shards: list[list[tuple]] = []
    filled = maxcount  # the first sample opens a shard
    for path, ends in pieces:
        start = 0
        for i, end in enumerate(ends):
            if filled == maxcount:
                shards.append([])
                filled = 0
            run = shards[-1]
            if run and run[-1][0] == path and run[-1][2] == start:
                run[-1] = (path, run[-1][1], end)  # consecutive samples of one piece: one copy
            else:
                run.append((path, start, end))
            filled += 1
            start = ends[i]
    return shards


def write_shard_from_pieces(path: str | os.PathLike, ranges: Iterable[tuple]) -> Path:
    """Write the shard made of these ``(piece, start, end)`` byte ranges, ended as tarfile ends an
    archive (two zero blocks, then zeros up to a whole record), under a temporary name first."""

    def write(tmp: str) -> None:
        size = 0
        with open(tmp, "xb") as out:
            for piece, start, end in ranges:
                with open(piece, "rb") as f:
                    f.seek(start)
                    remaining = end - start
                    while remaining:
                        chunk = f.read(min(remaining, 1 << 22))
                        if not chunk:
                            raise NcleanerError(f"{piece}: ends before byte {end} (a piece changed while in use)")
                        out.write(chunk)
                        remaining -= len(chunk)
                size += end - start
            size += 2 * tarfile.BLOCKSIZE
            out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))

    atomic_write(path, write)
    return Path(path)


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

    def _next_shard(self) -> ShardFile:
        if self._shard is None or self._in_shard >= self.maxcount:
            self._finish()
            self._shard = ShardFile(self.out_dir / f"{len(self.paths):05d}.tar")
            self._in_shard = 0
        self._in_shard += 1
        self.count += 1
        return self._shard

    def write(self, sample: dict) -> None:
        """Write one sample: ``__key__`` plus ``extension -> bytes`` members."""
        self._next_shard().write(sample)

    def write_raw(self, raw: RawSample) -> None:
        """Write one sample exactly as it was read."""
        self._next_shard().write_raw(raw)

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


# -- output directories ------------------------------------------------------------------------


def check_outputs_apart_from_inputs(outputs: Iterable[str | Path | None], urls: Iterable[str]) -> None:
    """Refuse an output directory that is, holds, or lies inside the directory of an input shard.

    Checked before anything is read or written, so that no mistake on the command
    line can overwrite or delete a dataset.
    """
    input_dirs = {Path(u).resolve().parent for u in urls if is_local(u)}
    for out in outputs:
        if out is None:
            continue
        o = Path(out).resolve()
        for d in sorted(input_dirs):
            if o == d or d.is_relative_to(o) or o.is_relative_to(d):
                relation = "is" if o == d else "holds" if d.is_relative_to(o) else "lies inside"
                raise NcleanerError(
                    f"{out}: output directory {relation} the directory of input shards ({d}); choose another"
                )


def recorded_files(out: Path, command: str) -> set[str] | None:
    """The files an earlier run of ``command`` recorded in ``out/manifest.json`` (None: no such record)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("command") != command:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
        return None
    return {MANIFEST, *files}


def _owned_entries(out: Path, owned: Callable[[Path], set[str] | None], force: bool) -> list[Path]:
    """The entries of an existing ``out`` that may be replaced, or a one-line refusal."""
    entries = sorted(out.iterdir())
    if not entries:
        return []
    if not force:
        raise NcleanerError(f"{out}: directory is not empty (use --force to replace an earlier run's output)")
    names = owned(out)
    if names is None:
        raise NcleanerError(
            f"{out}: no record that ncleaner wrote what is there (no manifest of this command); "
            "refusing to replace it, choose another directory"
        )
    foreign = [e.name for e in entries if not e.is_file() or not (e.name in names or fnmatch(e.name, PARTIAL_PATTERN))]
    if foreign:
        raise NcleanerError(
            f"{out}: holds files ncleaner did not write ({', '.join(foreign[:3])}); "
            "refusing to replace it, choose another directory"
        )
    return entries


def replaceable_entries(final: Path, *, force: bool, owned: Callable[[Path], set[str] | None]) -> list[Path]:
    """What an output directory ``final`` holds that a run may replace, or the one-line refusal
    ``StagedDir`` would give; ``filter --dry-run`` calls it to fail where the real run would."""
    if final.exists() and not final.is_dir():
        raise NcleanerError(f"{final}: exists and is not a directory")
    return _owned_entries(final, owned, force) if final.is_dir() else []


class StagedDir:
    """An output directory built under a hidden sibling name and swapped in when complete.

    Until ``commit``, ``final`` is untouched: an interrupted or failed run leaves
    either no directory or the previous complete one, never a directory of
    finished-looking shards without a manifest. ``owned(dir)`` names the files of
    an existing ``final`` that an earlier run wrote; with ``force`` they (and only
    they) are replaced, and anything else in ``final`` is a refusal, checked
    before any work starts.
    """

    def __init__(self, final: str | Path, *, force: bool, owned: Callable[[Path], set[str] | None]):
        self.final = Path(final)
        self._replaced = replaceable_entries(self.final, force=force, owned=owned)
        self._remove_stale_stages()
        self.path = _sibling(self.final, "staging")
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise output_error(self.final, exc) from exc

    def _remove_stale_stages(self) -> None:
        """Staging directories of runs that were killed (their process is gone) hold only our files."""
        parent = self.final.parent
        if not parent.is_dir():
            return
        for stage in parent.glob(f".{self.final.name}.*.staging"):
            if _left_by_dead_process(stage):
                shutil.rmtree(stage, ignore_errors=True)

    def commit(self) -> Path:
        """Put the finished directory in place of ``final`` (and remove what it replaces)."""
        old = None
        try:
            if self.final.is_dir():
                old = _sibling(self.final, "replaced")
                os.replace(self.final, old)
            os.replace(self.path, self.final)
        except OSError as exc:
            if old is not None and not self.final.exists():
                os.replace(old, self.final)  # put the previous output back rather than leave none
            raise output_error(self.final, exc) from exc
        if old is not None:
            for e in self._replaced:
                (old / e.name).unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:
                logger.warning("%s: left in place, it gained files during the run", old)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        self.abort()
        if isinstance(exc, NcleanerError) and str(self.path) in str(exc):
            # Name the output the user asked for, not the hidden staging directory.
            raise NcleanerError(str(exc).replace(str(self.path), str(self.final))) from exc


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The Parquet footer key under which ncleaner records what a part was made from.
RECORD_KEY = b"ncleaner"


def with_record(table, record: dict):
    """``table`` (a pyarrow Table) with ``record`` in its Parquet metadata, as JSON."""
    return table.replace_schema_metadata({RECORD_KEY: json.dumps(record).encode()})


def parquet_record(metadata: dict | None, path: Path) -> dict:
    """What ``with_record`` recorded, from a part's Parquet metadata (empty for a part without one);
    one line naming ``path`` when it is not a JSON object."""
    raw = (metadata or {}).get(RECORD_KEY)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise NcleanerError(f"{path}: its ncleaner metadata is not JSON: {first_line(exc)}") from exc
    if not isinstance(info, dict):
        raise NcleanerError(f"{path}: its ncleaner metadata is not a JSON object")
    return info


def read_parquet_record(path: Path) -> dict:
    """``parquet_record`` of the part at ``path``, from its footer alone (no rows are read)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise NcleanerError(f"{path}: cannot read: {first_line(exc)}") from exc
    return parquet_record(metadata, path)


def output_error(path: str | Path, exc: OSError) -> NcleanerError:
    """One line naming an output path and why it cannot be written."""
    return NcleanerError(f"{path}: cannot write here: {exc.strerror or exc}")
