"""Scoring noise detection against known ground truth (DESIGN.md section 6).

Ground truth comes from a json field kept in the report (``score
--keep-json-fields ncleaner_noisy``): true for a pair whose caption was
permuted. Metrics treat "noisy" as the positive class and rank by how low a
score column is, so higher AUROC / AP = better detection.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from .errors import NcleanerError
from .model import SCORE_COLUMNS


def truth_from_report(report: pd.DataFrame, field: str = "ncleaner_noisy") -> np.ndarray:
    """Per-row noisy flags parsed from a kept json field (JSON text ``true`` / ``false``)."""
    if field not in report.columns:
        raise NcleanerError(f"report has no {field!r} column (score with --keep-json-fields {field})")
    values = report[field].map(lambda v: None if v is None else json.loads(v) if isinstance(v, str) else v)
    if values.isna().any() or not values.map(lambda v: isinstance(v, bool)).all():
        raise NcleanerError(f"report column {field!r} must be true/false for every row")
    return values.to_numpy(dtype=bool)


def detection_metrics(report: pd.DataFrame, noisy: np.ndarray) -> dict[str, dict[str, float]]:
    """AUROC and average precision of each score column at detecting noisy pairs (ok rows only)."""
    ok = (report["status"] == "ok").to_numpy()
    y = noisy[ok]
    if y.all() or not y.any():
        raise NcleanerError("ground truth needs both noisy and clean scored pairs")
    out = {}
    for column in SCORE_COLUMNS:
        if column in report.columns:
            suspicion = -report.loc[ok, column].to_numpy(dtype=np.float64)
            out[column] = {
                "auroc": float(roc_auc_score(y, suspicion)),
                "ap": float(average_precision_score(y, suspicion)),
            }
    return out


def kept_set_metrics(kept: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """Precision of the kept set (share of clean pairs in it) and the share of noisy pairs removed."""
    return {
        "kept_precision": float((~noisy[kept]).mean()) if kept.any() else float("nan"),
        "noise_removed": float((~kept[noisy]).mean()) if noisy.any() else float("nan"),
    }
