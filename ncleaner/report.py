"""``score``: one Parquet row per input sample, one file per shard (docs/design.md section 4).

REPORT/<shard>.parquet holds the rows of one shard in order; REPORT/_<shard>.done.json
marks it finished (with the shard, row count and model id), so a re-run skips it.
Files starting with ``_`` or ``.`` are ignored by pyarrow, so
``pandas.read_parquet(REPORT)`` and DuckDB's ``read_parquet('REPORT/*.parquet')``
read the report as one table.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from . import schema
from .backbone import resolve_device
from .decode import DEFAULT_MAX_IMAGE_PIXELS, Pair, batched, decode_stream
from .errors import NcleanerError, UnreadableShard
from .model import NcleanerModel
from .schema import SCORE_COLUMNS, failed_marker, report_paths, report_schema
from .shards import expand_shards, read_shard, shard_names
from .writer import atomic_write, output_error, remove_stale_partials, write_json

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """What ``score`` did: rows per status, shards scored now, before, or not at all."""

    report_dir: Path
    model_id: str
    rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    scored_shards: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)
    truncated_shards: list[str] = field(default_factory=list)


def score(
    shards: str | Iterable[str],
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str = "auto",
    overwrite: bool = False,
    keep_json_fields: Sequence[str] = (),
    on_bad_shard: str = "fail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = False,
    allow_download: bool = False,
) -> ScoreResult:
    """Score every pair of ``shards`` with the model in ``model_dir``; write the report to ``out_dir``.

    Args:
        shards: SHARDS in any form ``expand_shards`` takes.
        model_dir: a model directory written by ``fit``.
        out_dir: the report directory (one Parquet part and one marker per shard).
        batch_size: pairs encoded at a time.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        overwrite: re-score shards the report already holds, and accept a report
            directory holding another model's parts.
        keep_json_fields: json fields copied into the report as text columns.
        on_bad_shard: ``fail`` stops at a shard that cannot be read; ``skip`` records it
            (``_<shard>.failed.json``, tried again by the next run) and goes on.
        max_image_pixels: larger images are not decoded (status ``too_large``).
        progress: show one progress bar over the pairs of all shards.
        allow_download: let open_clip download the backbone the model names (see ``NcleanerModel.load``).
    """
    if on_bad_shard not in ("fail", "skip"):
        raise NcleanerError(f"--on-bad-shard {on_bad_shard}: must be fail or skip")
    urls = expand_shards(shards)
    names = shard_names(urls)
    table_schema = report_schema(keep_json_fields)
    out = Path(out_dir)
    # Checked before the slow model load: a report that cannot be written fails at once.
    if out.exists() and not out.is_dir():
        raise NcleanerError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    remove_stale_partials(out)
    model = NcleanerModel.load(model_dir, resolve_device(device), allow_download=allow_download)
    if not overwrite:
        _refuse_other_models(out, model.model_id)
    result = ScoreResult(report_dir=out, model_id=model.model_id)
    # One bar for the whole pool: the total is unknown until every shard is read, so it counts pairs.
    bar = tqdm(unit="pair", disable=not progress, dynamic_ncols=True)
    for done_shards, (url, name) in enumerate(zip(urls, names, strict=True)):
        bar.set_description(f"scoring, {done_shards}/{len(urls)} shards done")
        target, marker = report_paths(out, name)
        if marker.exists() and not overwrite:
            done = json.loads(marker.read_text())
            if done.get("model_id") != model.model_id or done.get("shard") != url:
                raise NcleanerError(
                    f"{target}: already scored from {done.get('shard')} with model {done.get('model_id')}; "
                    "use --overwrite to replace it"
                )
            result.skipped_shards.append(url)
            result.rows += done["rows"]
            result.statuses.update(done["statuses"])
            continue
        try:
            table, damage = _score_shard(model, url, table_schema, keep_json_fields, batch_size, max_image_pixels, bar)
        except UnreadableShard as exc:
            if on_bad_shard == "fail":
                raise
            logger.warning("skipped %s", exc)
            write_json(failed_marker(out, name), {"shard": url, "reason": str(exc)})
            result.failed_shards[url] = str(exc)
            continue
        statuses = Counter(table.column("status").to_pylist())
        atomic_write(target, lambda tmp, t=table: pq.write_table(t, tmp))
        done = {
            "shard": url,
            "rows": table.num_rows,
            "model_id": model.model_id,
            "statuses": dict(statuses),
            "damage": damage,
        }
        write_json(marker, done)
        failed_marker(out, name).unlink(missing_ok=True)
        result.scored_shards.append(url)
        result.rows += table.num_rows
        result.statuses.update(statuses)
        if damage:
            result.truncated_shards.append(url)
    bar.set_description(f"scoring, {len(urls)}/{len(urls)} shards done")
    bar.close()
    if result.skipped_shards:
        logger.info("skipped %d shard(s) already scored (use --overwrite to redo)", len(result.skipped_shards))
    return result


def _refuse_other_models(out: Path, model_id: str) -> None:
    """A report holds one model's scores: another model's parts make rankings meaningless."""
    for marker in sorted(out.glob("_*.done.json")):
        try:
            other = json.loads(marker.read_text()).get("model_id")
        except (OSError, ValueError, AttributeError):
            raise NcleanerError(f"{marker}: unreadable marker; remove it or use --overwrite") from None
        if other != model_id:
            raise NcleanerError(
                f"{out}: holds shards scored by another model ({other}, e.g. {marker.name}); "
                "use --overwrite to re-score with this one, or another report directory"
            )


@torch.no_grad()
def _score_shard(
    model: NcleanerModel,
    url: str,
    table_schema: pa.Schema,
    keep_json_fields: Sequence[str],
    batch_size: int,
    max_image_pixels: int,
    bar: tqdm,
) -> tuple[pa.Table, str | None]:
    """One shard's report rows, and the reader's damage note when the shard ended early."""
    rows: list[dict] = []
    reader = read_shard(url)
    pairs = decode_stream(reader, model.backbone.preprocess, max_pixels=max_image_pixels)
    for block in batched(pairs, batch_size):
        ok = [p for p in block if p.ok]
        scores: dict = {}
        if ok:
            images = torch.stack([p.image for p in ok])
            scores = model.score_features(*model.encode(images, model.tokenize([p.caption for p in ok])))
        j = 0  # position of the next ok pair within ``scores``
        for pair in block:
            rows.append(_row(pair, model.model_id, scores, j if pair.ok else None, keep_json_fields))
            j += pair.ok
        bar.update(len(block))
    if reader.damage:
        # The cut may have taken members of any sample read from this shard: none is scored.
        for row in rows:
            row.update({"status": schema.TRUNCATED_SHARD, **dict.fromkeys(SCORE_COLUMNS)})
    return pa.Table.from_pylist(rows, schema=table_schema), reader.damage


def _row(pair: Pair, model_id: str, scores: dict, i: int | None, keep_json_fields: Sequence[str]) -> dict:
    row = {
        "key": pair.raw.key,
        "shard": pair.raw.shard,
        "index": pair.raw.index,
        "caption": pair.caption,
        "url": pair.url,
        "status": pair.status,
        "model_id": model_id,
    }
    for column in SCORE_COLUMNS:
        row[column] = None if i is None else float(scores[column][i])
    for f in keep_json_fields:
        value = pair.meta.get(f)
        row[f] = value if value is None or isinstance(value, str) else json.dumps(value)
    return row


def read_report(report_dir: str | Path) -> pd.DataFrame:
    """The whole report as one DataFrame (every finished shard's rows, in file order)."""
    d = Path(report_dir)
    if not d.is_dir() or not any(d.glob("*.parquet")):
        raise NcleanerError(f"{d}: no report here (run ncleaner score first)")
    return pd.read_parquet(d)
