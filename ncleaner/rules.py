"""What a report row becomes, and the report as ``filter`` and ``inspect`` read it.

``route`` is the one place a report row becomes kept or rejected (with the reason), under a
resolved rule (``make_rule``) and the override lists (``read_key_list``, ``resolve_overrides``):
``filter``, ``filter --dry-run`` and ``inspect`` all go through it, so they agree. The reports
they route are read here too (``load_shard_reports``: every part checked by
``schema.read_report_table``), and ``ScoredSamples`` checks, as a shard is read again, that each
sample is the one its row scored. Nothing here writes: the shard writer is ``filtering``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .engine import ShardTally
from .errors import NcleanerError, UnreadableShard, first_line, printable
from .schema import AUTO_RULE, SCORE_COLUMNS, Rule, failed_marker, report_paths
from .shards import RawSample, image_member, is_local, json_uid, read_shard, read_text_fields, sha1_of, shard_names

logger = logging.getLogger(__name__)


# What ``route`` makes of a row: kept by the rule, kept because --keep-keys names it, or the
# reason it is rejected: ``below_threshold``, ``where`` (kept by the rule, not by --where),
# ``duplicate`` (kept by the rule, but --dedup names another sample as its group's
# representative), ``override`` (named by --reject-keys), or its status.
KEPT = "kept"
KEPT_BY_OVERRIDE = "kept_by_override"
BELOW_THRESHOLD = "below_threshold"
WHERE = "where"
DUPLICATE = "duplicate"
OVERRIDE = "override"
# filter with --keep-uids and no report: a sample whose uid the list does not name.
NOT_LISTED = "not_listed"


def make_rule(
    reports: list[pd.DataFrame],
    *,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    auto: bool = False,
    column: str = "score",
) -> Rule:
    """Resolve exactly one of --threshold, --keep-fraction, --auto into a threshold on a column.

    A threshold outside the values the column takes is allowed (it keeps all or
    nothing) but logged with the observed range, since it is usually a mistake.
    """
    given = (threshold is not None) + (keep_fraction is not None) + bool(auto)
    if given != 1:
        raise NcleanerError("give exactly one of --threshold, --keep-fraction or --auto")
    if auto:
        return AUTO_RULE
    if column not in SCORE_COLUMNS:
        raise NcleanerError(f"--column {column}: not a score column (one of {', '.join(SCORE_COLUMNS)})")
    values = np.concatenate(
        [r.loc[r["status"] == schema.OK, column].to_numpy(dtype=np.float64) for r in reports] or [np.empty(0)]
    )
    values = values[np.isfinite(values)]
    if threshold is not None:
        if not math.isfinite(threshold):
            raise NcleanerError(f"--threshold {threshold}: must be a finite number")
        if len(values) and not values.min() <= threshold <= values.max():
            logger.warning(
                "--threshold %g lies outside the %s values of this report (%.4g to %.4g): "
                "it keeps %d of %d scored pairs",
                threshold,
                column,
                values.min(),
                values.max(),
                int((values >= threshold).sum()),
                len(values),
            )
        return Rule(column=column, threshold=float(threshold), mode="threshold")
    if not 0.0 < keep_fraction <= 1.0:
        raise NcleanerError(f"--keep-fraction {keep_fraction}: must be in (0, 1]")
    if len(values) == 0:
        raise NcleanerError("no scored samples in the report: nothing to rank for --keep-fraction")
    # The k-th largest value: keeping >= it keeps the top fraction (more only on exact ties).
    k = max(1, int(round(keep_fraction * len(values))))
    cut = float(np.sort(values)[::-1][k - 1])
    return Rule(column=column, threshold=cut, mode="keep_fraction", keep_fraction=keep_fraction)


@dataclass(frozen=True)
class KeyLine:
    """One line of a --keep-keys / --reject-keys file: a key, optionally qualified by its shard."""

    file: str
    line: int
    shard: str | None
    key: str

    def __str__(self) -> str:
        return f"{self.shard}\t{self.key}" if self.shard is not None else self.key


def read_key_list(path: str | Path) -> list[KeyLine]:
    """The lines of a key list: ``KEY`` or ``SHARD<TAB>KEY`` each, blank lines skipped.

    Only the line ending is stripped: a key is matched exactly as written, so a stray
    space shows up as a key that matches nothing (reported) rather than as a silent near-match.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NcleanerError(f"{path}: cannot read key list: {exc.strerror or first_line(exc)}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NcleanerError(f"{path}: key list is not UTF-8 text (bad byte at offset {exc.start})") from exc
    lines = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) > 2 or not all(parts):
            raise NcleanerError(f"{path}: line {n}: expected KEY or SHARD<TAB>KEY, got {line!r}")
        shard, key = (None, parts[0]) if len(parts) == 1 else parts
        lines.append(KeyLine(str(path), n, shard, key))
    return lines


@dataclass
class OverridePlan:
    """Which report rows the key lists name: row positions per shard URL, and what matched nothing."""

    keep: dict[str, set[int]] = field(default_factory=dict)
    reject: dict[str, set[int]] = field(default_factory=dict)
    keep_keys: str | None = None
    reject_keys: str | None = None
    keep_uids: str | None = None
    reject_uids: str | None = None
    not_found: dict[str, list[str]] = field(default_factory=lambda: {"keep": [], "reject": []})
    # Per side, how many uids of its subset file match no sample of the pool.
    uids_not_found: dict[str, int] = field(default_factory=lambda: {"keep": 0, "reject": 0})
    kept_not_ok: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "keep_keys": self.keep_keys,
            "reject_keys": self.reject_keys,
            "keep_uids": self.keep_uids,
            "reject_uids": self.reject_uids,
            "not_found": self.not_found,
            "uids_not_found": self.uids_not_found,
            "kept_not_ok": self.kept_not_ok,
        }

    def lists(self, which: str) -> str:
        """The files naming samples to keep (``which`` = keep) or reject, for a message."""
        files = (self.keep_keys, self.keep_uids) if which == "keep" else (self.reject_keys, self.reject_uids)
        return " and ".join(f for f in files if f is not None)


def _shard_aliases(url: str, name: str) -> set[str]:
    """The ways a key list may name a shard: as given to score, its path, its file name, or its report stem."""
    aliases = {url, os.path.normpath(url), os.path.basename(url), name}
    if is_local(url):
        aliases.add(os.path.abspath(url))
    return aliases


def resolve_overrides(
    reports: dict[str, pd.DataFrame],
    *,
    keep_keys: str | Path | None = None,
    reject_keys: str | Path | None = None,
    keep_uids: str | Path | None = None,
    reject_uids: str | Path | None = None,
) -> OverridePlan:
    """Match the lines of the key lists, and the uids of the subset files (``read_uid_list``), to
    report rows (``reports``: shard URL -> its report).

    A bare key names every sample with that key in the pool; ``SHARD<TAB>KEY`` only the one in
    that shard. A line that names no sample is kept in ``not_found`` and logged: it is most
    likely a typo or a key from another pool, and the user must hear of it; so is the count of a
    subset file's uids that name no sample. A uid names every sample whose json carries it (a
    pool may hold one picture twice under one uid); a uid listed twice in a file is one uid. A
    sample named to be kept and to be rejected is an error. A sample with a non-ok status named to
    be kept stays rejected (it has no usable pair to keep) and is listed in ``kept_not_ok``.
    """
    given = {"keep_keys": keep_keys, "reject_keys": reject_keys, "keep_uids": keep_uids, "reject_uids": reject_uids}
    plan = OverridePlan(**{k: str(v) if v is not None else None for k, v in given.items()})
    for which, path in (("keep", keep_uids), ("reject", reject_uids)):
        if path is not None:
            add_listed_uids(plan, reports, which, path)
    if keep_keys is None and reject_keys is None:
        return _checked(plan, reports)
    urls = list(reports)
    by_key: dict[str, list[tuple[str, int]]] = {}
    for url, report in reports.items():
        for i, key in enumerate(report["key"].tolist()):
            by_key.setdefault(key, []).append((url, i))
    by_alias: dict[str, set[str]] = {}
    for url, name in zip(urls, shard_names(urls), strict=True):
        for alias in _shard_aliases(url, name):
            by_alias.setdefault(alias, set()).add(url)
    for which, path in (("keep", keep_keys), ("reject", reject_keys)):
        if path is None:
            continue
        rows = plan.keep if which == "keep" else plan.reject
        for line in read_key_list(path):
            shards = None if line.shard is None else by_alias.get(line.shard, set())
            hits = [(u, i) for u, i in by_key.get(line.key, []) if shards is None or u in shards]
            if not hits:
                plan.not_found[which].append(str(line))
            for u, i in hits:
                rows.setdefault(u, set()).add(i)
        if plan.not_found[which]:
            logger.warning(
                "%s: %d line(s) match no sample of the pool (e.g. %r); they are listed in the manifest",
                path,
                len(plan.not_found[which]),
                plan.not_found[which][0],
            )
    return _checked(plan, reports)


def _checked(plan: OverridePlan, reports: dict[str, pd.DataFrame]) -> OverridePlan:
    """``plan``, refused when a sample is both kept and rejected by it; the non-ok samples it would
    keep are listed in ``kept_not_ok`` (they stay rejected) and warned about."""
    for url, rows in plan.keep.items():
        both = rows & plan.reject.get(url, set())
        if both:
            key = reports[url]["key"].iloc[min(both)]
            raise NcleanerError(
                f"{plan.lists('reject')}: sample {key!r} of {url} is also in {plan.lists('keep')}; "
                f"{len(both)} sample(s) are in both lists, remove them from one"
            )
        report = reports[url]
        for i in sorted(rows):
            status = report["status"].iloc[i]
            if status != schema.OK:
                plan.kept_not_ok.append({"shard": url, "key": report["key"].iloc[i], "status": status})
    if plan.kept_not_ok:
        first = plan.kept_not_ok[0]
        logger.warning(
            "%s: %d sample(s) cannot be kept, they have no usable pair (e.g. %s: %s); they stay rejected",
            plan.lists("keep"),
            len(plan.kept_not_ok),
            first["key"],
            first["status"],
        )
    return plan


def uid_value(uid, url: str) -> tuple[int, int] | None:
    """A sample's uid as DataComp's subset files hold it: ``divmod(int(uid, 16), 2**64)``; None
    for a sample without one (not a string), one line for one that is not 128-bit hex."""
    if not isinstance(uid, str):
        return None
    try:
        value = int(uid, 16)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 128:
        raise NcleanerError(f"{url}: uid {uid!r} is not a 128-bit hexadecimal id, as DataComp's are")
    return divmod(value, 1 << 64)


UID_DTYPE = np.dtype("<u8,<u8")


def read_uid_list(path: str | Path) -> np.ndarray:
    """The uids of a DataComp subset file, sorted and unique, as 16-byte values (``UID_DTYPE``
    viewed as ``V16``): a ``np.save``'d structured array of two uint64 fields (``u8,u8``, as
    ``filter --subset-out`` and DataComp write it) or of shape (n, 2), or the headerless form
    DataComp's resharder also reads (the pairs' raw little-endian bytes)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header = f.read(6)
        if header == b"\x93NUMPY":
            array = np.load(path, allow_pickle=False)
        else:
            if path.stat().st_size % UID_DTYPE.itemsize:
                raise NcleanerError(f"{path}: neither a .npy file nor a whole number of 16-byte uids")
            array = np.fromfile(path, dtype=UID_DTYPE)
    except (OSError, ValueError) as exc:
        raise NcleanerError(f"{path}: cannot read subset file: {first_line(exc)}") from None
    if array.dtype.names and len(array.dtype.names) == 2 and all(array.dtype[n] == np.uint64 for n in (0, 1)):
        pairs = array.astype(UID_DTYPE)
    elif array.dtype == np.uint64 and array.ndim == 2 and array.shape[1] == 2:
        pairs = np.ascontiguousarray(array).view(UID_DTYPE).ravel()
    else:
        raise NcleanerError(f"{path}: not a subset file: dtype {array.dtype}, shape {array.shape} (want u8,u8)")
    return np.unique(np.ascontiguousarray(pairs.ravel()).view("V16"))


def add_listed_uids(plan: OverridePlan, reports: dict[str, pd.DataFrame], which: str, path: str | Path) -> None:
    """Add to ``plan``'s ``which`` side (keep or reject) the rows whose uid the subset file at
    ``path`` lists, and count (and warn about) its uids that match no sample."""
    rows, plan.uids_not_found[which] = listed_rows(reports, read_uid_list(path))
    for url, found in rows.items():
        (plan.keep if which == "keep" else plan.reject).setdefault(url, set()).update(found)
    if plan.uids_not_found[which]:
        logger.warning("%s: %d uid(s) match no sample of the pool", path, plan.uids_not_found[which])


def listed_rows(reports: dict[str, pd.DataFrame], listed: np.ndarray) -> tuple[dict[str, set[int]], int]:
    """Per shard, the report rows whose uid is in ``listed`` (``read_uid_list``), and how many of
    the listed uids match no row."""
    rows, matched = {}, []
    for url, report in reports.items():
        column = report["uid"].tolist() if "uid" in report.columns else [None] * len(report)
        values = [uid_value(uid, url) for uid in column]
        present = [i for i, v in enumerate(values) if v is not None]
        keys = np.array([values[i] for i in present], dtype=UID_DTYPE).view("V16")
        hit = np.isin(keys, listed)
        rows[url] = {present[i] for i in np.flatnonzero(hit)}
        matched.append(keys[hit])
    return rows, len(listed) - (len(np.unique(np.concatenate(matched))) if matched else 0)


def route(
    report: pd.DataFrame,
    rule: Rule,
    *,
    keep_rows: set[int] | frozenset = frozenset(),
    reject_rows: set[int] | frozenset = frozenset(),
    duplicate_rows: set[int] | frozenset = frozenset(),
) -> list[str]:
    """What becomes of each row of one shard's report: ``KEPT``, ``KEPT_BY_OVERRIDE``, or the
    reason it is rejected (``BELOW_THRESHOLD``, ``WHERE``, ``DUPLICATE``, ``OVERRIDE``, or its
    non-ok status).

    ``--where``, a SQL predicate over the report's columns, arrives as the report's ``WHERE_HOLDS``
    column (``load_shard_reports(where=...)``), and ``duplicate_rows`` (``filter --dedup``) are the
    rows that repeat another sample; both are ANDed
    with the rule, in that order: a row the rule keeps but the predicate does not is rejected as
    ``WHERE``, one it keeps that is a duplicate as ``DUPLICATE``. An override counts only where it
    changes that decision: a listed sample already kept (or rejected) keeps its plain outcome.
    """
    outcomes = []
    values = report[rule.column].tolist()
    holds = report[WHERE_HOLDS].to_numpy() if WHERE_HOLDS in report.columns else None
    for i, status in enumerate(report["status"].tolist()):
        if status != schema.OK:
            outcomes.append(status)  # no usable pair: no list can keep it
            continue
        by_rule = rule.keep(status, values[i])
        reason = BELOW_THRESHOLD if not by_rule else WHERE if holds is not None and not holds[i] else None
        if reason is None and i in duplicate_rows:
            reason = DUPLICATE
        if reason is None:
            outcomes.append(OVERRIDE if i in reject_rows else KEPT)
        else:
            outcomes.append(KEPT_BY_OVERRIDE if i in keep_rows else reason)
    return outcomes


def where_mask(report: pa.Table | pd.DataFrame, where: str) -> np.ndarray:
    """Per row of ``report``, whether the SQL predicate ``where`` holds (NULL counts as not).

    DuckDB evaluates it, with its access to files and the network turned off and the setting
    locked, as one expression over the report's columns: a second statement, ``read_csv(...)``
    or ``COPY ... TO`` is refused, since a predicate often comes from a config file or a
    pipeline. A predicate that does not parse, or names a column the report lacks, is one line.
    """
    import duckdb

    query = f"SELECT coalesce(CAST(({where}) AS BOOLEAN), false) FROM report ORDER BY {_ROW}"
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise NcleanerError(f"--where {where!r}: {_sql_error(exc)}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise NcleanerError(f"--where {where!r}: must be one expression over the report's columns")
    con = duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})
    try:
        rows = np.arange(len(report))
        if isinstance(report, pa.Table):
            con.register("report", report.append_column(_ROW, pa.array(rows)))
        else:
            con.register("report", report.assign(**{_ROW: rows}))
        return con.execute(query).fetchnumpy()[con.description[0][0]].astype(bool)
    except duckdb.Error as exc:
        raise NcleanerError(f"--where {where!r}: {_sql_error(exc)}") from None
    finally:
        con.close()


# The row number where_mask orders by: DuckDB's scan order is not a promise.
_ROW = "__ncleaner_row"


def _sql_error(exc: Exception) -> str:
    """DuckDB's message, first line, without the query it quotes back."""
    return first_line(exc).replace(f" {_ROW}", "")


def describe(rule: Rule, where: str | None) -> str:
    """The rule as given with its resolved threshold, and the ``--where`` predicate it is ANDed with."""
    return rule.describe() + (f" and --where {where}" if where else "")


def is_kept(outcome: str) -> bool:
    return outcome in (KEPT, KEPT_BY_OVERRIDE)


# The column ``load_shard_reports`` adds with ``where``: whether the predicate holds on the row.
WHERE_HOLDS = "__where_holds"
# The columns ``load_shard_reports`` keeps whatever it is asked for.
_ALWAYS = ("key", "index", "status", "model_id")


def load_shard_reports(
    report_dir: Path,
    urls: list[str],
    *,
    on_bad_shard: str = "fail",
    columns: Iterable[str] | None = None,
    where: str | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The finished report of every input shard, and the shards ``score`` could not read.

    Each part is read whole, one at a time, and checked (``schema.read_report_table``); only
    ``columns`` of it are kept (all when None; ``key``, ``index``, ``status`` and ``model_id``
    always, the last two as categories), so that what stays in memory for the pool is those columns, not its
    captions. With ``where``, the predicate (``where_mask``) is evaluated on each whole part and
    kept as the boolean column ``WHERE_HOLDS``.

    A shard without a finished report is an error, except one that ``score
    --on-bad-shard skip`` recorded as unreadable when ``on_bad_shard`` is ``skip``.
    A report holding rows of more than one model is refused: their scores cannot
    be ranked against each other.
    """
    if not report_dir.is_dir():
        raise NcleanerError(f"{report_dir}: no such report directory (run ncleaner score first)")
    reports, skipped = {}, {}
    kept = None if columns is None else [*_ALWAYS, *(c for c in columns if c not in _ALWAYS)]
    for url, name in zip(urls, shard_names(urls), strict=True):
        table, marker = report_paths(report_dir, name)
        if marker.is_file() and table.is_file():
            whole = schema.read_report_table(table)
            part = (whole if kept is None else whole.select([c for c in kept if c in whole.column_names])).to_pandas()
            if kept is not None:
                part = part.astype({"status": "category", "model_id": "category"})
            if where is not None:
                part[WHERE_HOLDS] = where_mask(whole, where)
            reports[url] = part
            continue
        failed = failed_marker(report_dir, name)
        if failed.is_file() and on_bad_shard == "skip":
            skipped[url] = _failure_reason(failed)
            continue
        why = f"score could not read it: {_failure_reason(failed)}" if failed.is_file() else "run ncleaner score on it"
        raise NcleanerError(f"{table}: no finished report for shard {url} ({why})")
    model_ids = report_model_ids(reports)
    if len(model_ids) > 1:
        raise NcleanerError(
            f"{report_dir}: holds scores of {len(model_ids)} models ({', '.join(model_ids)}); "
            "re-score every shard with one model (ncleaner score --overwrite)"
        )
    _warn_repeated_keys(reports)
    return reports, skipped


def unscored_reports(urls: list[str], *, on_bad_shard: str = "fail") -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """What ``filter --keep-uids`` with no report routes by: per shard, the rows a report would
    begin with (key, index, caption, image SHA-1, the reader's status, uid), read from the shard
    itself (nothing decoded), and the shards that cannot be read (``on_bad_shard``)."""
    reports, tally = {}, ShardTally()
    for url in urls:
        rows = {"key": [], "index": [], "caption": [], "image_sha1": [], "status": [], "uid": []}
        reader = read_shard(url)
        try:
            for raw in reader:
                caption, _, meta, text_status = read_text_fields(raw)
                rows["key"].append(raw.key)
                rows["index"].append(raw.index)
                rows["caption"].append(caption)
                rows["image_sha1"].append(sha1_of(image_member(raw)))
                rows["status"].append(raw.problem or text_status)
                rows["uid"].append(json_uid(meta))
        except UnreadableShard as exc:
            tally.count({"shard": url, "error": str(exc)}, on_bad_shard=on_bad_shard, log=logger)
            continue
        if reader.damage:
            rows["status"] = [schema.TRUNCATED_SHARD] * len(rows["key"])
        reports[url] = pd.DataFrame(rows)
    return reports, tally.unreadable_shards


def _warn_repeated_keys(reports: dict[str, pd.DataFrame]) -> None:
    """One warning, with a count, when keys repeat across shards (a key is unique within a part).

    WebDataset groups a tar's members by key, so two such samples written into one output shard
    read back as one; override lists must then name the shard too (``SHARD<TAB>KEY``).
    """
    if len(reports) < 2:
        return
    keys = pd.concat([r["key"] for r in reports.values()], ignore_index=True)
    repeated = keys[keys.duplicated(keep=False)]
    if repeated.empty:
        return
    example = repeated.iloc[0]
    shards = [url for url, r in reports.items() if (r["key"] == example).any()][:2]
    logger.warning(
        "%d key(s) appear in more than one shard (e.g. %s in %s and %s): a written shard holding two of "
        "them has duplicate member names, which WebDataset readers merge into one sample; key lists "
        "must name the shard (SHARD<TAB>KEY)",
        repeated.nunique(),
        printable(str(example)),
        printable(shards[0]),
        printable(shards[1]),
    )


def report_model_ids(reports: dict[str, pd.DataFrame]) -> list[str]:
    return sorted({m for r in reports.values() if "model_id" in r for m in r["model_id"].dropna().unique().tolist()})


def _failure_reason(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("reason", "unreadable"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


class ScoredSamples:
    """What identifies the sample each report row of shard ``url`` was scored from: its position,
    key, caption and image SHA-1 (a report written before ncleaner stored the hash: key and caption).

    ``filter`` and ``inspect`` read the shard again; ``check`` refuses, in one line, a sample
    that is not the one its row judged, so no old score stands for new bytes.
    """

    def __init__(self, url: str, report: pd.DataFrame):
        self.url = url
        self.keys = report["key"].tolist()
        self.captions = [_text(c) for c in report["caption"].tolist()]
        self.sha1s = [_text(h) for h in report["image_sha1"].tolist()] if "image_sha1" in report.columns else None

    def __len__(self) -> int:
        return len(self.keys)

    def check(self, n: int, raw: RawSample) -> None:
        """Raise unless ``raw``, the shard's sample ``n``, is the one report row ``n`` was scored from."""
        if n >= len(self.keys) or self.keys[n] != raw.key:
            raise self._changed(n, raw, "")
        differs = []
        if read_text_fields(raw)[0] != self.captions[n]:
            differs.append("caption")
        if self.sha1s is not None and sha1_of(image_member(raw)) != self.sha1s[n]:
            differs.append("image")
        if differs:
            raise self._changed(n, raw, f" (its {' and '.join(differs)} differs)")

    def _changed(self, n: int, raw: RawSample, detail: str) -> NcleanerError:
        return NcleanerError(
            f"{self.url}: sample {n} ({raw.key}) does not match its report row{detail}; the shard changed "
            "since it was scored (run ncleaner score --overwrite)"
        )


def part_paths(report_dir: Path, urls: Iterable[str]) -> dict[str, str]:
    """Per shard URL, the path of its part of the report at ``report_dir`` (what ``route_rows``
    reads as each shard is routed or shown)."""
    urls = list(urls)
    return {url: str(report_paths(report_dir, name)[0]) for url, name in zip(urls, shard_names(urls), strict=True)}


# The report columns ``filtering.route_shard`` reads, and ``inspect``'s cards.
ROUTE_COLUMNS = ("key", "status", "caption", "image_sha1")


def route_rows(source) -> pd.DataFrame:
    """One shard's report rows as ``filtering.route_shard`` (and ``inspect``'s cards) read them:
    ``ROUTE_COLUMNS`` of a report part (read now, from its path: the pool's captions are never
    all in memory) or of the rows given.
    A part written before ncleaner stored image hashes has no ``image_sha1``."""
    if isinstance(source, str):
        present = pq.read_schema(source).names
        return pq.read_table(source, columns=[c for c in ROUTE_COLUMNS if c in present]).to_pandas()
    return source[[c for c in ROUTE_COLUMNS if c in source.columns]]


def _text(value) -> str | None:
    """A text cell as read back by pandas: a missing one is NaN, not None."""
    return value if isinstance(value, str) else None
