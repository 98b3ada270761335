"""Finding shards and reading raw samples from them (the reader stage).

A SHARDS argument may be a directory of ``.tar`` files, a glob, a brace pattern
(``data/{00000..00003}.tar``), a ``::``-separated list, or any URL / ``pipe:``
spec that webdataset opens. Samples come out with every member's bytes exactly
as stored, so the filter can write them back unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from .errors import NcleanerError

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_GLOB_CHARS = re.compile(r"[*?[]")


@dataclass
class RawSample:
    """One webdataset sample: its key, where it came from, and its members as stored."""

    key: str
    shard: str
    index: int
    members: dict[str, bytes] = field(default_factory=dict)


def expand_shards(specs: str | Iterable[str]) -> list[str]:
    """Turn one or more SHARDS arguments into the ordered list of shard URLs.

    Local files are checked here, so a typo fails before any work starts.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    urls: list[str] = []
    for spec in map(str, specs):
        if _REMOTE.match(spec) and not os.path.exists(spec):
            urls.extend(expand_urls(spec))
        elif os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not found:
                raise NcleanerError(f"{spec}: directory holds no .tar shards")
            urls.extend(found)
        elif _GLOB_CHARS.search(spec):
            found = sorted(glob.glob(spec))
            if not found:
                raise NcleanerError(f"{spec}: pattern matches no files")
            urls.extend(found)
        else:
            for url in expand_urls(spec):
                if not _REMOTE.match(url) and not os.path.isfile(url):
                    raise NcleanerError(f"{url}: no such shard file")
                urls.append(url)
    if not urls:
        raise NcleanerError("no shards given")
    return urls


def shard_names(urls: list[str]) -> list[str]:
    """A file-name stem per shard for per-shard outputs (``00001`` for ``.../00001.tar``).

    Stems that would collide (``a/0.tar`` and ``b/0.tar``) get a short hash of
    their URL so that no shard's output overwrites another's.
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
    last = re.split(r"[\s/]", url.rstrip("/ "))[-1] or "shard"
    last = re.sub(r"\.(tar|tgz|tar\.gz)$", "", last)
    return re.sub(r"[^A-Za-z0-9._-]", "_", last)


def read_shard(url: str) -> Iterator[RawSample]:
    """Yield the samples of one shard in order, members grouped by key.

    Suffixes keep their case (``lcase=False``), so a member is written back
    under exactly the name it had. Any failure to open or parse the tar becomes
    a one-line ``NcleanerError`` naming the shard.
    """
    try:
        streams = url_opener([{"url": url}])
        files = tar_file_expander(streams)
        for index, sample in enumerate(group_by_keys(files, lcase=False)):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            yield RawSample(key=sample["__key__"], shard=url, index=index, members=members)
    except NcleanerError:
        raise
    except Exception as exc:
        raise NcleanerError(f"{url}: cannot read shard: {_reason(exc)}") from exc


def read_shards(urls: Iterable[str]) -> Iterator[RawSample]:
    """The samples of several shards, one shard after the other, each in its own order."""
    for url in urls:
        yield from read_shard(url)


def _reason(exc: Exception) -> str:
    first = exc.args[0] if exc.args else ""
    text = str(first).split(" @ ")[0].strip() if first else type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        text = "no such file"
    return text.splitlines()[0] if text else type(exc).__name__
