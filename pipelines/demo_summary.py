"""Print what `make demo` did: pairs read and flagged, where the outputs are, and (because
sample_data carries ground truth) how well ncleaner's score finds the permuted captions
compared with the raw backbone similarity.

    python pipelines/demo_summary.py DEMO_DIR   # DEMO_DIR holds model/ report/ clean/ rejected/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ncleaner.evaluate import detection_metrics, kept_set_metrics, truth_from_report
from ncleaner.filtering import MANIFEST
from ncleaner.scoring import read_report
from ncleaner.shards import read_shards


def main(demo_dir: str) -> None:
    root = Path(demo_dir)
    report = read_report(root / "report")
    manifest = json.loads((root / "clean" / MANIFEST).read_text())
    rule = manifest["rule"]
    noisy = truth_from_report(report)
    metrics = detection_metrics(report, noisy)
    kept = report["key"].isin(_kept_keys(root / "clean", manifest)).to_numpy()
    kept_metrics = kept_set_metrics(kept, noisy)
    not_ok = report.loc[report["status"] != "ok", "status"].value_counts().to_dict()

    print()
    print("ncleaner demo summary")
    print("=====================")
    print(f"pairs read          {manifest['input_count']} from {len(manifest['input_shards'])} shards")
    print(
        f"pairs flagged       {manifest['rejected_count']} ({manifest['rejected_count'] / manifest['input_count']:.1%})"
        + (f", of which not scorable: {not_ok}" if not_ok else "")
    )
    print(f"threshold           {rule['column']} >= {rule['threshold']:.4g} ({rule['mode']})")
    print(f"model               {root / 'model'} (id {manifest['model_id']})")
    print(f"report              {root / 'report'} ({len(report)} rows; pandas.read_parquet reads it)")
    print(f"clean shards        {root / 'clean'} ({manifest['kept_count']} pairs, manifest.json)")
    if manifest.get("rejected_out"):
        print(f"rejected shards     {manifest['rejected_out']}")
    print()
    print(f"ground truth: {int(noisy.sum())} of {len(noisy)} captions were permuted (ncleaner_noisy in each json)")
    print(f"  {'column':<16}{'AUROC':>8}{'AP':>8}")
    for column in ("score", "clip_sim"):
        label = "raw backbone similarity (the usual CLIP score)" if column == "clip_sim" else "ncleaner DisNCL score"
        print(f"  {column:<16}{metrics[column]['auroc']:>8.3f}{metrics[column]['ap']:>8.3f}   {label}")
    precision, removed = kept_metrics["kept_precision"], kept_metrics["noise_removed"]
    print(f"  kept set: {precision:.1%} clean; {removed:.1%} of the noise removed")


def _kept_keys(clean_dir: Path, manifest: dict) -> set[str]:
    return {raw.key for raw in read_shards(str(clean_dir / name) for name in manifest["kept_shards"])}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
