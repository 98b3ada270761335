"""Backbone features written once and read back by every later run (docs/design.md section 10).

An embeddings directory has the layout clip-retrieval writes and LAION publishes::

    EMB/img_emb/img_emb_{N}.npy          float16, L2-normalised, one row per ok pair
    EMB/text_emb/text_emb_{N}.npy        same rows, text side
    EMB/metadata/metadata_{N}.parquet    image_path (= the sample key), caption, url, shard, index,
                                         status, json, image_sha1: row i is row i of both arrays
    EMB/skipped/skipped_{N}.parquet      the samples that have no embedding, with their status
    EMB/embeddings.json                  backbone, pretrained tag or checkpoint hash, dim, dtype

ncleaner writes one part per input shard, N being the shard's name (as for report
parts), metadata last, so a part whose metadata exists is complete and an
interrupted ``embed`` resumes shard by shard. A part answers for the bytes it was
computed from, not for the name: rows are joined to samples on the sample key,
never on position, and a part is used only when every sample of the shard has its
row with the same caption and image SHA-1, it was made under the same
``--max-image-pixels`` rule, and its vectors are finite. Any other part is stale
(``StalePart``): encoded again and replaced where ncleaner wrote the directory,
refused where it cannot replace it. img2dataset names every pool's shards
``00000.tar``, ``00001.tar``...: another pool's ``00000.tar`` is the case this guards.

Directories written by clip-retrieval itself (no ``embeddings.json``, several
input shards per part, no shard column) are read too when the caller names the
backbone they came from; their rows are joined on the key, and the caption is
checked where they store one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from . import __version__, schema
from .backbone import build_backbone, checkpoint_sha256, download_reason, resolve_device
from .config import DEFAULT_MAX_IMAGE_PIXELS, typed_json
from .decode import by_shard, decode_blocks, image_size
from .encode import Encoder
from .engine import DEFAULT_RUN, RunOptions, ShardJob, ShardTally, check_on_bad_shard, run_shard_jobs, worker_device
from .errors import NcleanerError, UnreadableShard, first_line
from .shards import (
    expand_shards,
    image_member,
    read_shard,
    read_text_fields,
    sha1_of,
    shard_fingerprint,
    shard_names,
)
from .writer import (
    atomic_write,
    output_error,
    parquet_record,
    read_parquet_record,
    remove_stale_partials,
    with_record,
    write_json,
    write_npy,
)

logger = logging.getLogger(__name__)

INFO_FILE = "embeddings.json"
PART_FOLDERS = ("img_emb", "text_emb", "metadata", "skipped")
DTYPE = "float16"
META_FIELDS = [
    pa.field("image_path", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("index", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("json", pa.string()),
    pa.field("image_sha1", pa.string()),
]
META_SCHEMA = pa.schema(META_FIELDS)


def backbone_identity(backbone: str, pretrained: str | None, dim: int) -> dict:
    """What makes two sets of features comparable: the backbone, its weights, their width.

    A checkpoint file is identified by its SHA-256 (the same weights under another path
    match; other weights under the same path do not); a pretrained tag by its name.
    """
    identity = {"backbone": backbone, "pretrained": pretrained, "dim": dim}
    if pretrained and os.path.isfile(pretrained):
        identity.update(pretrained=os.path.basename(pretrained), pretrained_sha256=checkpoint_sha256(pretrained))
    return identity


@dataclass
class ShardFeatures:
    """One shard's samples after the encode stage: per-sample text fields and status, and the
    features (float32, L2-normalised) of the ok samples, in sample order."""

    index: int
    url: str
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    urls: list[str | None] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)
    sha1s: list[str | None] = field(default_factory=list)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)  # (width, height) per sample
    f_v: np.ndarray | None = None
    f_t: np.ndarray | None = None
    damage: str | None = None
    error: str | None = None
    max_pixels: int | None = None  # the --max-image-pixels the statuses were decided under

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == schema.OK for s in self.statuses], dtype=bool)

    def add(self, key, index, caption, url, status, meta, sha1, size) -> None:
        self.keys.append(key)
        self.indices.append(index)
        self.captions.append(caption)
        self.urls.append(url)
        self.statuses.append(status)
        self.metas.append(meta)
        self.sha1s.append(sha1)
        self.sizes.append(size)

    def flag_damage(self) -> None:
        """The cut may have taken members of any sample read from the shard: none is used."""
        self.statuses = [schema.TRUNCATED_SHARD] * len(self)
        dim = 0 if self.f_v is None else self.f_v.shape[1]
        self.f_v = self.f_t = np.zeros((0, dim), dtype=np.float32)


class StalePart(NcleanerError):
    """A stored part does not answer for its shard's bytes as they are now; the message says why."""


@dataclass
class _Part:
    """A stored part: per key, (status, row in the arrays or -1, caption, sha1); what the part
    recorded about how it was made (``write``'s metadata); and, for another tool's part, which
    rows are finite (ncleaner's own rows are covered by their recorded digest, and the encoder
    never writes a non-finite one)."""

    rows: dict[str, tuple[str, int, str | None, str | None]]
    img: np.ndarray
    txt: np.ndarray
    info: dict = field(default_factory=dict)
    problem: str | None = None  # why the part cannot be used whatever the shard holds
    finite: np.ndarray | None = None


class EmbeddingStore:
    """An embeddings directory: reads parts, writes missing ones (see the module docstring).

    Use ``EmbeddingStore.open``. ``identity`` is what the caller's backbone is
    (``backbone_identity``); a directory holding another backbone's features is refused.
    """

    def __init__(self, root: Path, identity: dict, *, foreign: bool):
        self.root, self.identity, self.foreign = root, identity, foreign
        self._foreign_index: dict[str, tuple[int, int]] | None = None
        self._foreign_parts: list[_Part] = []

    @classmethod
    def open(cls, root: str | Path, identity: dict, *, create: bool, assume_backbone: str | None = None):
        """The store at ``root``; with ``create`` an absent or empty directory becomes one.

        ``assume_backbone``: the open_clip name of the backbone that wrote a directory without
        ``embeddings.json`` (clip-retrieval's own output); such a directory is only read.
        """
        root = Path(root)
        info_path = root / INFO_FILE
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError) as exc:
                raise NcleanerError(f"{info_path}: cannot read: {first_line(exc)}") from exc
            _check_info_types(info_path, info)
            _check_identity(info_path, info, identity)
            if create:
                # Once per run, as score does for its report: listing every part folder before each
                # shard's write would cost a directory listing per shard, growing with the pool.
                for sub in PART_FOLDERS:
                    remove_stale_partials(root / sub)
            return cls(root, identity, foreign=False)
        if (root / "metadata").is_dir() and any((root / "metadata").glob("*.parquet")):
            if assume_backbone is None:
                raise NcleanerError(
                    f"{root}: embeddings without {INFO_FILE} (written by another tool?): "
                    "name the backbone that computed them with --embeddings-backbone"
                )
            if assume_backbone != identity["backbone"]:
                raise NcleanerError(
                    f"{root}: --embeddings-backbone {assume_backbone} but the model uses {identity['backbone']}"
                )
            logger.warning(
                "%s: written by another tool, which records no weights: its features are taken to be %s's "
                "with the weights this run uses (%s); only their width is checked",
                root,
                identity["backbone"],
                identity.get("pretrained"),
            )
            return cls(root, identity, foreign=True)
        if not create:
            raise NcleanerError(f"{root}: not an embeddings directory (no {INFO_FILE}; run ncleaner embed)")
        if root.exists() and not root.is_dir():
            raise NcleanerError(f"{root}: exists and is not a directory")
        try:
            for sub in PART_FOLDERS:
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(root, exc) from exc
        info = {
            **identity,
            "dtype": DTYPE,
            "normalized": True,
            "layout": "clip-retrieval: img_emb, text_emb, metadata; one part per input shard",
            "written_by": f"ncleaner {__version__}",
        }
        write_json(info_path, info)
        return cls(root, identity, foreign=False)

    def _paths(self, name: str) -> dict[str, Path]:
        return {
            "img": self.root / "img_emb" / f"img_emb_{name}.npy",
            "txt": self.root / "text_emb" / f"text_emb_{name}.npy",
            "meta": self.root / "metadata" / f"metadata_{name}.parquet",
            "skipped": self.root / "skipped" / f"skipped_{name}.parquet",
        }

    def has(self, name: str) -> bool:
        """Whether the part of shard ``name`` is complete (a foreign directory: always looked up by key)."""
        return self.foreign or self._paths(name)["meta"].is_file()

    def write(self, name: str, features: ShardFeatures) -> None:
        """Store one shard's features as part ``name``; the metadata goes last, marking it complete."""
        if self.foreign:
            raise NcleanerError(f"{self.root}: written by another tool; ncleaner does not add parts to it")
        paths = self._paths(name)
        ok = features.ok
        arrays = [np.ascontiguousarray(v, dtype=np.float16) for v in (features.f_v, features.f_t)]
        for side, array in zip(("img", "txt"), arrays, strict=True):
            write_npy(paths[side], array)
        picked = np.flatnonzero(ok)
        made = {
            "shard": features.url,
            "damage": features.damage,
            "max_image_pixels": features.max_pixels,
            "fingerprint": shard_fingerprint(features.url),
            "rows_sha256": rows_digest(
                [features.keys[i] for i in picked], [features.sha1s[i] for i in picked], *arrays
            ),
        }
        for kind, rows in (("skipped", ~ok), ("meta", ok)):
            table = _metadata_table(features, rows)
            table = with_record(table, made)
            atomic_write(paths[kind], lambda tmp, t=table: pq.write_table(t, tmp))

    def read(self, name: str, url: str, shard_index: int, *, max_pixels: int) -> ShardFeatures:
        """Shard ``url`` joined with the stored features: the shard is read (not decoded) for its keys.

        Raises ``StalePart`` when the part does not answer for the shard as it is now: a sample
        without its row (the part came from other bytes), a caption or image that changed since,
        a part made from a truncated copy of a shard that is now complete, statuses decided under
        another ``max_pixels``, or a row that is not finite. The caller encodes the shard again
        (``shard_features``) or refuses; no sample is ever left without features it could have had.
        """
        if self.foreign:
            self._index_foreign()
        part = None if self.foreign else self._part(name)
        if part is not None and part.problem:
            raise StalePart(f"{url}: part {name} of {self.root} cannot be used: {part.problem}")
        out = ShardFeatures(shard_index, url, max_pixels=max_pixels)
        rows, absent, changed = [], 0, 0
        reader = read_shard(url)
        try:
            for raw in reader:
                caption, link, meta, _ = read_text_fields(raw)
                data = image_member(raw)
                sha1 = sha1_of(data)
                stored, row = self._lookup(part, raw.key)
                if stored is None:
                    absent += 1
                elif self._differs(stored, caption, sha1):
                    changed += 1
                status = raw.problem or (stored[0] if stored else schema.OK)
                if status == schema.OK and stored is not None:
                    rows.append(row)
                out.add(raw.key, raw.index, caption, link, status, meta, sha1, image_size(data))
        except UnreadableShard as exc:
            return ShardFeatures(shard_index, url, error=str(exc))
        out.damage = reader.damage
        reason = self._stale_reason(part, rows, len(out), absent, changed, out.damage, max_pixels)
        if reason:
            where = f"{self.root}" if self.foreign else f"part {name} of {self.root}"
            raise StalePart(f"{url}: {where} does not answer for it: {reason}")
        out.f_v, out.f_t = self._arrays(part, rows)
        if out.damage:
            out.flag_damage()
        return out

    def _differs(self, stored, caption, sha1) -> bool:
        if self.foreign:  # another tool stores no image hash, and may store no caption
            return stored[2] is not None and stored[2] != caption
        return stored[2] != caption or stored[3] != sha1

    def _stale_reason(self, part, rows, samples, absent, changed, damage, max_pixels) -> str | None:
        """Why the stored features may not be used for the shard as ``read`` found it (None: they may)."""
        if absent:
            return f"{absent} of its {samples} samples have no row there (embedded from other bytes?)"
        if changed:
            return f"{changed} sample(s) changed since they were embedded (caption or image differs)"
        if self.foreign:
            bad = sum(not self._foreign_parts[p].finite[r] for p, r in rows)
            return f"{bad} stored feature row(s) are not finite" if bad else None
        recorded_damage = part.info.get("damage")
        if recorded_damage and not damage:
            return f"it was embedded from a damaged copy ({recorded_damage}) and reads complete now"
        recorded = part.info.get("max_image_pixels")
        # Fewer pixels allowed may turn stored ok rows too_large; more only frees stored too_large ones.
        if recorded is not None and recorded != max_pixels:
            if max_pixels < recorded or any(s == schema.TOO_LARGE for s, *_ in part.rows.values()):
                return f"its statuses were decided under --max-image-pixels {recorded}, this run uses {max_pixels}"
        return None

    def stale(self, name: str, url: str, *, max_pixels: int) -> str | None:
        """Why the complete part ``name`` does not answer for shard ``url`` as it is now (None: it
        does). A local shard whose size and modification time are those recorded when the part
        was written is taken on trust; any other is read and checked as ``read`` checks it."""
        if not self.foreign:
            info = read_parquet_record(self._paths(name)["meta"])
            same_rule = info.get("max_image_pixels") == max_pixels
            if same_rule and info.get("fingerprint") is not None and info["fingerprint"] == shard_fingerprint(url):
                return None
        try:
            self.read(name, url, 0, max_pixels=max_pixels)
        except StalePart as stale:
            return str(stale)
        return None

    def to_embed(self, urls: list[str], names: list[str], *, max_pixels: int) -> list[tuple[str, str, str | None]]:
        """(url, name, why the stored part is stale or None when there is none) of every shard this
        store has no part for that answers for it: what ``embed`` (and ``fit`` on Ray) encodes."""
        todo = []
        for url, name in zip(urls, names, strict=True):
            if not self.has(name):
                todo.append((url, name, None))
            elif stale := self.stale(name, url, max_pixels=max_pixels):
                logger.warning("%s; embedding it again", stale)
                todo.append((url, name, stale))
        return todo

    def replaceable(self, stale: StalePart) -> None:
        """Raise the one-line refusal for ``stale`` unless this run may encode the shard again and
        replace its part: ncleaner never rewrites another tool's directory or a read-only one."""
        if self.foreign:
            raise NcleanerError(
                f"{stale}; the directory was written by another tool, so ncleaner does not replace its parts "
                "(embed these shards with ncleaner embed, or leave out --embeddings)"
            )
        if not os.access(self.root / "metadata", os.W_OK):
            raise NcleanerError(
                f"{stale}; the directory is read-only, so the part cannot be replaced "
                "(embed these shards again where it can be written, or leave out --embeddings)"
            )

    def _lookup(self, part, key: str):
        if self.foreign:
            where = self._foreign_index.get(key)  # (part, row): the row is also the stored entry's
            return (None, None) if where is None else (self._foreign_parts[where[0]].rows[key], where)
        stored = part.rows.get(key)
        return stored, (None, stored[1]) if stored else None

    def _arrays(self, part, rows) -> tuple[np.ndarray, np.ndarray]:
        dim = self.identity["dim"]
        if not rows:
            return np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        if self.foreign:
            img = np.stack([self._foreign_parts[p].img[r] for p, r in rows]).astype(np.float32)
            txt = np.stack([self._foreign_parts[p].txt[r] for p, r in rows]).astype(np.float32)
        else:
            index = np.array([r for _, r in rows])
            img, txt = part.img[index].astype(np.float32), part.txt[index].astype(np.float32)
        if self.foreign:
            # Another tool's features may be float32 or not normalised: made canonical as fresh ones are.
            return _canonical(img), _canonical(txt)
        return img, txt  # stored by ncleaner: already the canonical values

    def _part(self, name: str) -> _Part:
        """Stored part ``name``; one that cannot be read, or whose rows are not those written with
        its features, comes back with its ``problem`` and is stale."""
        paths = self._paths(name)
        try:
            meta = _read_parquet(paths["meta"])
            info = parquet_record(meta.schema.metadata, paths["meta"])
            skipped = _read_parquet(paths["skipped"]) if paths["skipped"].is_file() else None
            img, txt = (_load_npy(paths[side], self.identity["dim"]) for side in ("img", "txt"))
        except NcleanerError as exc:
            return _Part({}, np.zeros((0, 0)), np.zeros((0, 0)), problem=str(exc))
        keys, captions, sha1s = (meta.column(c).to_pylist() for c in ("image_path", "caption", "image_sha1"))
        problem = None
        if not len(img) == len(txt) == meta.num_rows:
            problem = f"{paths['meta']}: {meta.num_rows} rows but {len(img)} image and {len(txt)} text embeddings"
        elif "rows_sha256" not in info:
            problem = (
                f"{paths['meta']}: no record of what it was computed from "
                "(an older ncleaner wrote it, or another tool rewrote it)"
            )
        elif info["rows_sha256"] != rows_digest(keys, sha1s, img, txt):
            problem = f"{paths['meta']}: its rows are not those written with its features (reordered or edited)"
        rows: dict[str, tuple] = {}
        for i, (key, caption, sha1) in enumerate(zip(keys, captions, sha1s, strict=True)):
            rows[key] = (schema.OK, i, caption, sha1)
        if skipped is not None:
            for key, caption, sha1, status in zip(
                *(skipped.column(c).to_pylist() for c in ("image_path", "caption", "image_sha1", "status")),
                strict=True,
            ):
                rows.setdefault(key, (status, -1, caption, sha1))
        return _Part(rows, img, txt, info, problem)

    def _index_foreign(self) -> None:
        """Index every part of a clip-retrieval directory by key (once; keys are unique in a pool)."""
        if self._foreign_index is not None:
            return
        self._foreign_index = {}
        metas = sorted((self.root / "metadata").glob("*.parquet"))
        for p, meta_path in enumerate(metas):
            suffix = meta_path.stem.removeprefix("metadata_")
            img = _load_npy(self.root / "img_emb" / f"img_emb_{suffix}.npy", self.identity["dim"])
            txt = _load_npy(self.root / "text_emb" / f"text_emb_{suffix}.npy", self.identity["dim"])
            meta = _read_parquet(meta_path)
            if "image_path" not in meta.column_names:
                raise NcleanerError(f"{meta_path}: no image_path column to join on")
            if not len(img) == len(txt) == meta.num_rows:
                raise NcleanerError(f"{meta_path}: {meta.num_rows} rows but {len(img)} / {len(txt)} embeddings")
            captions = meta.column("caption").to_pylist() if "caption" in meta.column_names else [None] * len(img)
            rows = {}
            for i, (key, caption) in enumerate(zip(meta.column("image_path").to_pylist(), captions, strict=True)):
                key = str(key)
                # Without a stored caption nothing can be checked: the key alone joins.
                rows[key] = (schema.OK, i, caption, None)
                self._foreign_index[key] = (p, i)
            self._foreign_parts.append(_Part(rows, img, txt, finite=_finite_rows(img, txt)))


def open_for_model(root: str | Path, config, *, create: bool, assume_backbone: str | None = None) -> EmbeddingStore:
    """The embeddings directory for a model of ``config`` (a fitted model's, or fit's own).

    Stored features are a frozen backbone's: a model that trains its backbone changes
    them, so it cannot use any.
    """
    if config.resolved_train_backbone() == "all":
        raise NcleanerError(
            f"--embeddings {root}: hold a frozen pretrained backbone's features, but this model trains its "
            f"backbone ({config.backbone} without --pretrained)"
        )
    identity = backbone_identity(config.backbone, config.pretrained, config.embed_dim)
    return EmbeddingStore.open(root, identity, create=create, assume_backbone=assume_backbone)


# The fields of embeddings.json that identify the features, with their JSON types (as config.json's
# annotations) and whether a file must have them.
_INFO_TYPES = {
    "backbone": ("str", True),
    "dim": ("int", True),
    "pretrained": ("str | None", False),
    "pretrained_sha256": ("str | None", False),
}


def _check_info_types(path: Path, info: object) -> None:
    """Refuse an ``embeddings.json`` whose identifying fields are missing or of another JSON type
    (``"dim": "128"`` is not the integer 128), before any comparison can misread them."""
    if not isinstance(info, dict):
        raise NcleanerError(f"{path}: must be a JSON object")
    for key, (annotation, required) in _INFO_TYPES.items():
        if key not in info:
            if required:
                raise NcleanerError(f"{path}: no field {key}")
            continue
        try:
            typed_json(key, info[key], annotation)
        except ValueError as exc:
            raise NcleanerError(f"{path}: {exc}") from None


def _check_identity(path: Path, info: dict, identity: dict) -> None:
    """Refuse features of another backbone, other weights or another width (one line)."""
    for key in ("backbone", "dim"):
        if info.get(key) != identity[key]:
            raise NcleanerError(
                f"{path}: embeddings of {info.get('backbone')} (dim {info.get('dim')}), "
                f"but this run uses {identity['backbone']} (dim {identity['dim']})"
            )
    mine, theirs = identity.get("pretrained_sha256"), info.get("pretrained_sha256")
    same = mine == theirs if (mine or theirs) else info.get("pretrained") == identity.get("pretrained")
    if not same:
        theirs_short, mine_short = (theirs or "no hash")[:12], (mine or "no hash")[:12]
        raise NcleanerError(
            f"{path}: embeddings of {info.get('backbone')} with weights {info.get('pretrained')} ({theirs_short}), "
            f"but this run uses {identity.get('pretrained')} ({mine_short})"
        )


def rows_digest(keys: list[str], sha1s: list[str | None], img: np.ndarray, txt: np.ndarray) -> str:
    """SHA-256 over a part's rows in order (key and image hash) and its float16 feature rows: the
    metadata and the arrays of a part are each other's only when this is what was recorded."""
    digest = hashlib.sha256()
    for key, sha1 in zip(keys, sha1s, strict=True):
        digest.update(f"{key}\0{sha1}\0".encode("utf-8", "surrogateescape"))
    for array in (img, txt):
        digest.update(memoryview(np.ascontiguousarray(array, dtype=np.float16)))  # a stored part: no copy
    return digest.hexdigest()


def _finite_rows(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Per row, whether both vectors are finite (a NaN row is a damaged part, never a feature)."""
    return np.isfinite(img).all(axis=1) & np.isfinite(txt).all(axis=1) if len(img) else np.zeros(0, bool)


def _canonical(x: np.ndarray) -> np.ndarray:
    """What ``encode.Encoder`` gives for fresh features: L2-normalised, rounded to float16."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float16).astype(np.float32)


def _load_npy(path: Path, dim: int) -> np.ndarray:
    """A part's feature rows, memory-mapped: a 2-D array of floats ``dim`` wide, or one line saying
    what the file is instead (missing, not .npy, Python objects, other numbers, another shape)."""
    if not path.is_file():
        raise NcleanerError(f"{path}: missing (the part's metadata is there, its embeddings are not)")
    try:
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)  # ValueError for a file that is not .npy at all
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        text = str(exc)
        if "pickle" in text or "Python objects" in text:
            raise NcleanerError(f"{path}: holds Python objects, not an array of numbers") from exc
        raise NcleanerError(f"{path}: not a .npy array: {first_line(exc)}") from exc
    except OSError as exc:
        raise NcleanerError(f"{path}: cannot read embeddings: {first_line(exc)}") from exc
    if array.dtype.kind != "f":
        raise NcleanerError(f"{path}: holds {array.dtype} values, not floating-point embeddings")
    if array.ndim != 2 or (len(array) and array.shape[1] != dim):
        raise NcleanerError(f"{path}: embeddings of shape {array.shape}, expected (rows, {dim})")
    return array


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except Exception as exc:
        raise NcleanerError(f"{path}: cannot read: {first_line(exc)}") from exc


def _metadata_table(features: ShardFeatures, rows: np.ndarray) -> pa.Table:
    pick = np.flatnonzero(rows)

    def column(values):
        return [values[i] for i in pick]

    metas = [json.dumps(m, ensure_ascii=False, sort_keys=True) if m else None for m in column(features.metas)]
    return pa.table(
        [
            column(features.keys),
            column(features.captions),
            column(features.urls),
            [features.url] * len(pick),
            column(features.indices),
            column(features.statuses),
            metas,
            column(features.sha1s),
        ],
        schema=META_SCHEMA,
    )


@dataclass
class _EncodedBlock:
    """A decoded block with its images and tokens replaced by their features."""

    shard_index: int
    url: str
    pairs: list
    f_v: np.ndarray | None
    f_t: np.ndarray | None
    last: bool
    damage: str | None
    error: str | None


def _encoded(blocks, encoder: Encoder, progress) -> Iterator[_EncodedBlock]:
    for block in blocks:
        f_v = f_t = None
        if block.images is not None:
            v, t = encoder(block.images, block.tokens)
            f_v, f_t = v.cpu().numpy(), t.cpu().numpy()
        if progress:
            progress(len(block.pairs))
        yield _EncodedBlock(block.shard_index, block.url, block.pairs, f_v, f_t, block.last, block.damage, block.error)


def compute_features(
    urls: list[str],
    encoder: Encoder,
    *,
    preprocess,
    tokenizer,
    batch_size: int,
    workers: int,
    max_pixels: int,
    first_index: Iterable[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ShardFeatures]:
    """Decode and encode ``urls``; yield each shard's ``ShardFeatures``, in order.

    Blocks are encoded as they arrive (a shard's images are never all in memory);
    ``first_index`` gives the shards' positions in the caller's list.
    """
    indices = list(first_index) if first_index is not None else list(range(len(urls)))
    blocks = decode_blocks(
        urls,
        preprocess,
        tokenizer,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        pin_memory=encoder.device.type == "cuda",
    )
    dim = encoder.backbone.embed_dim
    for group in by_shard(_encoded(blocks, encoder, progress)):
        last = group[-1]
        shard = ShardFeatures(
            indices[last.shard_index], last.url, damage=last.damage, error=last.error, max_pixels=max_pixels
        )
        for block in group:
            for p in block.pairs:
                shard.add(p.raw.key, p.raw.index, p.caption, p.url, p.status, p.meta, p.image_sha1, p.size)
        vs = [b.f_v for b in group if b.f_v is not None]
        ts = [b.f_t for b in group if b.f_t is not None]
        shard.f_v = np.concatenate(vs) if vs else np.zeros((0, dim), np.float32)
        shard.f_t = np.concatenate(ts) if ts else np.zeros((0, dim), np.float32)
        if shard.damage:
            shard.flag_damage()
        yield shard


def shard_features(
    urls: list[str],
    names: list[str],
    encoder: Encoder,
    *,
    store: EmbeddingStore | None,
    preprocess,
    tokenizer,
    batch_size: int,
    workers: int,
    max_pixels: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ShardFeatures]:
    """Every shard's features in order: read from ``store`` where its part answers for the shard,
    computed (and written to ``store``) where the store has no part or a stale one.

    A stale part (``StalePart``: the shard's bytes are not those it was computed from) is
    replaced by a fresh encoding of the shard, with a warning; in a store ncleaner may not
    rewrite (another tool's, a read-only one) it is refused instead.
    """
    stored = [store is not None and store.has(n) for n in names]
    todo = [i for i, s in enumerate(stored) if not s]
    encode = functools.partial(
        compute_features,
        encoder=encoder,
        preprocess=preprocess,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_pixels=max_pixels,
        progress=progress,
    )
    computed = encode([urls[i] for i in todo], workers=workers, first_index=todo)
    for i, (url, name) in enumerate(zip(urls, names, strict=True)):
        features = _stored_features(store, name, url, i, max_pixels) if stored[i] else None
        if features is not None:
            if progress:
                progress(len(features))
        else:
            features = next(encode([url], workers=min(workers, 1), first_index=[i]) if stored[i] else computed)
            if store is not None and not features.error:
                store.write(name, features)
        yield features


def _stored_features(store: EmbeddingStore, name: str, url: str, index: int, max_pixels: int) -> ShardFeatures | None:
    """Shard ``url`` from its stored part, or None when the part is stale and may be replaced."""
    try:
        return store.read(name, url, index, max_pixels=max_pixels)
    except StalePart as stale:
        store.replaceable(stale)
        logger.warning("%s; encoding it again", stale)
        return None


def model_features(
    model,
    urls: list[str],
    names: list[str],
    *,
    store: EmbeddingStore | None,
    batch_size: int,
    workers: int,
    max_pixels: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ShardFeatures]:
    """``shard_features`` through an ``NcleanerModel``'s encoder, image transform and tokenizer."""
    return shard_features(
        urls,
        names,
        model.encoder(),
        store=store,
        preprocess=model.backbone.preprocess,
        tokenizer=model.tokenize,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        progress=progress,
    )


@dataclass
class EmbedResult(ShardTally):
    """What ``embed`` did, per shard as ``ShardTally`` counts it; ``reembedded_shards`` are those
    done now whose earlier part was stale (``StalePart``)."""

    out_dir: Path
    identity: dict
    reembedded_shards: list[str] = field(default_factory=list)


def embed(
    shards: str | Iterable[str],
    out_dir: str | Path,
    *,
    backbone: str,
    pretrained: str | None,
    batch_size: int = 256,
    precision: str = "fp32",
    on_bad_shard: str = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_download: bool = False,
    run: RunOptions = DEFAULT_RUN,
) -> EmbedResult:
    """Encode every pair of ``shards`` once and write the embeddings directory ``out_dir``.

    Args:
        shards: SHARDS in any form ``expand_shards`` takes.
        out_dir: the embeddings directory (layout in this module's docstring). Shards whose
            part it already holds, made from the same bytes, are skipped, so an interrupted run
            resumes; a part made from other bytes is replaced.
        backbone: open_clip model name.
        pretrained: open_clip pretrained tag or local checkpoint file (required: the
            features of a random backbone are of no use to a later run).
        batch_size: pairs encoded at a time.
        precision: ``fp32``, or ``fp16`` / ``bf16`` autocast on CUDA.
        on_bad_shard: ``fail`` stops at an unreadable shard; ``skip`` leaves it out (no part is
            written, so the next run tries it again) and lists it in ``unreadable_shards``.
        max_image_pixels: larger images are not decoded (status ``too_large``).
        allow_download: let open_clip download ``backbone`` / ``pretrained``.
        run: where and how it runs (``RunOptions``); on Ray each shard is encoded and written by
            a worker holding the backbone.
    """
    check_on_bad_shard(on_bad_shard)
    if not pretrained:
        raise NcleanerError("embed needs --pretrained: the features of a randomly initialised backbone mean nothing")
    run.check()
    urls = expand_shards(shards)
    names = shard_names(urls)
    reason = None if allow_download else download_reason(backbone, pretrained)
    if reason:
        raise NcleanerError(f"{backbone}: {reason}; nothing is downloaded unless allowed (pass --allow-download)")
    # On Ray the workers encode: the backbone is built here only for its width (embeddings.json).
    torch_device = resolve_device("cpu" if run.on_ray else run.device)
    model = build_backbone(backbone, pretrained, torch_device)
    identity = backbone_identity(backbone, pretrained, model.embed_dim)
    store = EmbeddingStore.open(out_dir, identity, create=True)
    result = EmbedResult(out_dir=Path(out_dir), identity=identity)
    pending = store.to_embed(urls, names, max_pixels=max_image_pixels)
    todo = [(url, name) for url, name, _ in pending]
    result.reembedded_shards = [url for url, _, stale in pending if stale]
    waiting = {url for url, _ in todo}
    result.done_before = [url for url in urls if url not in waiting]
    if result.done_before:
        logger.info("skipped %d shard(s) already embedded", len(result.done_before))
    if run.on_ray:
        answers = embed_on_ray(
            todo,
            store,
            backbone=backbone,
            pretrained=pretrained,
            precision=precision,
            batch_size=batch_size,
            max_image_pixels=max_image_pixels,
            allow_download=allow_download,
            run=run,
        )
        for _, name in todo:  # in input order, as the local engine counts them
            result.count(answers[name], on_bad_shard=on_bad_shard, log=logger)
        return result
    encoder = Encoder(model, torch_device, precision=precision, source=f"backbone {backbone} ({pretrained})")
    bar = tqdm(unit="pair", disable=not run.progress, dynamic_ncols=True, desc=f"embedding {len(todo)} shard(s)")
    stream = compute_features(
        [u for u, _ in todo],
        encoder,
        preprocess=model.preprocess,
        tokenizer=model.tokenizer,
        batch_size=batch_size,
        workers=run.decode_workers(len(todo)),
        max_pixels=max_image_pixels,
        progress=bar.update,
    )
    for features, (_, name) in zip(stream, todo, strict=True):
        result.count(write_embedding_part(store, name, features), on_bad_shard=on_bad_shard, log=logger)
    bar.close()
    return result


class EmbedJob(ShardJob):
    """``embed`` (and the embedding part of ``fit``) on the Ray engine: the backbone built once per
    worker; each shard encoded and its part written there (``write_embedding_part``)."""

    def _setup(self, store: EmbeddingStore, options: dict) -> None:
        self.store, self.options = store, options
        backbone, pretrained = options["backbone"], options["pretrained"]
        reason = None if options["allow_download"] else download_reason(backbone, pretrained)
        if reason:
            raise NcleanerError(
                f"{backbone}: {reason} on a Ray worker ({socket.gethostname()}); "
                "nothing is downloaded unless allowed (pass --allow-download)"
            )
        device = resolve_device(worker_device(options["device"]))
        self.model = build_backbone(backbone, pretrained, device)
        source = f"backbone {backbone} ({pretrained})"
        self.encoder = Encoder(self.model, device, precision=options["precision"], source=source)

    def _shard(self, url: str, name: str) -> dict:
        o = self.options
        stream = compute_features(
            [url],
            self.encoder,
            preprocess=self.model.preprocess,
            tokenizer=self.model.tokenizer,
            batch_size=o["batch_size"],
            workers=0,
            max_pixels=o["max_image_pixels"],
        )
        return write_embedding_part(self.store, name, next(stream))


def embed_on_ray(
    todo: list[tuple[str, str]],
    store: EmbeddingStore,
    *,
    backbone: str,
    pretrained: str,
    precision: str,
    batch_size: int,
    max_image_pixels: int,
    allow_download: bool,
    run: RunOptions,
) -> dict[str, dict]:
    """Encode the shards ``todo`` ((url, name) each) on the Ray engine, each part written into
    ``store`` by the worker that encoded it; per shard name, what ``write_embedding_part`` answered."""
    options = {
        "backbone": backbone,
        "pretrained": str(Path(pretrained).resolve()) if os.path.isfile(pretrained) else pretrained,
        "precision": precision,
        "device": run.device,
        "allow_download": allow_download,
        "batch_size": batch_size,
        "max_image_pixels": max_image_pixels,
    }
    return run_shard_jobs(
        EmbedJob,
        (store, options),
        todo,
        run=run,
        desc=f"embedding {len(todo)} shard(s) on Ray",
    )


def write_embedding_part(store: EmbeddingStore, name: str, features: ShardFeatures) -> dict:
    """Finish one shard of ``embed``: write its part; the unit of work both engines share.

    Returns what ``ShardTally.count`` counts: the shard, its statuses and damage, or
    ``{"shard": url, "error": why}`` for a shard that could not be read (no part is
    written, so the next run tries it again).
    """
    if features.error:
        return {"shard": features.url, "error": features.error}
    store.write(name, features)
    return {"shard": features.url, "statuses": dict(Counter(features.statuses)), "damage": features.damage}
