"""``filter``: write the kept (and optionally the rejected) samples as new shards.

Guarantees (docs/design.md section 6, "The filter's guarantees"): kept + rejected = every
sample read, counted in ``manifest.json``; every member of a written sample has
the name, bytes and position it was read with; samples that could not be scored
are rejected, never dropped; the output directory appears only once complete,
and never where it could overwrite or delete an input.

Which samples are kept, and why, is decided in ``rules`` (``route``), which ``inspect`` shares;
this module reads the shards again and writes them.
"""

from __future__ import annotations

import logging
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
from .dedup import load_duplicates
from .engine import DEFAULT_RUN, RunOptions, ShardTally, check_on_bad_shard, ray_tasks
from .errors import NcleanerError, UnreadableShard
from .rules import (
    KEPT,
    KEPT_BY_OVERRIDE,
    NOT_LISTED,
    OVERRIDE,
    OverridePlan,
    ScoredSamples,
    add_listed_uids,
    is_kept,
    load_shard_reports,
    make_rule,
    part_paths,
    report_model_ids,
    resolve_overrides,
    route,
    route_rows,
    uid_value,
    unscored_reports,
)
from .schema import SCORE_COLUMNS, UIDS_RULE, Rule
from .shards import expand_shards, read_shard, shard_names
from .writer import (
    MANIFEST,
    ShardPiece,
    ShardSink,
    StagedDir,
    check_outputs_apart_from_inputs,
    recorded_files,
    replaceable_entries,
    shard_layout,
    write_json,
    write_npy,
    write_shard_from_pieces,
)

logger = logging.getLogger(__name__)


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
    unreadable_shards: dict[str, str] = field(default_factory=dict)
    truncated_shards: list[str] = field(default_factory=list)
    kept_by_override: int = 0
    rejected_by_override: int = 0
    overrides: dict = field(default_factory=dict)
    # Per input shard: {"input": n, "kept": n, "kept_by_override": n, "rejected_by_reason": {...}}.
    per_shard: dict[str, dict] = field(default_factory=dict)
    where: str | None = None  # the --where predicate ANDed with the rule
    dedup: Path | None = None  # the dedup directory whose duplicates were rejected
    dry_run: bool = False


def filter_shards(
    shards: str | Iterable[str],
    report_dir: str | Path | None,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    auto: bool = False,
    column: str = "score",
    where: str | None = None,
    rejected_out: str | Path | None = None,
    subset_out: str | Path | None = None,
    rejected_subset_out: str | Path | None = None,
    keep_keys: str | Path | None = None,
    reject_keys: str | Path | None = None,
    keep_uids: str | Path | None = None,
    reject_uids: str | Path | None = None,
    dedup: str | Path | None = None,
    dry_run: bool = False,
    maxcount: int = 10_000,
    force: bool = False,
    on_bad_shard: str = "fail",
    run: RunOptions = DEFAULT_RUN,
) -> FilterResult:
    """Split ``shards`` into kept and rejected samples by the report's scores.

    Args:
        shards: the SHARDS that were scored (any form ``expand_shards`` takes).
        report_dir: the report ``score`` wrote for them; None with ``keep_uids`` alone, which is
            then the whole rule, as in DataComp's resharder: a sample is kept when its json's uid
            is listed, whatever else it holds (nothing is decoded), and rejected as
            ``not_listed`` otherwise.
        out_dir: directory for the kept samples' shards and ``manifest.json``.
        threshold, keep_fraction, auto: the rule; give exactly one (see ``make_rule``).
        column: the score column ``threshold`` and ``keep_fraction`` apply to.
        where: a SQL predicate over the report's columns (kept json fields included) that a kept
            row must also meet (``rules.where_mask``); rows the rule keeps and it does not are
            rejected with the reason ``where``.
        rejected_out: also write the rejected samples here, as shards with their own manifest.
        subset_out, rejected_subset_out: also write the kept (rejected) samples' uids as a DataComp
            subset file (``subset_uids``); every such sample must have a uid.
        keep_keys: a file of keys (``KEY`` or ``SHARD<TAB>KEY`` a line) to keep whatever the rule
            says; a sample with a non-ok status stays rejected (see ``resolve_overrides``).
        reject_keys: likewise, keys to reject whatever the rule says.
        keep_uids, reject_uids: DataComp subset files (``rules.read_uid_list``) whose uids are
            kept or rejected whatever the rule says, as the key lists are.
        dedup: a directory ``ncleaner dedup`` wrote for these shards: every sample whose group's
            representative is another is rejected with the reason ``duplicate`` (``--keep-keys``
            still keeps one it names).
        dry_run: only count what the rule (and the key lists) would keep and reject, per reason
            and per shard, from the report alone; no shard is read and nothing is written. The
            outputs are still checked, so a dry run fails where the real run would refuse them.
        maxcount: samples per output shard.
        force: replace the output of an earlier ``filter`` run (only files its manifest lists).
        on_bad_shard: ``fail`` (default) stops at a shard that cannot be read; ``skip``
            records it in the manifest and goes on.
        run: where and how it runs (``RunOptions``: its engine, address and progress; filter
            neither decodes nor encodes). On Ray, one task per input shard routes its samples with
            ncleaner's own reader and shard writer; the shards and manifest are byte for byte
            those of the local engine.
    """
    check_on_bad_shard(on_bad_shard)
    run.check()
    urls = expand_shards(shards)
    check_outputs_apart_from_inputs([out_dir, rejected_out], urls)
    if rejected_out is not None:
        o, r = Path(out_dir).resolve(), Path(rejected_out).resolve()
        if o == r or o.is_relative_to(r) or r.is_relative_to(o):
            raise NcleanerError(f"{rejected_out}: --rejected-out must be apart from --out (not the same, not nested)")
    if report_dir is None:
        reports, skipped, rule, plan, outcomes = _by_uids_alone(
            urls,
            keep_uids,
            on_bad_shard,
            others={
                "--threshold": threshold, "--keep-fraction": keep_fraction, "--auto": auto or None, "--where": where,
                "--keep-keys": keep_keys, "--reject-keys": reject_keys, "--reject-uids": reject_uids, "--dedup": dedup,
            },
        )  # fmt: skip
    else:
        report_dir = Path(report_dir)
        # The rule, the overrides and the counts need these columns of the pool; the captions and
        # hashes route_shard checks are read again one part at a time, as each shard is routed.
        needs_uid = any(f is not None for f in (subset_out, rejected_subset_out, keep_uids, reject_uids))
        columns = [*SCORE_COLUMNS, *(["uid"] if needs_uid else []), *(["image_sha1"] if dedup is not None else [])]
        reports, skipped = load_shard_reports(report_dir, urls, on_bad_shard=on_bad_shard, columns=columns, where=where)
        rule = make_rule(
            list(reports.values()), threshold=threshold, keep_fraction=keep_fraction, auto=auto, column=column
        )
        plan = resolve_overrides(
            reports, keep_keys=keep_keys, reject_keys=reject_keys, keep_uids=keep_uids, reject_uids=reject_uids
        )
        dedup = Path(dedup) if dedup is not None else None
        duplicates = load_duplicates(dedup, reports) if dedup is not None else {}
        outcomes = {
            url: route(
                report,
                rule,
                keep_rows=plan.keep.get(url, set()),
                reject_rows=plan.reject.get(url, set()),
                duplicate_rows=duplicates.get(url, set()),
            )
            for url, report in reports.items()
        }

    # Every uid is read, and a missing one refused, here: before any shard is written.
    subsets = {
        Path(path): subset_uids(reports, outcomes, kept=kept)
        for kept, path in ((True, subset_out), (False, rejected_subset_out))
        if path
    }
    for path in subsets:
        if path.exists() and not force:
            raise NcleanerError(f"{path}: exists; pass --force to replace it")

    def owned(d: Path) -> set[str] | None:
        return recorded_files(d, "filter")

    if dry_run:
        for d in (out_dir, rejected_out):
            if d is not None:
                replaceable_entries(Path(d), force=force, owned=owned)
        per_shard = {url: _shard_counts(outcomes[url]) for url in urls if url not in skipped}
        return _result(
            Path(out_dir), rule, per_shard, plan, unreadable_shards=skipped, where=where, dedup=dedup, dry_run=True
        )

    per_shard: dict[str, dict] = {}
    tally = ShardTally(unreadable_shards=skipped)
    with ExitStack() as stack:
        kept_stage = stack.enter_context(StagedDir(out_dir, force=force, owned=owned))
        rejected_stage = (
            stack.enter_context(StagedDir(rejected_out, force=force, owned=owned)) if rejected_out is not None else None
        )
        stages = [kept_stage.path, rejected_stage.path if rejected_stage is not None else None]
        todo = [url for url in urls if url not in skipped]
        sources = {url: reports[url] for url in todo} if report_dir is None else part_paths(report_dir, todo)
        if run.on_ray:
            routed, (kept_paths, rejected_paths) = _route_on_ray(
                todo, sources, outcomes, stages, maxcount=maxcount, run=run
            )
        else:
            total = sum(len(reports[url]) for url in todo)
            bar = stack.enter_context(tqdm(total=total, unit="pair", desc="filtering", disable=not run.progress))
            routed, (kept_paths, rejected_paths) = _route_locally(
                todo, sources, outcomes, stages, maxcount=maxcount, on_bad_shard=on_bad_shard, bar=bar
            )
        for url in todo:
            if tally.count(routed[url], on_bad_shard=on_bad_shard, log=logger):
                per_shard[url] = _shard_counts(outcomes[url])
        result = _result(
            Path(out_dir),
            rule,
            per_shard,
            plan,
            unreadable_shards=skipped,
            where=where,
            dedup=dedup,
            truncated_shards=tally.truncated_shards,
            kept_shards=[str(Path(out_dir) / p.name) for p in kept_paths],
            rejected_shards=[str(Path(rejected_out) / p.name) for p in rejected_paths],
        )
        manifest = _manifest(result, urls, report_dir, reports, rejected_out)
        if rejected_stage is not None:
            write_json(
                rejected_stage.path / MANIFEST, {**manifest, "role": "rejected", "files": _names(rejected_paths)}
            )
            rejected_stage.commit()
        # The kept directory goes last: its manifest is what says the whole run finished.
        write_json(kept_stage.path / MANIFEST, {**manifest, "role": "kept", "files": _names(kept_paths)})
        kept_stage.commit()
    for path, uids in subsets.items():
        # DataComp's subset file: (high, low) 64-bit halves of each uid, dtype u8,u8, sorted. An
        # unreadable shard (not in per_shard) wrote no sample.
        array = np.array([uid for url in per_shard for uid in uids[url]], dtype=np.dtype("u8,u8"))
        array.sort()
        write_npy(path, array)
    return result


def _by_uids_alone(urls, keep_uids, on_bad_shard: str, *, others: dict):
    """``filter`` with no report: ``keep_uids`` is the whole rule (see ``filter_shards``)."""
    if keep_uids is None:
        raise NcleanerError("filter needs --report (what score wrote), or --keep-uids FILE alone")
    given = [name for name, value in others.items() if value is not None]
    if given:
        raise NcleanerError(f"{given[0]}: needs --report (with no report, --keep-uids is the whole rule)")
    reports, skipped = unscored_reports(urls, on_bad_shard=on_bad_shard)
    plan = OverridePlan(keep_uids=str(keep_uids))
    add_listed_uids(plan, reports, "keep", keep_uids)
    listed = plan.keep
    outcomes = {
        url: [KEPT if i in listed.get(url, ()) else NOT_LISTED for i in range(len(r))] for url, r in reports.items()
    }
    return reports, skipped, UIDS_RULE, plan, outcomes


def subset_uids(
    reports: dict[str, pd.DataFrame], outcomes: dict[str, list[str]], *, kept: bool
) -> dict[str, list[tuple[int, int]]]:
    """Per shard, the uids of its kept (or rejected) samples as DataComp's subset file holds them:
    each uid (128-bit hex) as ``divmod(int(uid, 16), 2**64)``.

    Every such sample needs a uid (the ``uid`` report column, from its json): one line gives the
    count of those without, or the first uid that is not 128-bit hex.
    """
    uids: dict[str, list[tuple[int, int]]] = {}
    missing = 0
    for url, report in reports.items():
        column = report["uid"].tolist() if "uid" in report.columns else [None] * len(report)
        uids[url] = []
        for uid, outcome in zip(column, outcomes[url], strict=True):
            if is_kept(outcome) != kept:
                continue
            value = uid_value(uid, url)
            if value is None:
                missing += 1
                continue
            uids[url].append(value)
    if missing:
        side = "kept" if kept else "rejected"
        raise NcleanerError(
            f"--{'' if kept else 'rejected-'}subset-out: {missing} {side} sample(s) have no uid in their json "
            "(a subset file names samples by uid)"
        )
    return uids


def _shard_counts(outcomes: list[str]) -> dict:
    counts = Counter(outcomes)
    return {
        "input": len(outcomes),
        "kept": counts[KEPT] + counts[KEPT_BY_OVERRIDE],
        "kept_by_override": counts[KEPT_BY_OVERRIDE],
        "rejected_by_reason": {k: v for k, v in sorted(counts.items()) if not is_kept(k)},
    }


def _result(out_dir: Path, rule: Rule, per_shard: dict[str, dict], plan: OverridePlan, **fields) -> FilterResult:
    """The totals of the shards routed (``per_shard``), which is what was, or would be, written."""
    reasons: Counter = Counter()
    for counts in per_shard.values():
        reasons.update(counts["rejected_by_reason"])
    kept = sum(c["kept"] for c in per_shard.values())
    return FilterResult(
        out_dir=out_dir,
        input_count=sum(c["input"] for c in per_shard.values()),
        kept_count=kept,
        rejected_count=sum(reasons.values()),
        rejected_by_reason=dict(reasons),
        rule=rule,
        kept_by_override=sum(c["kept_by_override"] for c in per_shard.values()),
        rejected_by_override=reasons[OVERRIDE],
        overrides=plan.summary(),
        per_shard=per_shard,
        **fields,
    )


# Where the Ray engine's route tasks leave each input shard's kept and rejected samples.
PIECES = ".pieces"


def _route_on_ray(
    urls: list[str],
    sources: dict,
    outcomes: dict[str, list[str]],
    stages: list[Path | None],
    *,
    maxcount: int,
    run: RunOptions,
) -> tuple[dict, tuple[list[Path], list[Path]]]:
    """Route ``urls`` on the Ray engine into the kept and rejected staging directories ``stages``
    (the second may be None); returns what ``_route_locally`` returns. ``sources``: per shard,
    where its rows' ``ROUTE_COLUMNS`` are (``route_rows``): a report part's path, which the task
    reads on storage every node reaches, or the rows themselves.

    First a task per input shard writes its kept and rejected samples as pieces (under
    ``STAGE/.pieces/``, ``_route_piece``); then a task per output shard copies its samples'
    bytes out of the pieces, in input order, ``maxcount`` to a shard (``_stitch``), so the
    shards are those one ``ShardSink`` fed shard after shard would have written. The pieces
    are removed before the stage is committed.
    """
    for stage in stages:
        if stage is not None:
            (stage / PIECES).mkdir()
    names = dict(zip(urls, shard_names(urls), strict=True))
    written: list[list[Path]] = [[], []]
    with ray_tasks(run.ray_address) as tasks:
        args = []
        for url in urls:
            pieces = [str(s / PIECES / f"{names[url]}.tar") if s is not None else None for s in stages]
            source = sources[url]  # a part's path is read by the task; rows are shipped projected
            args.append((url, source if isinstance(source, str) else route_rows(source), outcomes[url], pieces))
        routes = tasks(_route_piece, args, labels=urls, progress=run.progress, desc="filtering on Ray")
        answers = dict(zip(urls, routes, strict=True))
        stitches = []
        for role, stage in enumerate(stages):
            if stage is None:
                continue
            pieces = [(str(stage / PIECES / f"{names[u]}.tar"), answers[u]["ends"][role]) for u in urls]
            for j, ranges in enumerate(shard_layout([p for p in pieces if p[1]], maxcount)):
                written[role].append(stage / f"{j:05d}.tar")
                stitches.append((str(written[role][-1]), ranges))
        tasks(_stitch, stitches, labels=["filter output"] * len(stitches), progress=False, desc="")
    for stage in stages:
        if stage is not None:
            for piece in (stage / PIECES).iterdir():
                piece.unlink()
            (stage / PIECES).rmdir()
    routed = {url: {"shard": url, **{k: v for k, v in answers[url].items() if k != "ends"}} for url in urls}
    return routed, (written[0], written[1])


def _route_piece(url: str, source, outcomes: list[str], pieces: list[str | None]) -> dict:
    """A Ray task: route one input shard into a kept and a rejected piece (``route_shard``).

    Returns the byte offsets where each sample ends in each piece, whether the shard is
    damaged, or the error that made it unreadable (then no piece is left).
    """
    sinks = [ShardPiece(p) for p in pieces if p is not None]
    try:
        damaged = route_shard(url, route_rows(source), outcomes, sinks[0], sinks[1] if len(sinks) > 1 else None)
    except BaseException as exc:
        for sink in sinks:
            sink.abort()
        if isinstance(exc, UnreadableShard):
            return {"error": str(exc), "ends": [[], []]}
        raise
    for sink in sinks:
        sink.close()
    ends = [sink.ends for sink in sinks]
    return {"damage": damaged, "ends": ends + [[]] * (2 - len(ends))}


def _stitch(path: str, ranges: list[tuple]) -> str:
    """A Ray task: one output shard from byte ranges of pieces (``writer.write_shard_from_pieces``)."""
    return str(write_shard_from_pieces(path, ranges))


def _route_locally(urls, sources, outcomes, stages, *, maxcount: int, on_bad_shard: str, bar) -> tuple[dict, tuple]:
    """Route ``urls`` one after the other into one ``ShardSink`` per stage (kept, rejected or None),
    each shard's rows read from ``sources`` (``route_rows``) as it comes.

    Returns, per shard, its answer for ``ShardTally.count`` (the error that made it unreadable,
    or whether it is damaged), and the paths of the kept and rejected shards written. With ``on_bad_shard="fail"`` the
    first unreadable shard raises at once: no later shard is read.
    """
    kept = ShardSink(stages[0], maxcount)
    rejected = ShardSink(stages[1], maxcount) if stages[1] is not None else None
    routed = {}
    with kept, rejected or ExitStack():
        for url in urls:
            try:
                rows = route_rows(sources[url])
                routed[url] = {"shard": url, "damage": route_shard(url, rows, outcomes[url], kept, rejected)}
            except UnreadableShard as exc:
                if on_bad_shard == "fail":
                    raise
                routed[url] = {"shard": url, "error": str(exc)}
            bar.update(len(outcomes[url]))
    return routed, (kept.paths, rejected.paths if rejected is not None else [])


def route_shard(url: str, report: pd.DataFrame, outcomes: list[str], kept, rejected) -> bool:
    """Write one input shard's samples to ``kept`` or ``rejected`` by ``route``'s outcomes of its
    report rows: the unit of work of ``filter`` on both engines (locally into the run's
    ``ShardSink``s, on Ray into one ``ShardPiece`` per shard and role). Returns True when the
    shard is damaged (truncated).

    ``kept`` and ``rejected`` (None: rejected samples are not written) take ``write_raw``.
    The shard is checked against its report as it is read: a changed shard is an error.
    """
    scored, statuses = ScoredSamples(url, report), report["status"].tolist()
    reader = read_shard(url)
    n = 0
    for raw in reader:
        scored.check(n, raw)
        if is_kept(outcomes[n]):
            kept.write_raw(raw)
        elif rejected is not None:
            rejected.write_raw(raw)
        n += 1
    if n != len(scored):
        raise NcleanerError(f"{url}: has {n} samples but its report has {len(scored)} rows")
    flagged = n > 0 and all(s == schema.TRUNCATED_SHARD for s in statuses)
    if bool(reader.damage) != flagged:
        state = f"is damaged ({reader.damage})" if reader.damage else "is intact"
        raise NcleanerError(f"{url}: {state} but its report says otherwise; the shard changed since it was scored")
    return bool(reader.damage)


def _names(paths) -> list[str]:
    return [os.path.basename(p) for p in paths]


def _manifest(result: FilterResult, urls, report_dir: Path, reports, rejected_out) -> dict:
    model_ids = report_model_ids(reports)  # at most one: load_shard_reports refuses more
    return {
        "command": "filter",
        "input_shards": urls,
        "input_count": result.input_count,
        "kept_count": result.kept_count,
        "rejected_count": result.rejected_count,
        "rejected_by_reason": result.rejected_by_reason,
        "unreadable_shards": result.unreadable_shards,
        "truncated_shards": result.truncated_shards,
        "rule": asdict(result.rule),
        "where": result.where,
        "kept_by_override": result.kept_by_override,
        "rejected_by_override": result.rejected_by_override,
        "overrides": result.overrides,
        "model_id": model_ids[0] if model_ids else None,
        "report": str(report_dir) if report_dir is not None else None,
        "dedup": str(result.dedup) if result.dedup is not None else None,
        "kept_shards": _names(result.kept_shards),
        "rejected_out": str(rejected_out) if rejected_out is not None else None,
        "rejected_shards": _names(result.rejected_shards),
    }
