"""What a report row becomes, and the report as ``filter`` and ``inspect`` read it.

``route`` is the one place a report row becomes kept or rejected (with the reason), under a
resolved rule (``make_rule``) and the override lists (``read_key_list``, ``resolve_overrides``):
``filter``, ``filter --dry-run`` and ``inspect`` all go through it, so they agree. The reports
they route are read here too (``load_shard_reports``: every part checked by
``schema.read_report_part``), and ``ScoredSamples`` checks, as a shard is read again, that each
sample is the one its row scored. Nothing here writes: the shard writer is ``filtering``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .errors import NcleanerError, first_line, printable
from .schema import AUTO_RULE, SCORE_COLUMNS, Rule, failed_marker, report_paths
from .shards import RawSample, image_member, is_local, read_text_fields, sha1_of, shard_names

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
    not_found: dict[str, list[str]] = field(default_factory=lambda: {"keep": [], "reject": []})
    kept_not_ok: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "keep_keys": self.keep_keys,
            "reject_keys": self.reject_keys,
            "not_found": self.not_found,
            "kept_not_ok": self.kept_not_ok,
        }


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
) -> OverridePlan:
    """Match the lines of the key lists to report rows (``reports``: shard URL -> its report).

    A bare key names every sample with that key in the pool; ``SHARD<TAB>KEY`` only the one in
    that shard. A line that names no sample is kept in ``not_found`` and logged: it is most
    likely a typo or a key from another pool, and the user must hear of it. A sample named by
    both lists is an error. A sample with a non-ok status named by --keep-keys stays rejected
    (it has no usable pair to keep) and is listed in ``kept_not_ok``.
    """
    plan = OverridePlan(
        keep_keys=str(keep_keys) if keep_keys is not None else None,
        reject_keys=str(reject_keys) if reject_keys is not None else None,
    )
    if keep_keys is None and reject_keys is None:
        return plan
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
    for url, rows in plan.keep.items():
        both = rows & plan.reject.get(url, set())
        if both:
            key = reports[url]["key"].iloc[min(both)]
            raise NcleanerError(
                f"{reject_keys}: sample {key!r} of {url} is also in {keep_keys}; "
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
            keep_keys,
            len(plan.kept_not_ok),
            first["key"],
            first["status"],
        )
    return plan


def route(
    report: pd.DataFrame,
    rule: Rule,
    *,
    keep_rows: set[int] | frozenset = frozenset(),
    reject_rows: set[int] | frozenset = frozenset(),
    where: str | None = None,
    duplicate_rows: set[int] | frozenset = frozenset(),
) -> list[str]:
    """What becomes of each row of one shard's report: ``KEPT``, ``KEPT_BY_OVERRIDE``, or the
    reason it is rejected (``BELOW_THRESHOLD``, ``WHERE``, ``DUPLICATE``, ``OVERRIDE``, or its
    non-ok status).

    ``where`` (``filter --where``) is a SQL predicate over the report's columns, and
    ``duplicate_rows`` (``filter --dedup``) the rows that repeat another sample; both are ANDed
    with the rule, in that order: a row the rule keeps but the predicate does not is rejected as
    ``WHERE``, one it keeps that is a duplicate as ``DUPLICATE``. An override counts only where it
    changes that decision: a listed sample already kept (or rejected) keeps its plain outcome.
    """
    outcomes = []
    values = report[rule.column].tolist()
    holds = where_mask(report, where) if where is not None else None
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


def where_mask(report: pd.DataFrame, where: str) -> np.ndarray:
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
        con.register("report", report.assign(**{_ROW: np.arange(len(report))}))
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


def load_shard_reports(
    report_dir: Path, urls: list[str], *, on_bad_shard: str = "fail"
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The finished report of every input shard, and the shards ``score`` could not read.

    Each part is checked as it is read (``schema.read_report_part``).

    A shard without a finished report is an error, except one that ``score
    --on-bad-shard skip`` recorded as unreadable when ``on_bad_shard`` is ``skip``.
    A report holding rows of more than one model is refused: their scores cannot
    be ranked against each other.
    """
    if not report_dir.is_dir():
        raise NcleanerError(f"{report_dir}: no such report directory (run ncleaner score first)")
    reports, skipped = {}, {}
    for url, name in zip(urls, shard_names(urls), strict=True):
        table, marker = report_paths(report_dir, name)
        if marker.is_file() and table.is_file():
            reports[url] = schema.read_report_part(table)
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
    return sorted({m for r in reports.values() for m in r["model_id"].dropna().unique().tolist()})


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


def _text(value) -> str | None:
    """A text cell as read back by pandas: a missing one is NaN, not None."""
    return value if isinstance(value, str) else None
