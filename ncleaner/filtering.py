"""``filter``: write the kept (and optionally the rejected) samples as new shards.

Guarantees (DESIGN.md section 5): kept + rejected = every input sample, counted
in ``manifest.json``; every member of a written sample has the bytes, suffix and
key it was read with; samples that could not be scored are rejected, never
dropped; shards appear under their final names only once complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import NcleanerError
from .model import SCORE_COLUMNS
from .report import report_paths
from .shards import expand_shards, read_shard, shard_names
from .writer import ShardSink, atomic_write, prepare_output_dir

MANIFEST = "manifest.json"


@dataclass
class Rule:
    """Keep a sample when its status is ok and ``column >= threshold``."""

    column: str
    threshold: float
    mode: str  # "threshold", "keep_fraction" or "auto"
    keep_fraction: float | None = None

    def keep(self, status: str, value) -> bool:
        return status == "ok" and value is not None and not pd.isna(value) and float(value) >= self.threshold


def make_rule(
    reports: list[pd.DataFrame],
    threshold: float | None,
    keep_fraction: float | None,
    auto: bool,
    column: str,
) -> Rule:
    """Resolve exactly one of --threshold, --keep-fraction, --auto into a threshold on a column."""
    given = (threshold is not None) + (keep_fraction is not None) + bool(auto)
    if given != 1:
        raise NcleanerError("give exactly one of --threshold, --keep-fraction or --auto")
    if auto:
        return Rule(column="clean_prob", threshold=0.5, mode="auto")
    if column not in SCORE_COLUMNS:
        raise NcleanerError(f"--column {column}: not a score column (one of {', '.join(SCORE_COLUMNS)})")
    if threshold is not None:
        return Rule(column=column, threshold=float(threshold), mode="threshold")
    if not 0.0 < keep_fraction <= 1.0:
        raise NcleanerError(f"--keep-fraction {keep_fraction}: must be in (0, 1]")
    values = np.concatenate([r.loc[r["status"] == "ok", column].to_numpy(dtype=np.float64) for r in reports])
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise NcleanerError("no scored samples in the report: nothing to rank for --keep-fraction")
    # The k-th largest value: keeping >= it keeps the top fraction (more only on exact ties).
    k = max(1, int(round(keep_fraction * len(values))))
    cut = float(np.sort(values)[::-1][k - 1])
    return Rule(column=column, threshold=cut, mode="keep_fraction", keep_fraction=keep_fraction)


@dataclass
class FilterResult:
    out_dir: Path
    input_count: int
    kept_count: int
    rejected_count: int
    rejected_by_reason: dict[str, int]
    rule: Rule
    kept_shards: list[str] = field(default_factory=list)
    rejected_shards: list[str] = field(default_factory=list)


def load_shard_reports(report_dir: Path, urls: list[str]) -> list[pd.DataFrame]:
    """The finished report of every input shard, in input order (one-line error for a missing one)."""
    if not report_dir.is_dir():
        raise NcleanerError(f"{report_dir}: no such report directory (run ncleaner score first)")
    reports = []
    for url, name in zip(urls, shard_names(urls), strict=True):
        table, marker = report_paths(report_dir, name)
        if not marker.is_file() or not table.is_file():
            raise NcleanerError(f"{table}: no finished report for shard {url} (run ncleaner score on it)")
        reports.append(pd.read_parquet(table))
    return reports


def filter_shards(
    shards: str | Iterable[str],
    report_dir: str | Path,
    out_dir: str | Path,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    auto: bool = False,
    column: str = "score",
    rejected_out: str | Path | None = None,
    maxcount: int = 10_000,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> FilterResult:
    """Split ``shards`` into kept and rejected samples by the report's scores."""
    urls = expand_shards(shards)
    report_dir = Path(report_dir)
    reports = load_shard_reports(report_dir, urls)
    rule = make_rule(reports, threshold, keep_fraction, auto, column)
    if rejected_out is not None and Path(rejected_out).resolve() == Path(out_dir).resolve():
        raise NcleanerError(f"{rejected_out}: --rejected-out must differ from --out")
    out = prepare_output_dir(out_dir, force)
    rejected_dir = prepare_output_dir(rejected_out, force) if rejected_out is not None else None

    reasons: Counter = Counter()
    with ExitStack() as stack:
        kept = stack.enter_context(ShardSink(out, maxcount))
        rejected = stack.enter_context(ShardSink(rejected_dir, maxcount)) if rejected_dir is not None else None
        for url, report in zip(urls, reports, strict=True):
            keys, statuses, values = report["key"].tolist(), report["status"].tolist(), report[rule.column].tolist()
            n = 0
            for raw in read_shard(url):
                if n >= len(keys) or keys[n] != raw.key:
                    raise NcleanerError(
                        f"{url}: sample {n} ({raw.key}) does not match its report row; the shard changed "
                        "since it was scored (run ncleaner score --overwrite)"
                    )
                sample = {"__key__": raw.key, **raw.members}
                if rule.keep(statuses[n], values[n]):
                    kept.write(sample)
                else:
                    reasons["below_threshold" if statuses[n] == "ok" else statuses[n]] += 1
                    if rejected is not None:
                        rejected.write(sample)
                n += 1
            if n != len(keys):
                raise NcleanerError(f"{url}: has {n} samples but its report has {len(keys)} rows")

    result = FilterResult(
        out_dir=out,
        input_count=sum(len(r) for r in reports),
        kept_count=kept.count,
        rejected_count=sum(reasons.values()),
        rejected_by_reason=dict(reasons),
        rule=rule,
        kept_shards=[str(p) for p in kept.paths],
        rejected_shards=[str(p) for p in rejected.paths] if rejected is not None else [],
    )
    _write_manifest(result, urls, report_dir, reports, rejected_dir)
    return result


def _write_manifest(result: FilterResult, urls, report_dir: Path, reports, rejected_dir) -> None:
    model_ids = sorted({m for r in reports for m in r["model_id"].dropna().unique().tolist()})
    manifest = {
        "input_shards": urls,
        "input_count": result.input_count,
        "kept_count": result.kept_count,
        "rejected_count": result.rejected_count,
        "rejected_by_reason": result.rejected_by_reason,
        "rule": asdict(result.rule),
        "model_id": model_ids[0] if len(model_ids) == 1 else model_ids,
        "report": str(report_dir),
        "kept_shards": [os.path.basename(p) for p in result.kept_shards],
        "rejected_out": str(rejected_dir) if rejected_dir is not None else None,
        "rejected_shards": [os.path.basename(p) for p in result.rejected_shards],
    }
    atomic_write(result.out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
