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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .backbone import resolve_device
from .captions import caption_columns
from .decode import DEFAULT_MAX_IMAGE_PIXELS
from .embeddings import ShardFeatures, model_features, open_for_model
from .engine import DEFAULT_RUN, RunOptions, ShardJob, ShardTally, check_on_bad_shard, run_shard_jobs, worker_device
from .errors import NcleanerError
from .model import NcleanerModel
from .schema import SCORE_COLUMNS, failed_marker, read_report_table, report_paths, report_schema
from .shards import expand_shards, json_uid, shard_names
from .writer import atomic_write, output_error, remove_stale_partials, write_json

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult(ShardTally):
    """What ``score`` did: the report's rows, and per shard what ``ShardTally`` counts (scored
    now, before, or not at all)."""

    report_dir: Path
    model_id: str
    rows: int = 0


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
    embeddings: str | Path | None = None,
    embeddings_backbone: str | None = None,
    allow_download: bool = False,
    run: RunOptions = DEFAULT_RUN,
) -> ScoreResult:
    """Score every pair of ``shards`` with the model in ``model_dir``; write the report to ``out_dir``.

    Args:
        shards: SHARDS in any form ``expand_shards`` takes.
        model_dir: a model directory written by ``fit``.
        out_dir: the report directory (one Parquet part and one marker per shard).
        batch_size: pairs encoded at a time.
        overwrite: re-score shards the report already holds, and accept a report
            directory holding another model's parts.
        keep_json_fields: json fields copied into the report as text columns.
        on_bad_shard: ``fail`` stops at a shard that cannot be read; ``skip`` records it
            (``_<shard>.failed.json``, tried again by the next run) and goes on.
        max_image_pixels: larger images are not decoded (status ``too_large``).
        embeddings: an embeddings directory (``ncleaner.embeddings``): shards it holds are
            scored from their stored features; the others are encoded and added to it.
        embeddings_backbone: the backbone that wrote ``embeddings`` when it has no
            ``embeddings.json`` (clip-retrieval's own output).
        allow_download: let open_clip download the backbone the model names (see ``NcleanerModel.load``).
        run: where and how it runs (``RunOptions``: engine, device, workers, progress). On Ray
            each shard is scored and written by a worker holding the model; the report is the
            same either way.
    """
    check_on_bad_shard(on_bad_shard)
    run.check()
    urls = expand_shards(shards)
    names = shard_names(urls)
    report_schema(keep_json_fields)  # refuses a kept field that would overwrite a column, before any work
    out = Path(out_dir)
    # Checked before the slow model load: a report that cannot be written fails at once.
    if out.exists() and not out.is_dir():
        raise NcleanerError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    remove_stale_partials(out)
    # On Ray the workers score; here the model only names the report (model_id) and the embeddings it fits.
    here = torch.device("cpu") if run.on_ray else resolve_device(run.device)
    model = NcleanerModel.load(model_dir, here, allow_download=allow_download)
    if not overwrite:
        _refuse_other_models(out, model.model_id)
    result = ScoreResult(report_dir=out, model_id=model.model_id)
    todo = [
        (url, name)
        for url, name in zip(urls, names, strict=True)
        if not _already_scored(out, url, name, model.model_id, overwrite, result)
    ]
    if result.done_before:
        logger.info("skipped %d shard(s) already scored (use --overwrite to redo)", len(result.done_before))
    if not todo:
        return result
    store = None
    if embeddings is not None:
        store = open_for_model(embeddings, model.config, create=True, assume_backbone=embeddings_backbone)
    if run.on_ray:
        options = {
            "device": run.device,
            "allow_download": allow_download,
            "batch_size": batch_size,
            "max_image_pixels": max_image_pixels,
            "keep_json_fields": list(keep_json_fields),
        }
        answers = run_shard_jobs(
            ScoreJob,
            (str(Path(model_dir).resolve()), str(out.resolve()), store, options),
            todo,
            run=run,
            desc=f"scoring {len(todo)} shard(s) on Ray",
        )
        for _, name in todo:  # in input order, as the local engine counts them
            record_shard(result, answers[name], out, name, on_bad_shard=on_bad_shard)
        return result
    # One bar for the whole pool: the total is unknown until every shard is read, so it counts pairs.
    bar = tqdm(unit="pair", disable=not run.progress, dynamic_ncols=True, desc=f"scoring {len(todo)} shard(s)")
    stream = model_features(
        model,
        [u for u, _ in todo],
        [n for _, n in todo],
        store=store,
        batch_size=batch_size,
        workers=run.decode_workers(len(todo)),
        max_pixels=max_image_pixels,
        progress=bar.update,
    )
    for features, (_, name) in zip(stream, todo, strict=True):
        done = write_shard_report(model, features, out, name, keep_json_fields=keep_json_fields)
        record_shard(result, done, out, name, on_bad_shard=on_bad_shard)
    bar.close()
    return result


class ScoreJob(ShardJob):
    """``score`` on the Ray engine: the model loaded once per worker; each shard scored and its
    report part and marker written there (``write_shard_report``), as the local engine does."""

    def _setup(self, model_dir: str, out_dir: str, store, options: dict) -> None:
        self.out, self.store, self.options = Path(out_dir), store, options
        device = resolve_device(worker_device(options["device"]))
        self.model = NcleanerModel.load(model_dir, device, allow_download=options["allow_download"])

    def _shard(self, url: str, name: str) -> dict:
        o = self.options
        stream = model_features(
            self.model,
            [url],
            [name],
            store=self.store,
            batch_size=o["batch_size"],
            workers=0,
            max_pixels=o["max_image_pixels"],
        )
        return write_shard_report(self.model, next(stream), self.out, name, keep_json_fields=o["keep_json_fields"])


def write_shard_report(
    model: NcleanerModel,
    features: ShardFeatures,
    out_dir: Path,
    name: str,
    *,
    keep_json_fields: Sequence[str] = (),
) -> dict:
    """Finish one shard of ``score``: its report part and marker, from its features.

    This is the unit of work both engines share: the local engine calls it as each shard
    comes out of its pipelined decode and encode stream, a Ray worker on the shard it was
    given (``ncleaner.ray_engine``). The part is written before the marker, each under a
    temporary name first, so a worker killed at any point leaves the shard unfinished and
    the next attempt scores it again.

    Returns the marker's content, or ``{"shard": url, "error": why}`` for a shard that could
    not be read (nothing is written then: ``record_shard`` decides what that means).
    """
    if features.error:
        return {"shard": features.url, "error": features.error}
    target, marker = report_paths(out_dir, name)
    table = _report_table(model, features, report_schema(keep_json_fields), keep_json_fields)
    atomic_write(target, lambda tmp: pq.write_table(table, tmp))
    done = {
        "shard": features.url,
        "rows": table.num_rows,
        "model_id": model.model_id,
        "statuses": dict(Counter(features.statuses)),
        "damage": features.damage,
    }
    write_json(marker, done)
    failed_marker(out_dir, name).unlink(missing_ok=True)
    return done


def record_shard(result: ScoreResult, done: dict, out_dir: Path, name: str, *, on_bad_shard: str) -> None:
    """Count one finished shard (``write_shard_report``'s answer) into ``result``.

    An unreadable shard stops the run (``fail``) or is recorded as ``_<shard>.failed.json``
    and left for the next run to try again (``skip``).
    """
    if result.count(done, on_bad_shard=on_bad_shard, log=logger):
        result.rows += done["rows"]
    else:
        write_json(failed_marker(out_dir, name), {"shard": done["shard"], "reason": done["error"]})


def _already_scored(out: Path, url: str, name: str, model_id: str, overwrite: bool, result: ScoreResult) -> bool:
    """Whether the report holds this shard from this model (counted into ``result``); another's is an error."""
    target, marker = report_paths(out, name)
    if overwrite or not marker.exists():
        return False
    done = json.loads(marker.read_text())
    if done.get("model_id") != model_id or done.get("shard") != url:
        raise NcleanerError(
            f"{target}: already scored from {done.get('shard')} with model {done.get('model_id')}; "
            "use --overwrite to replace it"
        )
    result.done_before.append(url)
    result.rows += done["rows"]
    result.statuses.update(done["statuses"])
    return True


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


# Rows scored at once: the soft agreement compares each with the whole reference bank.
_SCORE_CHUNK = 4096


def _report_table(
    model: NcleanerModel, features: ShardFeatures, table_schema: pa.Schema, keep_json_fields: Sequence[str]
) -> pa.Table:
    """One shard's report, built column by column (no per-row Python objects)."""
    ok = features.ok
    n = len(features)
    scores = {c: np.zeros(n, np.float32) for c in SCORE_COLUMNS}
    rows = np.flatnonzero(ok)
    device = model.bank_v.device
    for start in range(0, len(rows), _SCORE_CHUNK):
        part = slice(start, start + _SCORE_CHUNK)
        f_v = torch.from_numpy(features.f_v[part]).to(device)
        f_t = torch.from_numpy(features.f_t[part]).to(device)
        for column, values in model.score_features(f_v, f_t).items():
            scores[column][rows[part]] = values
    columns = {
        "key": features.keys,
        "shard": [features.url] * n,
        "index": features.indices,
        "caption": features.captions,
        "url": features.urls,
        "image_sha1": features.sha1s,
        "status": features.statuses,
        **{c: pa.array(v, mask=~ok) for c, v in scores.items()},
        "model_id": [model.model_id] * n,
        "uid": [json_uid(m) for m in features.metas],
        "width": [None if size is None else size[0] for size in features.sizes],
        "height": [None if size is None else size[1] for size in features.sizes],
        **caption_columns(features.captions),
    }
    for f in keep_json_fields:
        values = (m.get(f) for m in features.metas)
        columns[f] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    return pa.table([columns[f.name] for f in table_schema], schema=table_schema)


def read_report(report_dir: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The whole report as one DataFrame (every part's rows, in file name order), each part checked
    whole as it is read (``schema.read_report_table``), then only its ``columns`` kept (those it
    has; all when None), so that a caller needing a few columns never holds the pool's captions.
    Names starting with ``_`` or ``.`` are not parts, as for pyarrow and DuckDB."""
    d = Path(report_dir)
    parts = sorted(p for p in d.glob("*.parquet") if not p.name.startswith(("_", "."))) if d.is_dir() else []
    if not parts:
        raise NcleanerError(f"{d}: no report here (run ncleaner score first)")
    frames = []
    for path in parts:
        table = read_report_table(path)
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        frames.append(table.to_pandas())
    return pd.concat(frames, ignore_index=True)
