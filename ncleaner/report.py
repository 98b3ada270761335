"""``score``: one Parquet row per input sample, one file per shard (DESIGN.md section 4).

REPORT/<shard>.parquet holds the rows of one shard in order; REPORT/_<shard>.done.json
marks it finished (with the shard, row count and model id), so a re-run skips it.
Files starting with ``_`` or ``.`` are ignored by pyarrow, so
``pandas.read_parquet(REPORT)`` and DuckDB's ``read_parquet('REPORT/*.parquet')``
read the report as one table.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .backbone import resolve_device
from .decode import Pair, batched, decode_stream
from .errors import NcleanerError
from .model import SCORE_COLUMNS, NcleanerModel
from .shards import expand_shards, read_shard, shard_names
from .writer import atomic_write

BASE_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("index", pa.int64()),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string()),
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


def report_paths(report_dir: Path, name: str) -> tuple[Path, Path]:
    """(parquet file, finished marker) of one shard's part of a report."""
    return report_dir / f"{name}.parquet", report_dir / f"_{name}.done.json"


@dataclass
class ScoreResult:
    report_dir: Path
    model_id: str
    rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    scored_shards: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)


def score(
    shards: str | Iterable[str],
    model_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 256,
    device: str = "auto",
    overwrite: bool = False,
    keep_json_fields: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
    *,
    allow_download: bool = False,
) -> ScoreResult:
    """Score every pair of ``shards`` with the model in ``model_dir``; write the report to ``out_dir``."""
    urls = expand_shards(shards)
    names = shard_names(urls)
    schema = report_schema(keep_json_fields)
    model = NcleanerModel.load(model_dir, resolve_device(device), allow_download=allow_download)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NcleanerError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    result = ScoreResult(report_dir=out, model_id=model.model_id)
    for url, name in zip(urls, names, strict=True):
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
        table = _score_shard(model, url, schema, keep_json_fields, batch_size, progress)
        statuses = Counter(table.column("status").to_pylist())
        atomic_write(target, lambda tmp, t=table: pq.write_table(t, tmp))
        done = {"shard": url, "rows": table.num_rows, "model_id": model.model_id, "statuses": dict(statuses)}
        atomic_write(marker, lambda tmp, d=done: Path(tmp).write_text(json.dumps(d, indent=1) + "\n"))
        result.scored_shards.append(url)
        result.rows += table.num_rows
        result.statuses.update(statuses)
    if result.skipped_shards:
        log(f"skipped {len(result.skipped_shards)} shard(s) already scored (use --overwrite to redo)")
    return result


@torch.no_grad()
def _score_shard(
    model: NcleanerModel,
    url: str,
    schema: pa.Schema,
    keep_json_fields: Sequence[str],
    batch_size: int,
    progress: bool,
) -> pa.Table:
    rows: list[dict] = []
    name = Path(url).name
    with tqdm(desc=f"scoring {name}", unit="pair", disable=not progress, leave=False) as bar:
        for block in batched(decode_stream(read_shard(url), model.backbone.preprocess), batch_size):
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
    return pa.Table.from_pylist(rows, schema=schema)


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
