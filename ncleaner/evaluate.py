"""Scoring noise detection against known ground truth (docs/design.md section 9).

Ground truth comes from a json field kept in the report (``score
--keep-json-fields ncleaner_noisy``) or from ``inject-noise``'s
``noise_truth.parquet``: true for a pair whose caption was made noisy. Metrics
treat "noisy" as the positive class and rank by how low a score column is, so
higher AUROC / AP = better detection. When the truth also names each noisy
pair's kind (``ncleaner_noise_kind``, the ``kind`` column), the metrics are
broken down by kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

from . import schema
from .backbone import resolve_device
from .config import DEFAULT_MAX_IMAGE_PIXELS
from .embeddings import EmbeddingStore, model_features, open_for_model
from .errors import NcleanerError, UnreadableShard, first_line
from .model import NcleanerModel
from .noise import NOISE_KINDS
from .schema import AUTO_RULE, SCORE_COLUMNS
from .shards import expand_shards, shard_names


def truth_from_report(report: pd.DataFrame, field: str = "ncleaner_noisy") -> np.ndarray:
    """Per-row noisy flags parsed from a kept json field (JSON text ``true`` / ``false``)."""
    if field not in report.columns:
        raise NcleanerError(f"report has no {field!r} column (score with --keep-json-fields {field})")
    values = report[field].map(lambda v: None if v is None else json.loads(v) if isinstance(v, str) else v)
    if values.isna().any() or not values.map(lambda v: isinstance(v, bool)).all():
        raise NcleanerError(f"report column {field!r} must be true/false for every row")
    return values.to_numpy(dtype=bool)


def detection_metrics(
    report: pd.DataFrame, noisy: np.ndarray, *, columns: Sequence[str] = SCORE_COLUMNS
) -> dict[str, dict[str, float]]:
    """AUROC and average precision of each of ``columns`` the report has (the score columns, or
    others a benchmark adds) at detecting noisy pairs, low values being suspicious (ok rows only)."""
    ok = (report["status"] == schema.OK).to_numpy()
    y = noisy[ok]
    if y.all() or not y.any():
        raise NcleanerError("ground truth needs both noisy and clean scored pairs")
    out = {}
    for column in columns:
        if column in report.columns:
            suspicion = -report.loc[ok, column].to_numpy(dtype=np.float64)
            out[column] = {
                "auroc": float(roc_auc_score(y, suspicion)),
                "ap": float(average_precision_score(y, suspicion)),
            }
    return out


def detection_by_kind(
    report: pd.DataFrame,
    noisy: np.ndarray,
    kinds: np.ndarray,
    source: str = "noise kinds",
    *,
    columns: Sequence[str] = SCORE_COLUMNS,
) -> dict[str, dict]:
    """``detection_metrics`` per noise kind: each on the clean pairs plus the noisy pairs of that kind.

    ``kinds`` holds each row's kind (None for a clean row). Only ok rows count,
    and a kind none of whose pairs was scored is left out. AP depends on the
    share of positives, which differs between kinds; AUROC does not. ``source``
    names where the kinds came from, for errors.
    """
    kinds = np.asarray(kinds, dtype=object)
    if len(kinds) != len(report) or len(noisy) != len(report):
        raise NcleanerError(f"{source}: {len(kinds)} kinds and {len(noisy)} noisy flags for {len(report)} report rows")
    disagree = np.array([bool(noisy[i]) != _has_kind(k) for i, k in enumerate(kinds)], dtype=bool)
    if disagree.any():
        key = report["key"].iloc[int(disagree.argmax())]
        raise NcleanerError(
            f"{source}: {int(disagree.sum())} rows disagree with the noisy flags (e.g. key {key}):"
            " a noisy row needs a kind, a clean row none"
        )
    ok = (report["status"] == schema.OK).to_numpy()
    present = set(kinds[noisy])
    out = {}
    # The modes' kinds in their documented order, then any other kind a user's truth names.
    for kind in [k for k in NOISE_KINDS if k in present] + sorted(present - set(NOISE_KINDS)):
        rows = ~noisy | (kinds == kind)
        scored = int((ok & noisy & rows).sum())
        if scored:
            out[kind] = {"noisy": scored, "columns": detection_metrics(report[rows], noisy[rows], columns=columns)}
    return out


def _has_kind(kind) -> bool:
    return isinstance(kind, str) and bool(kind)


def noise_kinds_from_report(report: pd.DataFrame, field: str = "ncleaner_noise_kind") -> np.ndarray | None:
    """Per-row noise kinds from a kept json field (None for clean rows), or None if no row has one."""
    if field not in report.columns:
        return None
    kinds = np.array([v if _has_kind(v) else None for v in report[field]], dtype=object)
    return kinds if any(k is not None for k in kinds) else None


def noise_kinds_from_file(report: pd.DataFrame, path: str | Path) -> np.ndarray | None:
    """Per-row noise kinds from the ``kind`` column of a truth Parquet, or None if no row has one
    (truth files written before the realistic noise modes have no such column)."""
    kinds = _truth_column(report, path, "kind", required=False)
    if kinds is None:
        return None
    kinds = np.array([k if _has_kind(k) else None for k in kinds], dtype=object)
    return kinds if any(k is not None for k in kinds) else None


def _truth_column(report: pd.DataFrame, path: str | Path, column: str, *, required: bool) -> pd.Series | None:
    """Column ``column`` of a truth Parquet, one value per report row (NaN where it has none).

    Rows are joined on the key; where keys repeat (across shards: ``inject-noise``'s truth file
    allows it), on the shard's file name and the sample's index, checking that the key agrees.
    Without the column: None, or an error when it is ``required``.
    """
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except FileNotFoundError as exc:
        raise NcleanerError(f"{path}: no such ground-truth file") from exc
    except Exception as exc:
        raise NcleanerError(f"{path}: cannot read ground truth: {first_line(exc)}") from exc
    if column not in names or "key" not in names:
        if required or column in names:
            raise NcleanerError(f"{path}: cannot read ground truth (needs key and {column} columns)")
        return None
    by_position = {"shard", "index"} <= names
    truth = pd.read_parquet(path, columns=["key", column, *(["shard", "index"] if by_position else [])])
    if not truth["key"].duplicated().any():
        return report["key"].map(truth.set_index("key")[column])
    if not by_position:
        raise NcleanerError(f"{path}: keys are not unique and no shard and index columns tell their samples apart")
    truth.index = pd.MultiIndex.from_arrays([truth["shard"].map(os.path.basename), truth["index"]])
    if truth.index.duplicated().any():
        raise NcleanerError(f"{path}: two rows name one sample (the same shard file and index)")
    rows = pd.MultiIndex.from_arrays([report["shard"].map(os.path.basename), report["index"]])
    found = truth.reindex(rows)
    wrong = found["key"].notna().to_numpy() & (found["key"].to_numpy() != report["key"].to_numpy())
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise NcleanerError(
            f"{path}: sample {report['index'].iat[i]} of {report['shard'].iat[i]} is {report['key'].iat[i]} in the "
            f"report but {found['key'].iat[i]} here: not the truth of these shards"
        )
    return pd.Series(found[column].to_numpy(), index=report.index)


def kept_set_metrics(kept: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """Precision of the kept set (share of clean pairs in it) and the share of noisy pairs removed."""
    return {
        "kept_precision": float((~noisy[kept]).mean()) if kept.any() else float("nan"),
        "noise_removed": float((~kept[noisy]).mean()) if noisy.any() else float("nan"),
    }


def truth_from_file(report: pd.DataFrame, path: str | Path) -> np.ndarray:
    """Per-row noisy flags from a parquet with ``key`` and ``noisy`` columns (``inject-noise`` writes
    one, with ``shard`` and ``index`` that tell apart keys repeated across shards)."""
    noisy = _truth_column(report, path, "noisy", required=True)
    if noisy.isna().any():
        missing = report.loc[noisy.isna(), "key"].iloc[0]
        raise NcleanerError(f"{path}: no ground truth for {int(noisy.isna().sum())} report rows (e.g. key {missing})")
    return noisy.to_numpy(dtype=bool)


def evaluate_report(
    report: pd.DataFrame, noisy: np.ndarray, kinds: np.ndarray | None = None, source: str = "noise kinds"
) -> dict:
    """Detection metrics of every score column, and the kept set of the model's automatic rule;
    with ``kinds``, also the metrics per noise kind (``detection_by_kind``)."""
    rule = AUTO_RULE  # the very rule `filter --auto` applies
    kept = np.array([rule.keep(s, v) for s, v in zip(report["status"], report[rule.column], strict=True)], dtype=bool)
    return {
        "pairs": len(report),
        "noisy": int(noisy.sum()),
        "not_scored": int((report["status"] != schema.OK).sum()),
        "columns": detection_metrics(report, noisy),
        "auto": {
            "rule": f"{rule.column} >= {rule.threshold}",
            "kept": int(kept.sum()),
            **kept_set_metrics(kept, noisy),
        },
        **({"by_kind": detection_by_kind(report, noisy, kinds, source)} if kinds is not None else {}),
    }


def recall_at_k(sim: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in both directions for a square similarity matrix whose diagonal holds the true pairs.

    ``sim[i, j]`` is the similarity of image i and text j. A query counts as
    retrieved at K when its partner ranks among the top K (ties count against it).
    """
    diag = sim.diagonal()
    # Other candidates scoring at least as high as the true partner (the partner itself is subtracted).
    rank_i2t = (sim >= diag[:, None]).sum(dim=1) - 1
    rank_t2i = (sim >= diag[None, :]).sum(dim=0) - 1
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((rank_i2t < k).float().mean() * 100)
    for k in ks:
        out[f"t2i_R@{k}"] = float((rank_t2i < k).float().mean() * 100)
    out["rsum"] = sum(out.values())
    return out


def encode_shards(
    model: NcleanerModel,
    shards: str | Iterable[str],
    *,
    batch_size: int = 256,
    keep: Callable[[dict], bool] | None = None,
    workers: int = 0,
    store: EmbeddingStore | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Backbone features (F_V, F_T, L2-normalised) of every decodable pair of ``shards`` whose json
    metadata ``keep`` accepts, in shard order, and the number of samples left out.

    Evaluation needs every shard whole: an unreadable or damaged one is an error. With
    ``store``, shards it holds are read from it and the others encoded and added to it.
    """
    keep = keep or (lambda meta: True)
    urls = expand_shards(shards)
    raw_v, raw_t, skipped = [], [], 0
    stream = model_features(
        model,
        urls,
        shard_names(urls),
        store=store,
        batch_size=batch_size,
        workers=workers,
        max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    )
    for shard in stream:
        if shard.error:
            raise UnreadableShard(shard.error)
        if shard.damage:
            raise NcleanerError(f"{shard.url}: {shard.damage}")
        ok_metas = [m for m, s in zip(shard.metas, shard.statuses, strict=True) if s == schema.OK]
        chosen = np.array([keep(m) for m in ok_metas], dtype=bool)
        skipped += len(shard) - int(chosen.sum())
        raw_v.append(torch.from_numpy(shard.f_v[chosen]))
        raw_t.append(torch.from_numpy(shard.f_t[chosen]))
    f_v, f_t = torch.cat(raw_v), torch.cat(raw_t)
    if not len(f_v):
        raise NcleanerError(f"{shards}: no decodable pairs")
    return f_v.to(model.bank_v.device), f_t.to(model.bank_v.device), skipped


def retrieval_metrics(
    shards: str | Iterable[str],
    model_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 256,
    allow_download: bool = False,
    embeddings: str | Path | None = None,
    embeddings_backbone: str | None = None,
) -> dict:
    """Image-text retrieval R@1/5/10 on a clean split, in the MII subspace and in the raw backbone space.

    Pairs whose json says ``ncleaner_noisy: true`` are left out (they have no
    true partner), as are samples that cannot be decoded (or, with ``embeddings``,
    that the embeddings directory has no features for). ``embeddings`` and
    ``embeddings_backbone`` work as for ``score``.
    """
    model = NcleanerModel.load(model_dir, resolve_device(device), allow_download=allow_download)
    store = None
    if embeddings is not None:
        store = open_for_model(embeddings, model.config, create=True, assume_backbone=embeddings_backbone)
    f_v, f_t, skipped = encode_shards(
        model, shards, batch_size=batch_size, keep=lambda meta: meta.get("ncleaner_noisy") is not True, store=store
    )
    v_s, t_s = model.heads.mii(f_v, f_t)
    clip_v, clip_t = F.normalize(f_v, dim=-1), F.normalize(f_t, dim=-1)
    return {
        "pairs": len(f_v),
        "skipped": skipped,
        "mii": recall_at_k((v_s @ t_s.T).cpu()),
        "clip": recall_at_k((clip_v @ clip_t.T).cpu()),
    }


def format_detection(d: dict) -> str:
    lines = [
        f"noise detection: {d['noisy']} noisy of {d['pairs']} pairs ({d['not_scored']} not scored)",
        f"  {'column':<16}{'AUROC':>8}{'AP':>8}",
        *(f"  {c:<16}{m['auroc']:>8.4f}{m['ap']:>8.4f}" for c, m in d["columns"].items()),
        f"  auto rule ({d['auto']['rule']}): kept {d['auto']['kept']}, {d['auto']['kept_precision']:.1%} clean, "
        f"{d['auto']['noise_removed']:.1%} of the noise removed",
    ]
    by_kind = d.get("by_kind") or {}
    columns = list(next(iter(by_kind.values()))["columns"]) if by_kind else []
    for metric, name in (("auroc", "AUROC"), ("ap", "AP")):
        if by_kind:
            lines += [
                f"  {name} by noise kind (clean pairs + the noisy pairs of that kind):",
                f"    {'kind':<14}{'noisy':>7}" + "".join(f"{c:>16}" for c in columns),
                *(
                    f"    {kind:<14}{k['noisy']:>7}" + "".join(f"{k['columns'][c][metric]:>16.4f}" for c in columns)
                    for kind, k in by_kind.items()
                ),
            ]
    return "\n".join(lines)


def format_retrieval(r: dict) -> str:
    keys = [k for k in r["mii"] if k != "rsum"]
    lines = [
        f"retrieval on {r['pairs']} clean pairs ({r['skipped']} left out)",
        "  " + f"{'space':<6}" + "".join(f"{k:>10}" for k in keys) + f"{'rsum':>9}",
        *(
            "  " + f"{space:<6}" + "".join(f"{r[space][k]:>10.1f}" for k in keys) + f"{r[space]['rsum']:>9.1f}"
            for space in ("mii", "clip")
        ),
    ]
    return "\n".join(lines)
