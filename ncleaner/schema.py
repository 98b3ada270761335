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

from .errors import NcleanerError

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
]


def report_schema(keep_json_fields: Sequence[str] = ()) -> pa.Schema:
    """The report's columns; kept json fields follow as text (JSON text for non-string values)."""
    clash = [f for f in keep_json_fields if f in {b.name for b in BASE_FIELDS}]
    if clash:
        raise NcleanerError(f"--keep-json-fields: {', '.join(clash)} would overwrite a report column")
    return pa.schema(BASE_FIELDS + [pa.field(f, pa.string()) for f in keep_json_fields])


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
        how = f"--keep-fraction {self.keep_fraction:g}" if self.mode == "keep_fraction" else f"--{self.mode}"
        return f"{self.column} >= {self.threshold:.4g} ({how})"


# `filter --auto` and `evaluate` apply this very rule: the model's own clean/noisy split.
AUTO_RULE = Rule(column="clean_prob", threshold=0.5, mode="auto")
