"""Finding shards and reading raw samples from them (the reader stage).

A SHARDS argument may be a directory of ``.tar`` files, a glob, a brace pattern
(``data/{00000..00003}.tar``), a ``::``-separated list, or a URL / ``pipe:``
spec that webdataset opens. A ``pipe:`` spec runs a shell command, so only a
spec the user typed, and that is not an existing file, is ever treated as one:
every path that exists, or that came out of a directory listing, a glob or a
brace pattern, is opened as a local file.

Samples come out with every member exactly as stored (name, bytes, order), so
the filter can write them back unchanged. Members are grouped by the WebDataset
convention: the key is the member name up to the first dot of its file name,
and consecutive members with the same key form one sample. The reader never
drops a member: what cannot be a clean sample (unsafe names, links, duplicates,
a shard cut short) is reported through a status (``ncleaner.schema``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from braceexpand import braceexpand

from . import schema
from .errors import NcleanerError, UnreadableShard

logger = logging.getLogger(__name__)

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_GLOB_CHARS = re.compile(r"[*?[]")
# The names a directory listing takes as shards: every tar the reader opens when it is named
# (tarfile's "r|*" reads plain, gzip, bzip2 and xz tars alike), in any case ("00000.TAR").
SHARD_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)
# Longest stem kept whole in a per-shard output's name: with the hash it stays under 255 bytes.
_STEM_CHARS = 120
# Hard links in a stream that cannot be re-read are resolved from the most recent members.
_LINK_CACHE_BYTES = 64 << 20


@dataclass
class Entry:
    """One tar member of a sample: its name after the key, its bytes, and its tar type."""

    ext: str
    data: bytes
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


@dataclass
class RawSample:
    """One webdataset sample: its key, where it came from, and its members as stored.

    ``entries`` holds every member in tar order (what the filter writes back);
    ``members`` maps each extension to the bytes of its first regular member (what
    decoding reads). ``problem`` is a reader-level status when the sample cannot be
    a clean pair whatever its contents.
    """

    key: str
    shard: str
    index: int
    entries: list[Entry] = field(default_factory=list)
    problem: str | None = None

    @property
    def members(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for e in self.entries:
            if e.type == tarfile.REGTYPE:
                out.setdefault(e.ext, e.data)
        return out


def member_name(key: str, ext: str) -> str:
    """The tar member name of ``ext`` in sample ``key`` (the inverse of ``split_name``)."""
    return f"{key}.{ext}" if ext else key


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) by the WebDataset convention: the key ends at the first dot of the file name."""
    directory, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return directory + slash + stem, ext


# What a sample's members mean, read without decoding the image: decode, the embeddings check,
# filter and inspect all ask the same questions of a raw sample.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JSON_CAPTION_FIELDS = ("caption", "text")


def member_of(members: dict[str, bytes], extension: str) -> bytes | None:
    """The bytes of the member of this extension, in any case (``JPG`` is ``jpg``)."""
    for name, data in members.items():
        if name.lower() == extension:
            return data
    return None


def only_dotted(members: dict[str, bytes], extensions: Iterable[str]) -> bool:
    """Whether a wanted member only exists under a dotted name (``001.jpg`` in sample ``img``)."""
    return any(name.lower().endswith(f".{ext}") for name in members for ext in extensions)


def read_text_fields(raw: RawSample) -> tuple[str | None, str | None, dict, str]:
    """(caption, url, json metadata, status) of a sample, without touching its image."""
    meta: dict = {}
    json_status = schema.OK
    json_bytes = member_of(raw.members, "json")
    if json_bytes is not None:
        try:
            parsed = json.loads(json_bytes.decode("utf-8"))
            meta = parsed if isinstance(parsed, dict) else {}
        except (UnicodeDecodeError, ValueError, RecursionError):  # a deeply nested json overflows the parser
            json_status = schema.BAD_JSON
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    txt = member_of(raw.members, "txt")
    if txt is not None:
        try:
            caption = txt.decode("utf-8")
        except UnicodeDecodeError:
            # Shown in the report for the curator, never scored: replacement characters are not a caption.
            return txt.decode("utf-8", errors="replace"), url, meta, schema.BAD_CAPTION
        # A broken json does not matter when the txt member gives the caption.
        return (caption, url, meta, schema.OK) if caption.strip() else (None, url, meta, schema.MISSING_CAPTION)
    caption = next((meta[f] for f in JSON_CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
    if caption is not None and caption.strip():
        return caption, url, meta, json_status
    if json_status != schema.OK:
        return None, url, meta, json_status
    if only_dotted(raw.members, ("txt", "json")):
        return None, url, meta, schema.AMBIGUOUS_MEMBERS
    return None, url, meta, schema.MISSING_CAPTION


def image_member(raw: RawSample) -> bytes | None:
    """The bytes of the sample's image: its first jpg, jpeg, png or webp member."""
    members = raw.members
    return next((d for ext in IMAGE_EXTENSIONS if (d := member_of(members, ext)) is not None), None)


def sha1_of(data: bytes | None) -> str | None:
    """The hex SHA-1 of an image member's bytes (None for none): what identifies the image that an
    embedding or a score was computed from, without decoding it."""
    return None if data is None else hashlib.sha1(data).hexdigest()


def is_local(url: str) -> bool:
    """Whether ``url`` is opened as a local file: anything that exists, or has no URL scheme."""
    return os.path.exists(url) or not _REMOTE.match(url)


def _as_local(path: str) -> str:
    # A file literally named "pipe:rm -rf ~; x.tar" must never reach webdataset's opener as a
    # spec, even if it disappears before it is read: "./pipe:..." has no scheme.
    return os.path.join(".", path) if _REMOTE.match(path) else path


def expand_shards(specs: str | Iterable[str]) -> list[str]:
    """Turn one or more SHARDS arguments into the ordered list of shard URLs.

    Local files are checked here, so a typo fails before any work starts. Only a
    spec that is not an existing path and starts with a scheme (``pipe:``,
    ``http:``...) is kept as a URL; every local path that looks like one is
    returned as ``./name`` so that nothing downstream can mistake it for a command.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    urls: list[str] = []
    for spec in map(str, specs):
        if "::" in spec and not os.path.exists(spec):
            # Each part of a list is its own spec: "a.tar::b.tar" is two local files, not a URL scheme.
            urls.extend(expand_shards(spec.split("::")))
        elif os.path.isfile(spec):
            urls.append(_as_local(spec))
        elif os.path.isdir(spec):
            urls.extend(map(_as_local, _listed_shards(spec)))
        elif _REMOTE.match(spec):
            urls.extend(braceexpand(spec))
        elif _GLOB_CHARS.search(spec):
            found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise NcleanerError(f"{spec}: pattern matches no files")
            urls.extend(map(_as_local, found))
        else:
            for path in braceexpand(spec):
                if not os.path.isfile(path):
                    raise NcleanerError(f"{path}: no such shard file")
                urls.append(_as_local(path))
    if not urls:
        raise NcleanerError("no shards given")
    return urls


def _listed_shards(directory: str) -> list[str]:
    """The shard files of a directory, sorted; hidden names are not listed (nor are our own partial files)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not SHARD_SUFFIX.search(entry.name):
                continue
            if entry.is_file():
                found.append(entry.path)
            else:
                logger.warning("%s: not a file, so not a shard; skipped", entry.path)
    if not found:
        raise NcleanerError(f"{directory}: directory holds no shards (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)")
    return sorted(found)


def shard_names(urls: list[str]) -> list[str]:
    """A file-name stem per shard for per-shard outputs (``00001`` for ``.../00001.tar``).

    A stem is the shard's file name without its tar suffix, in characters safe in any file
    name; where that changed the name (spaces, unicode, a newline, a leading ``_`` or ``.``
    that pyarrow would skip), it gets a short hash of the name, so that names that differ
    never share a stem and ``a b.tar`` is still recognisable as ``a_b-1f2e3d4c``. Stems that
    would still collide (``a/0.tar`` and ``b/0.tar``) get a short hash of their URL so that
    no shard's output overwrites another's.
    """
    stems = [_stem(u) for u in urls]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [
        s if seen[s] == 1 else f"{s}-{hashlib.sha1(u.encode()).hexdigest()[:8]}"
        for s, u in zip(stems, urls, strict=True)
    ]


def _stem(url: str) -> str:
    path = url.rstrip("/")
    if not is_local(url):
        path = path.split()[-1] if path.split() else path  # a pipe: command's last word names its shard
    name = SHARD_SUFFIX.sub("", path.rsplit("/", 1)[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._")[:_STEM_CHARS] or "shard"
    if stem == name:
        return stem
    return f"{stem}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


class _EndAwareInfo(tarfile.TarInfo):
    """A TarInfo that records on its TarFile how the archive ended.

    tarfile treats a missing end-of-archive block, or a header cut short, as a
    normal end; we need to tell the two apart to report truncated shards.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.ncleaner_end = "complete"
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.ncleaner_end = "truncated"
            raise


# What a broken archive raises while it is read: tarfile's own errors, a compressed
# stream that ends early or is corrupt, and I/O errors of the file or pipe.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError)


class ShardReader:
    """The samples of one shard, in order: an iterator, read once.

    After iteration ``damage`` is None for an intact shard, or says where and why
    it ended early (no end-of-archive block, a member cut short, an unreadable
    header). Callers flag every sample of a damaged shard ``truncated_shard``,
    since the cut may have taken members of any of them. A shard that cannot be
    opened, or holds no readable tar header at all, raises ``NcleanerError``.
    """

    def __init__(self, url: str):
        self.url = url
        self.damage: str | None = None
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._offsets: dict[str, tuple[int, int]] = {}
        self._seekable = False
        self._samples_left: Iterator[RawSample] | None = None

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> RawSample:
        if self._samples_left is None:
            self._samples_left = self._read()
        return next(self._samples_left)

    def _read(self) -> Iterator[RawSample]:
        try:
            stream = open(self.url, "rb") if is_local(self.url) else _open_remote(self.url)
        except Exception as exc:
            raise UnreadableShard(f"{self.url}: cannot open shard: {_reason(exc)}") from exc
        try:
            yield from self._samples(stream)
        finally:
            try:
                stream.close()
            except Exception as exc:  # a pipe: command that exits non-zero is reported here
                if self.damage is None:
                    self.damage = f"the command failed: {_reason(exc)}"

    def _samples(self, stream) -> Iterator[RawSample]:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareInfo)
        except _READ_ERRORS as exc:
            raise UnreadableShard(f"{self.url}: cannot read shard: {_reason(exc)}") from exc
        # Offsets of an uncompressed local tar are file offsets: a hard link is re-read from there.
        self._seekable = is_local(self.url) and getattr(tar.fileobj, "comptype", None) == "tar"
        index, key, group = 0, None, []
        try:
            for info in tar:
                if info.isdir():
                    continue  # a directory entry carries no data and belongs to no sample
                name_key, ext = split_name(info.name)
                if key is not None and name_key != key:
                    yield self._sample(key, index, group)
                    index, group = index + 1, []
                # Set before the member is read: a sample whose first member is cut short
                # still gets its row, flagged, rather than vanishing.
                key = name_key
                entry = self._entry(tar, info, ext)
                group.append((info.name, entry))
                if len(entry.data) < info.size:
                    # Keep what was there (the rejected copy holds it), then end as a damaged shard.
                    raise tarfile.ReadError(f"{info.name} is cut short ({len(entry.data)} of {info.size} bytes)")
        except _READ_ERRORS as exc:
            self.damage = f"ends early: {_reason(exc)}"
        else:
            if getattr(tar, "ncleaner_end", None) != "complete":
                self.damage = f"ends early: no valid header or end-of-archive block at byte {tar.offset}"
        if key is not None:
            yield self._sample(key, index, group)
        if self.damage:
            count = index + (key is not None)
            logger.warning(
                "%s: %s; its %d sample(s) are flagged %s", self.url, self.damage, count, schema.TRUNCATED_SHARD
            )

    def _entry(self, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str) -> Entry:
        if info.isreg():
            if info.issparse():
                data = tar.extractfile(info).read()
            else:
                # Read directly rather than through extractfile, which raises on a short
                # read and loses the bytes that were there.
                tar.fileobj.seek(info.offset_data)
                data = tar.fileobj.read(info.size)
            self._remember(info, data)
            return Entry(ext, data)
        if info.islnk():
            data = self._link_target(info.linkname)
            if data is not None:
                return Entry(ext, data)  # written back as a regular file with the target's bytes
        return Entry(ext, b"", type=info.type, linkname=info.linkname)

    def _remember(self, info: tarfile.TarInfo, data: bytes) -> None:
        """Keep what a later hard link needs: the offset in a local file, else recent bytes."""
        if self._seekable:
            self._offsets[info.name] = (info.offset_data, info.size)
            return
        self._recent[info.name] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > _LINK_CACHE_BYTES and len(self._recent) > 1:
            self._recent_bytes -= len(self._recent.popitem(last=False)[1])

    def _link_target(self, name: str) -> bytes | None:
        if name in self._offsets:
            offset, size = self._offsets[name]
            with open(self.url, "rb") as f:
                f.seek(offset)
                return f.read(size)
        return self._recent.get(name)

    def _sample(self, key: str, index: int, group: list[tuple[str, Entry]]) -> RawSample:
        entries = [e for _, e in group]
        return RawSample(key=key, shard=self.url, index=index, entries=entries, problem=_problem(group))


def _problem(group: list[tuple[str, Entry]]) -> str | None:
    names = [name for name, _ in group]
    if any(name.startswith("/") or ".." in name.split("/") for name in names):
        return schema.UNSAFE_NAME
    for _, e in group:
        if e.type == tarfile.SYMTYPE:
            return schema.SYMLINK_MEMBER
        if e.type == tarfile.LNKTYPE:
            return schema.UNRESOLVED_LINK
        if e.type != tarfile.REGTYPE:
            return schema.SPECIAL_MEMBER
    if len(set(names)) != len(names):
        return schema.DUPLICATE_MEMBER
    return None


def _open_remote(url: str):
    # webdataset imports torch: only a URL or pipe: spec pays for it.
    from webdataset import gopen

    return gopen(url, "rb")


def json_uid(meta: dict) -> str | None:
    """The sample json's ``uid`` (DataComp's 128-bit hex id) when it is a string, else None."""
    uid = meta.get("uid")
    return uid if isinstance(uid, str) else None


def shard_fingerprint(url: str) -> list[int] | None:
    """A local shard's size and modification time: what a part made from it (embeddings, dedup
    hashes) is trusted by without reading the shard again; None for a URL or ``pipe:`` spec,
    which is read and checked instead."""
    try:
        st = os.stat(url)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def read_shard(url: str) -> ShardReader:
    """The samples of one shard, in order (see ``ShardReader`` for truncated shards)."""
    return ShardReader(url)


def read_shards(urls: Iterable[str]) -> Iterator[RawSample]:
    """The samples of several intact shards, one after the other.

    For callers that need every shard whole (noise injection, evaluation): a
    damaged shard raises ``NcleanerError`` once it has been read.
    """
    for url in urls:
        reader = ShardReader(url)
        yield from reader
        if reader.damage:
            raise NcleanerError(f"{url}: shard is damaged ({reader.damage})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    first = exc.args[0] if exc.args else ""
    text = str(first).split(" @ ")[0].strip() if first else type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
