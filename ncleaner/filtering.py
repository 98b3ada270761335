"""``filter``: write the kept (and optionally the rejected) samples as new shards.

Guarantees (docs/design.md section 6, "The filter's guarantees"): kept + rejected = every
sample read, counted in ``manifest.json``; every member of a written sample has
the name, bytes and position it was read with; samples that could not be scored
are rejected, never dropped; the output directory appears only once complete,
and never where it could overwrite or delete an input.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import schema
from .errors import NcleanerError, UnreadableShard
from .schema import AUTO_RULE, SCORE_COLUMNS, Rule, failed_marker, report_paths
from .shards import expand_shards, read_shard, shard_names
from .writer import MANIFEST, ShardSink, StagedDir, check_outputs_apart_from_inputs, recorded_files, write_json

logger = logging.getLogger(__name__)
ON_BAD_SHARD = ("fail", "skip")


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


@dataclass
class FilterResult:
    """What ``filter_shards`` wrote, with the counts of its manifest."""

    out_dir: Path
    input_count: int
    kept_count: int
    rejected_count: int
    rejected_by_reason: dict[str, int]
    rule: Rule
    kept_shards: list[str] = field(default_factory=list)
    rejected_shards: list[str] = field(default_factory=list)
    skipped_shards: dict[str, str] = field(default_factory=dict)
    truncated_shards: list[str] = field(default_factory=list)


def load_shard_reports(
    report_dir: Path, urls: list[str], *, on_bad_shard: str = "fail"
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The finished report of every input shard, and the shards ``score`` could not read.

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
            reports[url] = pd.read_parquet(table)
            continue
        failed = failed_marker(report_dir, name)
        if failed.is_file() and on_bad_shard == "skip":
            skipped[url] = _failure_reason(failed)
            continue
        why = f"score could not read it: {_failure_reason(failed)}" if failed.is_file() else "run ncleaner score on it"
        raise NcleanerError(f"{table}: no finished report for shard {url} ({why})")
    model_ids = _model_ids(reports)
    if len(model_ids) > 1:
        raise NcleanerError(
            f"{report_dir}: holds scores of {len(model_ids)} models ({', '.join(model_ids)}); "
            "re-score every shard with one model (ncleaner score --overwrite)"
        )
    return reports, skipped


def _model_ids(reports: dict[str, pd.DataFrame]) -> list[str]:
    return sorted({m for r in reports.values() for m in r["model_id"].dropna().unique().tolist()})


def _failure_reason(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("reason", "unreadable"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def filter_shards(
    shards: str | Iterable[str],
    report_dir: str | Path,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    auto: bool = False,
    column: str = "score",
    rejected_out: str | Path | None = None,
    maxcount: int = 10_000,
    force: bool = False,
    on_bad_shard: str = "fail",
    progress: bool = False,
) -> FilterResult:
    """Split ``shards`` into kept and rejected samples by the report's scores.

    Args:
        shards: the SHARDS that were scored (any form ``expand_shards`` takes).
        report_dir: the report ``score`` wrote for them.
        out_dir: directory for the kept samples' shards and ``manifest.json``.
        threshold, keep_fraction, auto: the rule; give exactly one (see ``make_rule``).
        column: the score column ``threshold`` and ``keep_fraction`` apply to.
        rejected_out: also write the rejected samples here, as shards with their own manifest.
        maxcount: samples per output shard.
        force: replace the output of an earlier ``filter`` run (only files its manifest lists).
        on_bad_shard: ``fail`` (default) stops at a shard that cannot be read; ``skip``
            records it in the manifest and goes on.
        progress: show a progress bar over the samples.
    """
    if on_bad_shard not in ON_BAD_SHARD:
        raise NcleanerError(f"--on-bad-shard {on_bad_shard}: must be one of {', '.join(ON_BAD_SHARD)}")
    urls = expand_shards(shards)
    check_outputs_apart_from_inputs([out_dir, rejected_out], urls)
    if rejected_out is not None:
        o, r = Path(out_dir).resolve(), Path(rejected_out).resolve()
        if o == r or o.is_relative_to(r) or r.is_relative_to(o):
            raise NcleanerError(f"{rejected_out}: --rejected-out must be apart from --out (not the same, not nested)")
    report_dir = Path(report_dir)
    reports, skipped = load_shard_reports(report_dir, urls, on_bad_shard=on_bad_shard)
    rule = make_rule(list(reports.values()), threshold=threshold, keep_fraction=keep_fraction, auto=auto, column=column)

    def owned(d: Path) -> set[str] | None:
        return recorded_files(d, "filter")

    reasons: Counter = Counter()
    truncated: list[str] = []
    with ExitStack() as stack:
        kept_stage = stack.enter_context(StagedDir(out_dir, force=force, owned=owned))
        rejected_stage = (
            stack.enter_context(StagedDir(rejected_out, force=force, owned=owned)) if rejected_out is not None else None
        )
        kept = ShardSink(kept_stage.path, maxcount)
        rejected = ShardSink(rejected_stage.path, maxcount) if rejected_stage is not None else None
        total = sum(len(r) for r in reports.values())
        bar = stack.enter_context(tqdm(total=total, unit="pair", desc="filtering", disable=not progress))
        with kept, rejected or ExitStack():
            for url in urls:
                if url in skipped:
                    continue
                try:
                    damaged = _filter_shard(url, reports[url], rule, kept, rejected, reasons)
                    bar.update(len(reports[url]))
                except UnreadableShard as exc:
                    if on_bad_shard == "fail":
                        raise
                    skipped[url] = str(exc)
                    logger.warning("skipped %s", exc)
                    continue
                if damaged:
                    truncated.append(url)
        result = FilterResult(
            out_dir=Path(out_dir),
            input_count=kept.count + sum(reasons.values()),
            kept_count=kept.count,
            rejected_count=sum(reasons.values()),
            rejected_by_reason=dict(reasons),
            rule=rule,
            kept_shards=[str(Path(out_dir) / p.name) for p in kept.paths],
            rejected_shards=[str(Path(rejected_out) / p.name) for p in rejected.paths] if rejected else [],
            skipped_shards=skipped,
            truncated_shards=truncated,
        )
        manifest = _manifest(result, urls, report_dir, reports, rejected_out)
        if rejected_stage is not None:
            write_json(
                rejected_stage.path / MANIFEST, {**manifest, "role": "rejected", "files": _names(rejected.paths)}
            )
            rejected_stage.commit()
        # The kept directory goes last: its manifest is what says the whole run finished.
        write_json(kept_stage.path / MANIFEST, {**manifest, "role": "kept", "files": _names(kept.paths)})
        kept_stage.commit()
    return result


def _filter_shard(url, report: pd.DataFrame, rule: Rule, kept, rejected, reasons: Counter) -> bool:
    """Route one shard's samples by its report rows; True when the shard is damaged (truncated)."""
    keys, statuses, values = report["key"].tolist(), report["status"].tolist(), report[rule.column].tolist()
    reader = read_shard(url)
    n = 0
    for raw in reader:
        if n >= len(keys) or keys[n] != raw.key:
            raise NcleanerError(
                f"{url}: sample {n} ({raw.key}) does not match its report row; the shard changed "
                "since it was scored (run ncleaner score --overwrite)"
            )
        if rule.keep(statuses[n], values[n]):
            kept.write_raw(raw)
        else:
            reasons["below_threshold" if statuses[n] == schema.OK else statuses[n]] += 1
            if rejected is not None:
                rejected.write_raw(raw)
        n += 1
    if n != len(keys):
        raise NcleanerError(f"{url}: has {n} samples but its report has {len(keys)} rows")
    flagged = n > 0 and all(s == schema.TRUNCATED_SHARD for s in statuses)
    if bool(reader.damage) != flagged:
        state = f"is damaged ({reader.damage})" if reader.damage else "is intact"
        raise NcleanerError(f"{url}: {state} but its report says otherwise; the shard changed since it was scored")
    return bool(reader.damage)


def _names(paths) -> list[str]:
    return [os.path.basename(p) for p in paths]


def _manifest(result: FilterResult, urls, report_dir: Path, reports, rejected_out) -> dict:
    model_ids = _model_ids(reports)  # at most one: load_shard_reports refuses more
    return {
        "command": "filter",
        "input_shards": urls,
        "input_count": result.input_count,
        "kept_count": result.kept_count,
        "rejected_count": result.rejected_count,
        "rejected_by_reason": result.rejected_by_reason,
        "skipped_shards": result.skipped_shards,
        "truncated_shards": result.truncated_shards,
        "rule": asdict(result.rule),
        "model_id": model_ids[0] if model_ids else None,
        "report": str(report_dir),
        "kept_shards": _names(result.kept_shards),
        "rejected_out": str(rejected_out) if rejected_out is not None else None,
        "rejected_shards": _names(result.rejected_shards),
    }
