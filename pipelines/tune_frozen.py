"""Try DisNCLConfig variants on pools a ``benchmark_frozen.py --workdir W`` run left behind.

    python pipelines/tune_frozen.py W seen-scenes-2000-s1-mix-0.4,seen-paraphrase-2000-s2-mix-0.4 \\
        '{}' '{"lr": 1e-4}' '{"soft_targets": false}'

Each variant (a JSON object of config fields) is fitted and scored on every pool from the pool's
embeddings directory, with the pool's own backbone, frozen; one line per variant: mean AUROC of
``clip_sim``, ``mii_sim``, ``soft_agreement`` and ``score``, the near-miss kinds (``hard``,
``partial``) for ``mii_sim`` and ``clip_sim``, and ``mii_sim - clip_sim`` per pool. Tune only on
the families defaults may be tuned on (``scenes``, ``paraphrase``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ncleaner.config import DisNCLConfig  # noqa: E402
from ncleaner.engine import RunOptions  # noqa: E402
from ncleaner.evaluate import (  # noqa: E402
    detection_by_kind,
    detection_metrics,
    noise_kinds_from_file,
    truth_from_file,
)
from ncleaner.fitting import fit  # noqa: E402
from ncleaner.noise import TRUTH_FILE  # noqa: E402
from ncleaner.scoring import read_report, score  # noqa: E402

COLUMNS = ("clip_sim", "mii_sim", "soft_agreement", "score")
NEAR_MISSES = ("hard", "partial")


def evaluate_variant(work: Path, pools: list[str], overrides: dict, scratch: Path) -> pd.DataFrame:
    rows = []
    for tag in pools:
        store = work / "embeddings" / tag
        pretrained = json.loads((store / "embeddings.json").read_text())["pretrained"]
        checkpoint = _checkpoint_path(pretrained)
        seed = int(re.search(r"-s(\d+)-", tag).group(1))
        config = DisNCLConfig(
            backbone="ncleaner-tiny", pretrained=checkpoint, train_backbone="none", seed=seed
        ).with_overrides(overrides)
        noisy_dir = work / "noisy" / tag
        fit(str(noisy_dir), scratch / "model", config, force=True, embeddings=store, run=RunOptions(workers=0))
        score(
            str(noisy_dir),
            scratch / "model",
            scratch / "report",
            overwrite=True,
            embeddings=store,
            run=RunOptions(workers=0),
        )
        report = read_report(scratch / "report")
        noisy = truth_from_file(report, noisy_dir / TRUTH_FILE)
        kinds = noise_kinds_from_file(report, noisy_dir / TRUTH_FILE)
        row = {"pool": tag, **{c: m["auroc"] for c, m in detection_metrics(report, noisy, columns=COLUMNS).items()}}
        by_kind = detection_by_kind(report, noisy, kinds, columns=COLUMNS) if kinds is not None else {}
        for kind in NEAR_MISSES:
            for c in ("clip_sim", "mii_sim"):
                if kind in by_kind:
                    row[f"{c}_{kind}"] = by_kind[kind]["columns"][c]["auroc"]
        rows.append(row)
    return pd.DataFrame(rows)


def _checkpoint_path(name: str) -> str:
    """An embeddings directory records the checkpoint's file name; the benchmark's cache holds it."""
    from pretrain_backbone import CACHE_DIR

    path = CACHE_DIR / Path(name).name
    if not path.is_file():
        raise SystemExit(f"{path}: checkpoint not in the cache (run pipelines/benchmark_frozen.py first)")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="a benchmark_frozen.py --workdir")
    parser.add_argument("pools", help="comma-separated pool tags (directories under WORKDIR/noisy)")
    parser.add_argument("variants", nargs="+", help="JSON objects of DisNCLConfig fields")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ncleaner-tune"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for spec in args.variants:
        start = time.perf_counter()
        frame = evaluate_variant(args.workdir, args.pools.split(","), json.loads(spec), args.scratch)
        means = " ".join(f"{c} {frame[c].mean():.4f}" for c in frame.columns if c != "pool")
        gaps = " ".join(f"{g:+.3f}" for g in frame["mii_sim"] - frame["clip_sim"])
        print(f"{spec} ({time.perf_counter() - start:.0f} s): {means}; mii_sim - clip_sim per pool {gaps}", flush=True)


if __name__ == "__main__":
    main()
