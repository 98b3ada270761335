"""``dedup``: which samples of a pool repeat another's picture, and which one of each group stays.

DEDUP/<shard>.parquet holds one row per sample of the shard, in order, as a report part does:
``key``, ``shard``, ``index``, ``status``, ``image_sha1``, ``image_sha256``, ``dup_group`` (the
group's number, null for a sample with no duplicate), ``duplicate_of`` (``{shard, key}`` of the
group's representative; null for the representative itself and for unique samples),
``dup_kind`` (how this sample repeats the representative: ``exact``, ``near`` or ``semantic``)
and ``dup_similarity`` (its similarity to the representative in that kind's measure).
DEDUP/_<shard>.done.json marks each part, DEDUP/_dedup.json records the run (kinds, thresholds,
counts). ``filter --dedup DEDUP`` rejects every sample with a ``duplicate_of``.

Two passes (docs/design.md section 13):

1. Per shard, a ``HashJob`` (on either engine): each sample is decoded as ``score`` decodes it
   (same statuses), its image bytes hashed with SHA-256, and its pixels with a fingerprint
   (``fingerprint``): per view (the whole picture and eleven crops of it, ``VIEWS``), a 256-bit
   perceptual hash (pHash, ``imagehash``: the signs of the 16x16 lowest frequencies of the DCT
   of a 64x64 grey copy) and a 4x4 grid of mean colours, so that a copy cropped on any side
   meets one of the original's views. Kept in DEDUP/.hashes/<shard>.parquet, reused while the
   shard's size and mtime are unchanged.
2. The grouping, here, over every ok sample of the pool: ``exact`` groups equal SHA-256s;
   ``near`` links two samples whose hashes (the whole of one against the whole or a view of the
   other) agree in at least ``near_similarity`` of their 256 bits, with colours alike;
   ``semantic`` (opt-in) links two whose stored image embeddings have a cosine of at least
   ``semantic_threshold``. Links are searched
   within clusters (k-means, at most ``CLUSTER_SIZE`` samples on average; one cluster, that is
   every pair, for a pool that small), as SemDeDup does; a group is a connected component of
   the links. Its representative is the sample with the highest ``score`` of ``report`` when
   one is given (ties and unscored samples: the first in shard order), else the first in shard
   order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_NEAR_SIMILARITY
from .engine import DEFAULT_RUN, RunOptions, ShardJob, ShardTally, check_on_bad_shard, run_shard_jobs
from .errors import NcleanerError, UnreadableShard, first_line
from .shards import expand_shards, image_member, read_shard, shard_fingerprint, shard_names
from .writer import atomic_write, output_error, read_parquet_record, remove_stale_partials, with_record, write_json

logger = logging.getLogger(__name__)

KINDS = ("exact", "near", "semantic")
HASH_BITS = 256
# The centre crops hashed beside the whole picture: a copy cropped by up to (1 - c) / 2 a side
# is compared with the original's centre c.
# The views hashed beside the whole picture, as (left, top, right, bottom) fractions of it: its
# centre 92, 86 and 80 % (a copy cropped by 4 to 10 % on every side is, whole, one of them), and
# the picture less 7 % on one side or on two adjacent ones (a copy cropped on one side or at a
# corner). The whole of each picture is compared with every view of the other.
EDGE = 0.07
VIEWS = (
    *((m, m, 1 - m, 1 - m) for m in (0.04, 0.07, 0.10)),
    (EDGE, 0, 1, 1),
    (0, 0, 1 - EDGE, 1),
    (0, EDGE, 1, 1),
    (0, 0, 1, 1 - EDGE),
    (EDGE, EDGE, 1, 1),
    (0, EDGE, 1 - EDGE, 1),
    (EDGE, 0, 1, 1 - EDGE),
    (0, 0, 1 - EDGE, 1 - EDGE),
)
# A picture's colours, beside its grey hash: the mean colour of each cell of a 4 x 4 grid, per
# view. pHash sees grey levels only, so a green and a blue disc on one background hash alike;
# copies stay within an RMS difference of 5 (of 255) of their original's colours, pictures that
# differ in an object's colour are 19 and more apart (pipelines/benchmark_dedup.py).
COLOUR_GRID = 4
NEAR_COLOUR_RMS = 10.0
# A view whose cells' channels all lie within this of each other has no colour to compare.
GREY_SPREAD = 12.0
HASH_BYTES = HASH_BITS // 8
# Average samples a cluster when links are searched within clusters: the cost per sample grows
# with it (every pair within a cluster is compared), recall falls as it shrinks.
CLUSTER_SIZE = 1024
HASHES = ".hashes"
SUMMARY = "_dedup.json"  # "_": not a part, for pyarrow and DuckDB as for a report
# Rows of a cluster compared at once (a block of BLOCK x cluster similarities in memory).
BLOCK = 1024

# What both passes record of each sample, beside its key (a dedup part adds its shard after the key).
_SAMPLE_FIELDS = [
    pa.field("index", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("image_sha1", pa.string()),
    pa.field("image_sha256", pa.string()),
]
DEDUP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        *_SAMPLE_FIELDS,
        pa.field("dup_group", pa.int64()),
        pa.field("duplicate_of", pa.struct([pa.field("shard", pa.string()), pa.field("key", pa.string())])),
        pa.field("dup_kind", pa.string()),
        pa.field("dup_similarity", pa.float32()),
    ]
)
# The first pass's part, DEDUP/.hashes/<shard>.parquet.
_HASH_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), *_SAMPLE_FIELDS, pa.field("fingerprint", pa.binary())]  # ``fingerprint``
)


def fingerprint(image) -> bytes:
    """A decoded picture's near-duplicate fingerprint: per view (the whole, then each of ``VIEWS``)
    its 256-bit pHash, packed (32 bytes), then its ``COLOUR_GRID`` x ``COLOUR_GRID`` mean colours
    (48 bytes)."""
    import imagehash
    from PIL import Image

    w, h = image.size
    views = [image, *(image.crop((round(w * a), round(h * b), round(w * c), round(h * d))) for a, b, c, d in VIEWS)]
    parts = []
    for v in views:
        parts.append(np.packbits(imagehash.phash(v, hash_size=16).hash.ravel()).tobytes())
        parts.append(np.asarray(v.resize((COLOUR_GRID, COLOUR_GRID), Image.BOX), np.uint8).tobytes())
    return b"".join(parts)


def dedup_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(parquet part, finished marker) of one shard in a dedup directory."""
    return out_dir / f"{name}.parquet", out_dir / f"_{name}.done.json"


class HashJob(ShardJob):
    """The first pass, one shard: statuses, SHA-256 and perceptual hashes, written to DEDUP/.hashes/."""

    def _setup(self, out_dir: str, max_pixels: int) -> None:
        self.out, self.max_pixels = Path(out_dir) / HASHES, max_pixels

    def _shard(self, url: str, name: str) -> dict:
        from .decode import decode_stream

        path = self.out / f"{name}.parquet"
        made = {"shard": url, "fingerprint": shard_fingerprint(url), "max_image_pixels": self.max_pixels}
        if made["fingerprint"] is not None and path.is_file() and _made(path) == made:
            table = pq.read_table(path, columns=["status"])
            return {"shard": url, "statuses": dict(Counter(table.column("status").to_pylist())), "reused": True}
        rows = {"key": [], "index": [], "status": [], "image_sha1": [], "image_sha256": [], "fingerprint": []}
        reader = read_shard(url)
        try:
            # decode_pair hands the decoded picture to any transform: here the fingerprint, not a tensor.
            for pair in decode_stream(reader, fingerprint, max_pixels=self.max_pixels):
                data = image_member(pair.raw)
                rows["key"].append(pair.raw.key)
                rows["index"].append(pair.raw.index)
                rows["status"].append(pair.status)
                rows["image_sha1"].append(pair.image_sha1)
                rows["image_sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
                rows["fingerprint"].append(pair.image if pair.ok else None)
        except UnreadableShard as exc:
            return {"shard": url, "error": str(exc)}
        if reader.damage:
            # The cut may have taken members of any sample read: none of them is grouped.
            rows["status"] = [schema.TRUNCATED_SHARD] * len(rows["key"])
        table = with_record(pa.table(rows, schema=_HASH_SCHEMA), made)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return {"shard": url, "statuses": dict(Counter(rows["status"])), "damage": reader.damage}


def _made(path: Path) -> dict | None:
    """What a hash part records it was made from; None for a damaged one, which is hashed again."""
    try:
        return read_parquet_record(path)
    except NcleanerError:
        return None


@dataclass
class DedupResult(ShardTally):
    """What ``dedup`` found, per shard as ``ShardTally`` counts it; ``rehashed`` are the shards
    done now whose hashes were computed (the others' were reused)."""

    out_dir: Path
    rows: int = 0
    groups: int = 0
    duplicates: Counter = field(default_factory=Counter)  # non-representatives per dup_kind
    rehashed: list[str] = field(default_factory=list)


def dedup(
    shards: str | Iterable[str],
    out_dir: str | Path,
    *,
    near: bool = True,
    near_similarity: float = DEFAULT_NEAR_SIMILARITY,
    semantic_threshold: float | None = None,
    embeddings: str | Path | None = None,
    report: str | Path | None = None,
    cluster_size: int = CLUSTER_SIZE,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    on_bad_shard: str = "fail",
    run: RunOptions = DEFAULT_RUN,
) -> DedupResult:
    """Find the duplicates among ``shards`` and write the dedup directory ``out_dir``.

    Args:
        shards: SHARDS in any form ``expand_shards`` takes.
        out_dir: the dedup directory (layout in this module's docstring). Hashes of shards
            unchanged since an earlier run are reused; the grouping is done again over the pool.
        near: also group near duplicates (re-encoded, resized, slightly cropped copies).
        near_similarity: the share of the 256 perceptual-hash bits two near duplicates agree in.
        semantic_threshold: also group samples whose image embeddings (``embeddings``) have at
            least this cosine (SemDeDup): distinct pictures of one thing, by design; None: off.
        embeddings: the embeddings directory ``ncleaner embed`` wrote for these shards (needed
            by ``semantic_threshold``).
        report: a report of these shards: each group's representative is its best ``score``.
        cluster_size: samples a cluster on average when links are searched within clusters:
            each sample is compared with about this many others (the cost), and links between
            clusters are not searched (the recall; measured in pipelines/benchmark_dedup.py).
        max_image_pixels: larger images are not decoded (status ``too_large``, not grouped).
        on_bad_shard: ``fail`` stops at an unreadable shard; ``skip`` lists it and goes on (no
            part is written, and no sample of it is grouped).
        run: where the first pass runs (``RunOptions``: local or one job per shard on Ray).
    """
    check_on_bad_shard(on_bad_shard)
    run.check()
    if cluster_size < 2:
        raise NcleanerError(f"--cluster-size {cluster_size}: must be 2 or more")
    if not 0 < near_similarity <= 1:
        raise NcleanerError(f"--near-similarity {near_similarity}: must be in (0, 1]")
    if semantic_threshold is not None:
        if not -1 <= semantic_threshold <= 1:
            raise NcleanerError(f"--semantic {semantic_threshold}: a cosine, in [-1, 1]")
        if embeddings is None:
            raise NcleanerError("--semantic needs --embeddings DIR (ncleaner embed's output for these shards)")
    urls = expand_shards(shards)
    names = shard_names(urls)
    out = Path(out_dir)
    try:
        (out / HASHES).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    remove_stale_partials(out)
    remove_stale_partials(out / HASHES)
    store = _open_store(embeddings) if semantic_threshold is not None else None
    scores = _report_scores(Path(report), urls, names) if report is not None else {}

    result = DedupResult(out_dir=out)
    todo = list(zip(urls, names, strict=True))
    answers = run_shard_jobs(HashJob, (str(out), max_image_pixels), todo, run=run, desc="hashing")
    for url, name in todo:
        answer = answers[name]
        if result.count(answer, on_bad_shard=on_bad_shard, log=logger) and not answer.get("reused"):
            result.rehashed.append(url)
    done = [(url, name) for url, name in todo if url not in result.unreadable_shards]
    pool = _Pool.read(out, done, scores)
    links = _Links(pool.n)
    links.add("exact", *pool.exact_pairs())
    if near:
        links.add("near", *pool.near_pairs(near_similarity, cluster_size))
    if store is not None:
        links.add("semantic", *pool.semantic_pairs(store, semantic_threshold, cluster_size, max_image_pixels))
    groups = pool.groups(links)
    for (url, name), part in zip(done, pool.parts(groups), strict=True):
        target, marker = dedup_paths(out, name)
        atomic_write(target, lambda tmp, t=part: pq.write_table(t, tmp))
        kinds = Counter(k for k in part.column("dup_kind").to_pylist() if k is not None)
        write_json(marker, {"shard": url, "rows": part.num_rows, "duplicates": dict(kinds)})
        result.rows += part.num_rows
        result.duplicates.update(kinds)
    result.groups = groups.count
    write_json(
        out / SUMMARY,
        {
            "shards": [url for url, _ in done],
            "kinds": ["exact", *(["near"] if near else []), *(["semantic"] if store is not None else [])],
            "near_similarity": near_similarity if near else None,
            "semantic_threshold": semantic_threshold,
            "embeddings": str(embeddings) if embeddings is not None else None,
            "representative": "highest score of " + str(report) if report is not None else "first in shard order",
            "rows": result.rows,
            "groups": result.groups,
            "duplicates": dict(result.duplicates),
            "unreadable_shards": result.unreadable_shards,
        },
    )
    return result


def _open_store(embeddings):
    from .embeddings import INFO_FILE, EmbeddingStore

    info_path = Path(embeddings) / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise NcleanerError(
            f"{info_path}: cannot read ({first_line(exc)}); dedup reads ncleaner embed's output"
        ) from exc
    return EmbeddingStore.open(embeddings, info, create=False)


def _report_scores(report: Path, urls: list[str], names: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per shard, its report rows' keys and ``score`` (-inf where none, so that an unscored sample
    ranks last), to pick representatives by."""
    scores = {}
    for url, name in zip(urls, names, strict=True):
        part, marker = schema.report_paths(report, name)
        table = _read_part(part, marker, ["key", "score"], f"report part for shard {url}", "score")
        values = table.column("score").to_numpy(zero_copy_only=False)
        scores[url] = (table.column("key").to_pylist(), np.where(np.isnan(values), -np.inf, values))
    return scores


class _Links:
    """Pairs of pool rows found alike, by kind, with their similarity."""

    def __init__(self, n: int):
        self.n = n
        self.pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, kind: str, i: np.ndarray, j: np.ndarray, similarity: np.ndarray) -> None:
        self.pairs[kind] = (i, j, similarity)
        logger.info("%s: %d pair(s) of samples linked", kind, len(i))

    def components(self, kinds: Iterable[str]) -> np.ndarray:
        """Per row, the connected component of the links of ``kinds``."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        chosen = [self.pairs[k] for k in kinds if k in self.pairs]
        i = np.concatenate([c[0] for c in chosen]) if chosen else np.zeros(0, np.int64)
        j = np.concatenate([c[1] for c in chosen]) if chosen else np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(self.n, self.n))
        return connected_components(graph, directed=False)[1]


@dataclass
class _Groups:
    rep: np.ndarray  # per row: its group's representative row, or -1 (no duplicate)
    number: np.ndarray  # per row: its group's number, or -1
    kind: list  # per row: how it repeats its representative (None for representatives and unique rows)
    similarity: np.ndarray  # per row: to its representative (NaN where none)
    count: int


class _Pool:
    """Every sample of the pool's hash parts, in input order: what the grouping reads."""

    def __init__(self, parts: list[tuple[str, str, pa.Table]], scores: dict):
        self.parts_in = parts
        self.shard_of = np.concatenate([np.full(t.num_rows, s, np.int64) for s, (_, _, t) in enumerate(parts)] or [[]])
        columns = {c: [v for _, _, t in parts for v in t.column(c).to_pylist()] for c in ("key", "status")}
        self.keys, self.statuses = columns["key"], columns["status"]
        self.n = len(self.keys)
        self.ok = np.array([s == schema.OK for s in self.statuses], dtype=bool)
        self.sha256 = [v for _, _, t in parts for v in t.column("image_sha256").to_pylist()]
        self.score = np.full(self.n, -np.inf)
        # Per pool row, the position of its image embedding in ``embeddings`` (-1: none read).
        self.embedded_at = np.full(self.n, -1, np.int64)
        self.embeddings = np.zeros((0, 0), np.float16)
        self._prints: Prints | None = None
        start = 0
        for url, _, t in parts:
            if url in scores:
                keys, values = scores[url]
                if keys != t.column("key").to_pylist():
                    raise NcleanerError(f"{url}: the report's rows are not this shard's samples (score it again)")
                self.score[start : start + t.num_rows] = values
            start += t.num_rows

    @classmethod
    def read(cls, out: Path, done: list[tuple[str, str]], scores: dict) -> _Pool:
        parts = [(url, name, pq.read_table(out / HASHES / f"{name}.parquet")) for url, name in done]
        return cls(parts, scores)

    def exact_pairs(self):
        rows = np.flatnonzero(self.ok)
        _, first, inverse = np.unique(np.array([self.sha256[r] for r in rows], dtype=object).astype(str),
                                      return_index=True, return_inverse=True)  # fmt: skip
        i, j = rows, rows[first[inverse]]
        keep = i != j
        return i[keep], j[keep], np.ones(int(keep.sum()), np.float32)

    def prints(self) -> Prints:
        """The ok rows' fingerprints, unpacked (read once)."""
        if self._prints is None:
            rows = np.flatnonzero(self.ok)
            stored = [v for _, _, t in self.parts_in for v in t.column("fingerprint").to_pylist()]
            self._prints = Prints.unpack(rows, [stored[r] for r in rows])
        return self._prints

    def near_pairs(self, similarity: float, cluster_size: int):
        prints = self.prints()
        n = len(prints.rows)
        i, j, s = linked_in_clusters(
            n, prints.signs, prints.features, prints.similarity, similarity, cluster_size, views=prints.views
        )
        return prints.rows[i], prints.rows[j], s

    def semantic_pairs(self, store, threshold: float, cluster_size: int, max_pixels: int):
        vectors, rows = [], []
        start = 0
        for index, (url, name, t) in enumerate(self.parts_in):
            features = store.read(name, url, index, max_pixels=max_pixels)
            ok = np.flatnonzero(features.ok)
            if features.keys != t.column("key").to_pylist():
                raise NcleanerError(f"{store.root}: its part for {url} is not this shard's samples (embed it again)")
            picked = ok[self.ok[start + ok]]
            vectors.append(features.f_v[np.searchsorted(ok, picked)])
            rows.append(start + picked)
            start += t.num_rows
        x = np.concatenate(vectors).astype(np.float16)  # as stored: half the memory of float32
        rows = np.concatenate(rows)

        def rows_of(_view, idx):
            return x[idx].astype(np.float32)

        i, j, s = linked_in_clusters(
            len(x), rows_of, lambda idx: (rows_of(0, idx),), lambda a, b: a[0] @ b[0].T, threshold, cluster_size
        )
        self.embedded_at[rows], self.embeddings = np.arange(len(rows)), x
        return rows[i], rows[j], s

    def groups(self, links: _Links) -> _Groups:
        every = links.components(KINDS)
        exact_near = links.components(("exact", "near"))
        # The representative: best score, then first in input order (a stable sort of -score).
        order = np.lexsort((np.arange(self.n), -self.score))
        rep_of_component = {}
        for r in order.tolist():
            rep_of_component.setdefault(every[r], r)
        sizes = np.bincount(every, minlength=self.n)
        rep = np.full(self.n, -1, np.int64)
        number = np.full(self.n, -1, np.int64)
        kind: list = [None] * self.n
        similarity = np.full(self.n, np.nan, np.float32)
        grouped = sorted((r, c) for c, r in rep_of_component.items() if sizes[c] > 1)
        numbers = {c: g for g, (_, c) in enumerate(grouped)}
        for r in np.flatnonzero(sizes[every] > 1).tolist():
            p = rep_of_component[every[r]]
            rep[r], number[r] = p, numbers[every[r]]
            if r == p:
                continue
            if self.sha256[r] == self.sha256[p]:
                kind[r], similarity[r] = "exact", 1.0
            elif exact_near[r] == exact_near[p]:
                prints = self.prints()
                kind[r] = "near"
                # Both are ok rows, so in ``prints.rows`` (ascending): found by binary search.
                pair = [prints.features(np.searchsorted(prints.rows, [q])) for q in (r, p)]
                similarity[r] = prints.similarity(*pair)[0, 0]
            else:
                kind[r] = "semantic"
                a, b = self.embedded_at[r], self.embedded_at[p]
                if a >= 0 and b >= 0:
                    similarity[r] = float(self.embeddings[a].astype(np.float32) @ self.embeddings[b].astype(np.float32))
        return _Groups(rep, number, kind, similarity, len(grouped))

    def parts(self, groups: _Groups) -> Iterable[pa.Table]:
        """Per shard, its part of the dedup directory."""
        start = 0
        for url, _, t in self.parts_in:
            rows = range(start, start + t.num_rows)
            here = slice(start, start + t.num_rows)
            start += t.num_rows
            duplicate_of = [
                {"shard": self.parts_in[self.shard_of[groups.rep[r]]][0], "key": self.keys[groups.rep[r]]}
                if groups.kind[r] is not None
                else None
                for r in rows
            ]
            columns = {
                "key": t.column("key"),
                "shard": [url] * t.num_rows,
                "index": t.column("index"),
                "status": t.column("status"),
                "image_sha1": t.column("image_sha1"),
                "image_sha256": t.column("image_sha256"),
                "dup_group": pa.array(groups.number[here], mask=groups.number[here] < 0),
                "duplicate_of": duplicate_of,
                "dup_kind": groups.kind[here],
                "dup_similarity": pa.array(groups.similarity[here], mask=np.isnan(groups.similarity[here])),
            }
            yield pa.table([columns[f.name] for f in DEDUP_SCHEMA], schema=DEDUP_SCHEMA)


@dataclass
class Prints:
    """Fingerprints of pool rows as stored (``fingerprint``: uint8 of shape (rows, views, 80)),
    unpacked only for the rows being compared, so that the pool costs 960 bytes a sample."""

    rows: np.ndarray
    raw: np.ndarray

    @classmethod
    def unpack(cls, rows: np.ndarray, stored: list[bytes]) -> Prints:
        per_view = HASH_BYTES + 3 * COLOUR_GRID**2
        return cls(rows, np.frombuffer(b"".join(stored), np.uint8).reshape(len(rows), -1, per_view))

    @property
    def views(self) -> int:
        return self.raw.shape[1]

    def signs(self, view: int, idx) -> np.ndarray:
        """The hash bits of view ``view`` of rows ``idx`` as +-1 (float32, (len(idx), 256))."""
        return np.unpackbits(self.raw[idx, view, :HASH_BYTES], axis=1).astype(np.float32) * 2 - 1

    def features(self, idx) -> tuple[np.ndarray, ...]:
        """Rows ``idx`` (positions in ``rows``) unpacked for ``similarity``: hash bits as +-1
        (float32, (len, views, 256)); per view, the colour grid (48 values) and its grey levels
        (16), each with its squared norm; and whether the view has no colour (a grey picture)."""
        signs = np.unpackbits(self.raw[idx, :, :HASH_BYTES], axis=2).astype(np.float32) * 2 - 1
        cells = self.raw[idx, :, HASH_BYTES:].astype(np.float32).reshape(len(signs), self.views, -1, 3)
        grey = cells @ np.array([0.299, 0.587, 0.114], np.float32)
        colourless = (cells.max(axis=3) - cells.min(axis=3)).max(axis=2) <= GREY_SPREAD
        colours = cells.reshape(len(signs), self.views, -1)
        return signs, colours, (colours**2).sum(2), grey, (grey**2).sum(2), colourless

    @staticmethod
    def similarity(fa, fb) -> np.ndarray:
        """Share of agreeing hash bits between the rows of ``features`` ``fa`` and those of ``fb``:
        the best over the view pairs (whole against whole, whole of one against a view of the
        other) whose colours are within ``NEAR_COLOUR_RMS`` (their grey levels, where either view
        has no colour: a grey copy of a colour picture); 0 where none is."""
        sa, ca, na, ga, gna, za = fa
        sb, cb, nb, gb, gnb, zb = fb
        best = np.zeros((len(sa), len(sb)), np.float32)
        views = sa.shape[1]
        for u, v in [(0, 0)] + [(0, k) for k in range(1, views)] + [(k, 0) for k in range(1, views)]:
            agree = (sa[:, u] @ sb[:, v].T / HASH_BITS + 1) / 2
            rgb = (na[:, u, None] + nb[None, :, v] - 2 * ca[:, u] @ cb[:, v].T) / ca.shape[2]
            grey = (gna[:, u, None] + gnb[None, :, v] - 2 * ga[:, u] @ gb[:, v].T) / ga.shape[2]
            apart = np.where(za[:, u, None] | zb[None, :, v], grey, rgb) > NEAR_COLOUR_RMS**2
            agree[apart] = 0
            np.maximum(best, agree, out=best)
        return best


# k-means is fitted on at most this many rows (then every row is assigned): the centroids of a
# pool's sample place its clusters as well, at a fraction of the memory and time.
KMEANS_SAMPLE = 200_000
# Rows assigned to their nearest centroid at a time.
ASSIGN_CHUNK = 65_536


def linked_in_clusters(
    n: int, vectors, features, similarity, threshold: float, cluster_size: int = CLUSTER_SIZE, *, views: int = 1
):
    """Pairs (i < j) of the ``n`` rows whose ``similarity(features(rows_a), features(rows_b))`` (a
    matrix) reaches ``threshold``, searched within k-means clusters of ``cluster_size`` rows on
    average. ``features(rows)`` is a tuple of arrays whose first axis is ``rows``, made once per
    cluster.

    ``vectors(view, rows)`` gives the float32 vectors of ``rows`` that clustering places: k-means
    is fitted on the first view of a sample of rows, and each row joins the cluster nearest to
    each of its ``views`` (the centre views of a picture: a cropped copy's whole view lies near
    its original's centre, which may fall in another cluster than the original's whole view), so
    a pair meets in a cluster when any view of one lies in the cluster of a view of the other.
    """
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    k = max(1, n // cluster_size)
    if k == 1:
        rows, labels = np.arange(n), np.zeros(n, np.int64)
    else:
        from sklearn.cluster import MiniBatchKMeans

        sample = np.random.default_rng(0).choice(n, size=min(n, KMEANS_SAMPLE), replace=False)
        kmeans = MiniBatchKMeans(n_clusters=k, random_state=0, n_init=3, batch_size=4096).fit(
            vectors(0, np.sort(sample))
        )
        chunks = [np.arange(s, min(n, s + ASSIGN_CHUNK)) for s in range(0, n, ASSIGN_CHUNK)]
        rows = np.concatenate([c for _ in range(views) for c in chunks])
        labels = np.concatenate([kmeans.predict(vectors(v, c)) for v in range(views) for c in chunks])
    order = np.argsort(labels, kind="stable")
    rows, labels = rows[order], labels[order]
    bounds = np.searchsorted(labels, np.arange(k + 1))
    found_i, found_j, found_s = [], [], []
    for c in range(k):
        members = np.unique(rows[bounds[c] : bounds[c + 1]])
        made = features(members)
        for start in range(0, len(members), BLOCK):
            a = members[start : start + BLOCK]
            b = members[start:]  # pairs within the block and with every later member
            s = similarity(tuple(f[start : start + BLOCK] for f in made), tuple(f[start:] for f in made))
            ii, jj = np.nonzero(s >= threshold)
            later = jj > ii  # b starts at a[0]: column j is row b[j]; keep each pair once, i < j
            found_i.append(a[ii[later]])
            found_j.append(b[jj[later]])
            found_s.append(s[ii[later], jj[later]].astype(np.float32))
    i, j, s = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    # A pair met in two clusters is one link.
    _, first = np.unique(i * n + j, return_index=True)
    return i[first], j[first], s[first]


def load_groups(dedup_dir: str | Path, reports: dict, columns: list[str]) -> dict[str, pa.Table]:
    """Per shard of ``reports`` (url -> its report rows), its dedup part's ``columns``, row for
    row with the report; a part made from other samples than the report's (keys or image hashes
    differ) is one line."""
    d = Path(dedup_dir)
    if not (d / SUMMARY).is_file():
        raise NcleanerError(f"{d}: not a dedup directory (no {SUMMARY}; run ncleaner dedup)")
    urls = list(reports)
    groups = {}
    for url, name in zip(urls, shard_names(urls), strict=True):
        part, marker = dedup_paths(d, name)
        wanted = ["key", "image_sha1", *(c for c in columns if c not in ("key", "image_sha1"))]
        table = _read_part(part, marker, wanted, f"dedup part for shard {url}", "dedup")
        report = reports[url]
        same = table.column("key").to_pylist() == report["key"].tolist()
        if same and "image_sha1" in report.columns:
            same = table.column("image_sha1").to_pylist() == report["image_sha1"].tolist()
        if not same:
            raise NcleanerError(f"{part}: made from other samples than the report's for {url} (run dedup again)")
        groups[url] = table.select(columns)
    return groups


def load_duplicates(dedup_dir: str | Path, reports: dict) -> dict[str, set[int]]:
    """Per shard of ``reports``, the rows ``filter --dedup`` rejects: those whose group's
    representative is another sample (``load_groups``; only the columns that decide it are read)."""
    return {
        url: set(np.flatnonzero(t.column("duplicate_of").is_valid().to_numpy(zero_copy_only=False)).tolist())
        for url, t in load_groups(dedup_dir, reports, ["duplicate_of"]).items()
    }


def _read_part(part: Path, marker: Path, columns: list[str], what: str, command: str) -> pa.Table:
    """The ``columns`` of a finished part (its marker written), or one line saying what is missing."""
    if not marker.is_file():
        raise NcleanerError(f"{part}: no finished {what} (run ncleaner {command} on it)")
    try:
        return pq.read_table(part, columns=columns)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet, or lacks a column
        raise NcleanerError(f"{part}: cannot read {what}: {first_line(exc)}") from None
