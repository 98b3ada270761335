"""The report's vocabulary: every sample status with what it means, the score columns, the
report's Parquet schema and file names, and the filter's rule (the automatic one included).

Kept free of torch so that the reader, the filter and the docs can use it cheaply.
A sample whose status is not ``ok`` gets a report row with null scores and is
always rejected by ``filter`` (written to the rejected shards when asked), never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import NcleanerError, first_line

OK = "ok"

# Decode stage: the sample's members are readable, but not a usable pair.
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"
TOO_LARGE = "too_large"
MISSING_CAPTION = "missing_caption"
BAD_CAPTION = "bad_caption"
BAD_JSON = "bad_json"
AMBIGUOUS_MEMBERS = "ambiguous_members"

# Reader stage: what the tar itself says about the sample.
UNSAFE_NAME = "unsafe_name"
DUPLICATE_MEMBER = "duplicate_member"
SYMLINK_MEMBER = "symlink_member"
SPECIAL_MEMBER = "special_member"
UNRESOLVED_LINK = "unresolved_link"
TRUNCATED_SHARD = "truncated_shard"

STATUSES = {
    OK: "decoded and scored",
    MISSING_IMAGE: "no jpg/jpeg/png/webp member",
    BAD_IMAGE: "the image member cannot be decoded",
    TOO_LARGE: "the image has more pixels than --max-image-pixels (a decompression bomb guard)",
    MISSING_CAPTION: "no txt member and no caption/text field in the json, or a blank caption",
    BAD_CAPTION: "the txt member is not UTF-8 text",
    BAD_JSON: "the json member cannot be parsed and no txt member gives the caption",
    AMBIGUOUS_MEMBERS: "the image or caption is only found under a dotted name (img.001.jpg): keys end at the "
    "first dot of the file name, so these members were grouped under one key",
    UNSAFE_NAME: "a member name is absolute or contains '..' (it would escape a directory when extracted)",
    DUPLICATE_MEMBER: "two members of the sample have the same name",
    SYMLINK_MEMBER: "a member is a symbolic link",
    SPECIAL_MEMBER: "a member is a device, fifo or other special file",
    UNRESOLVED_LINK: "a hard link whose target is not an earlier member of the same tar",
    TRUNCATED_SHARD: "the shard ends early (no end-of-archive block, or cut inside a member): every sample "
    "read from it is flagged, because the cut may have taken members",
}

SCORE_COLUMNS = ("clip_sim", "mii_sim", "soft_agreement", "score", "clean_prob")


def report_paths(report_dir: Path, name: str) -> tuple[Path, Path]:
    """(parquet file, finished marker) of one shard's part of a report."""
    return report_dir / f"{name}.parquet", report_dir / f"_{name}.done.json"


def failed_marker(report_dir: Path, name: str) -> Path:
    """Where ``score --on-bad-shard skip`` records a shard it could not read (a re-run tries it again)."""
    return report_dir / f"_{name}.failed.json"


BASE_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("index", pa.int64()),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string()),
    pa.field("image_sha1", pa.string()),  # of the image member's bytes: filter and inspect check it
    pa.field("status", pa.string()),
    *[pa.field(c, pa.float32()) for c in SCORE_COLUMNS],
    pa.field("model_id", pa.string()),
    pa.field("uid", pa.string()),  # the json's uid (DataComp's 128-bit hex id), null when it has none
    # DataComp's basic-filter inputs (ncleaner.captions): null where the sample has no image header
    # or no caption.
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("caption_chars", pa.int64()),
    pa.field("caption_words", pa.int64()),
    pa.field("language", pa.string()),
    pa.field("language_prob", pa.float32()),
]


def report_schema(keep_json_fields: Sequence[str] = ()) -> pa.Schema:
    """The report's columns; kept json fields follow as text (JSON text for non-string values)."""
    clash = [f for f in keep_json_fields if f in {b.name for b in BASE_FIELDS}]
    if clash:
        raise NcleanerError(f"--keep-json-fields: {', '.join(clash)} would overwrite a report column")
    return pa.schema(BASE_FIELDS + [pa.field(f, pa.string()) for f in keep_json_fields])


# Columns a report part may lack, written by an older ncleaner: filter then checks key and caption
# only, has no uid for --subset-out, and --where cannot name the basic-filter columns.
OPTIONAL_COLUMNS = (
    "image_sha1",
    "uid",
    "width",
    "height",
    "caption_chars",
    "caption_words",
    "language",
    "language_prob",
)
# Cosines may pass +-1 by float32 rounding; clean_prob is a posterior.
_RANGES = {"clip_sim": (-1.001, 1.001), "mii_sim": (-1.001, 1.001), "clean_prob": (0.0, 1.0)}
_KINDS = {
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t),
    "int64": pa.types.is_integer,
    "float": pa.types.is_floating,
}


def read_report_table(path: Path) -> pa.Table:
    """One report part, refused in one line naming the part when it is not one that ``score``
    could have written: what ``filter`` (``--dry-run`` too), ``inspect`` and ``evaluate`` read,
    so that none of them acts on a damaged or hand-edited report. The whole part is checked even
    where a caller keeps only some of its columns."""
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise NcleanerError(f"{path}: cannot read report part: {first_line(exc)}") from exc
    problem = report_problem(table)
    if problem:
        raise NcleanerError(f"{path}: not a report part ncleaner wrote: {problem} (score the shard again)")
    return table


def report_problem(table: pa.Table) -> str | None:
    """What is wrong with a report part (None: nothing): a missing column or one of another type, a
    row without key or status, an unknown status, a score missing or not finite on an ok row or
    present on another, a value out of its range, duplicate keys, rows out of shard order."""
    names = set(table.column_names)
    missing = [f.name for f in BASE_FIELDS if f.name not in names and f.name not in OPTIONAL_COLUMNS]
    if missing:
        return f"no column {', '.join(missing)}"
    for f in BASE_FIELDS:
        kind = "float" if pa.types.is_floating(f.type) else str(f.type)
        found = table.schema.field(f.name).type if f.name in names else None
        # A column with no value at all may have been written as nulls by another writer (pandas).
        nullable = f.name not in ("key", "index", "status") and found is not None and pa.types.is_null(found)
        if found is not None and not nullable and not _KINDS[kind](found):
            return f"column {f.name} is {found}, not {kind}"
    for name in ("key", "index", "status"):
        if table.column(name).null_count:
            return f"a row without {name}"
    unknown = sorted(set(pc.unique(table.column("status")).to_pylist()) - set(STATUSES))
    if unknown:
        return f"unknown status {unknown[0]!r}"
    ok = pc.equal(table.column("status"), OK)
    not_ok = table.num_rows - (pc.sum(ok).as_py() or 0)
    for column in SCORE_COLUMNS:
        values = table.column(column)
        on_ok = pc.filter(values, ok)
        if on_ok.null_count or pc.sum(pc.invert(pc.is_finite(on_ok))).as_py():
            return f"column {column} is missing or not finite on an ok row"
        if pc.filter(values, pc.invert(ok)).null_count != not_ok:
            return f"column {column} has a value on a row that is not ok"
        low, high = _RANGES.get(column, (-math.inf, math.inf))
        extremes = pc.min_max(on_ok)
        smallest, largest = extremes["min"], extremes["max"]
        if smallest.is_valid and (smallest.as_py() < low or largest.as_py() > high):
            return f"column {column} takes {smallest.as_py():g} to {largest.as_py():g}, outside [{low:g}, {high:g}]"
    if pc.count_distinct(table.column("key")).as_py() != table.num_rows:
        return "a key appears on more than one row"
    if table.column("index").to_pylist() != list(range(table.num_rows)):
        return "the rows are not the shard's samples in order (index 0, 1, 2...)"
    return None


@dataclass
class Rule:
    """Keep a sample when its status is ok and ``column >= threshold`` (``filter``'s rule, resolved)."""

    column: str
    threshold: float
    mode: str  # "threshold", "keep_fraction" or "auto"
    keep_fraction: float | None = None

    def keep(self, status: str, value) -> bool:
        return status == OK and value is not None and not math.isnan(value) and float(value) >= self.threshold

    def describe(self) -> str:
        """The rule as given, with the threshold it resolved to: ``score >= 0.4321 (--keep-fraction 0.8)``."""
        if self.mode == "keep_uids":
            return "uid listed in --keep-uids"
        how = f"--keep-fraction {self.keep_fraction:g}" if self.mode == "keep_fraction" else f"--{self.mode}"
        return f"{self.column} >= {self.threshold:.4g} ({how})"


# `filter --auto` and `evaluate` apply this very rule: the model's own clean/noisy split.
AUTO_RULE = Rule(column="clean_prob", threshold=0.5, mode="auto")
# `filter --keep-uids` with no report: a sample is kept when its uid is listed (no column compared).
UIDS_RULE = Rule(column="uid", threshold=0.0, mode="keep_uids")
