"""Noise-detection benchmark: DisNCL against the raw backbone similarity, an NCR-style baseline
and DisNCL's ablations, from one run, on generated data with known permuted captions.

    python pipelines/benchmark_noise.py                      # the full run (about an hour on 2 cores)
    python pipelines/benchmark_noise.py --samples 96 --test-samples 32 --rates 0.4 --epochs 2   # CI size

For each noise rate it permutes that fraction of a clean generated training set (inject-noise),
fits every method on it, scores every pair, and measures noise-detection AUROC / AP of each score,
the precision of the kept set and the share of noise removed when the kept set is chosen by a
two-component mixture on that score (the same data-driven threshold for every row), retrieval
R@K on a clean held-out split, and the wall time of each fit. Prints one markdown table and
writes it, with the command line, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ncleaner import losses
from ncleaner.config import DisNCLConfig
from ncleaner.embeddings import open_for_model
from ncleaner.evaluate import encode_shards, kept_set_metrics, retrieval_metrics, truth_from_file
from ncleaner.fitting import fit
from ncleaner.mixture import TwoComponentMixture
from ncleaner.model import NcleanerModel
from ncleaner.noise import NOISE_MODES, TRUTH_FILE, inject_noise
from ncleaner.scoring import read_report, score
from ncleaner.synthetic import GENERATORS, make_generator, write_synthetic_shards

NCR = "NCR-style InfoNCE + loss mixture"
METHODS = {
    "DisNCL": {},
    "w/o disentanglement": {"lambda_dis": 0.0},
    "w/o L_reg": {"lambda_reg": 0.0},
    "w/o soft targets": {"soft_targets": False},
    "w/o noise weights": {"noise_weights": False},
    NCR: {"lambda_dis": 0.0, "lambda_reg": 0.0, "soft_targets": False, "noise_weights": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="training pairs")
    parser.add_argument("--test-samples", type=int, default=500, help="clean held-out pairs for retrieval")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--rates", default="0.2,0.4,0.6")
    parser.add_argument("--generator", choices=sorted(GENERATORS), default="scenes")
    parser.add_argument("--mode", choices=NOISE_MODES, default="permute", help="inject-noise's --mode")
    parser.add_argument("--no-image-clutter", action="store_true")
    parser.add_argument("--no-text-clutter", action="store_true")
    parser.add_argument("--epochs", type=int, default=DisNCLConfig.epochs)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--seed", type=int, default=1, help="data, noise and training seed (sample_data uses 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DisNCLConfig default for every method (for tuning), e.g. lambda_reg=0.02",
    )
    parser.add_argument("--out", default="pipelines/results/noise_benchmark.md")
    parser.add_argument("--workdir", default=None, help="keep shards, models and reports here (default: temporary)")
    args = parser.parse_args()
    args.base = base_config(args, parser)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ncleaner-bench-"))
    generator = make_generator(args.generator, not args.no_image_clutter, not args.no_text_clutter)
    shard_size = min(args.shard_size, args.samples)
    write_synthetic_shards(work / "train_clean", args.samples, shard_size, 0.0, args.seed, generator)
    write_synthetic_shards(work / "test", args.test_samples, shard_size, 0.0, args.seed + 1000, generator)

    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        noisy_dir = work / f"train_{rate}"
        inject_noise(str(work / "train_clean"), noisy_dir, rate=rate, seed=args.seed, mode=args.mode, force=True)
        for method in methods:
            new_rows = run_method(method, rate, noisy_dir, work, args)
            rows.extend(new_rows)
            for row in new_rows:
                print(format_row(row), flush=True)

    table = markdown(rows)
    header = [
        "# Noise-detection benchmark",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"Data: generator `{args.generator}` (image clutter {'off' if args.no_image_clutter else 'on'}, "
        f"text clutter {'off' if args.no_text_clutter else 'on'}), {args.samples} training pairs, "
        f"{args.test_samples} clean held-out pairs, seed {args.seed}; noise mode `{args.mode}` (`permute`: "
        "captions permuted as in NCR, NeurIPS 2021).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU; "
        f"{args.epochs} epochs per fit, {time.strftime('%Y-%m-%d')}."
        + (f" Overrides: {', '.join(args.overrides)}." if args.overrides else ""),
        "",
        "AUROC / AP: detecting the noisy pairs (positive = noisy) from each score, higher is better. "
        "Kept precision / noise removed: the kept set is the clean component of a two-component mixture "
        "fitted to that score. R@1 and rsum: retrieval on the clean held-out split (MII subspace; for "
        "clip_sim, the raw backbone space). Fit s: wall time of the fit.",
        "",
    ]
    text = "\n".join(header) + "\n" + table + "\n"
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwritten to {out}")


def base_config(args, parser) -> DisNCLConfig:
    """The defaults every method starts from: DisNCLConfig's, with --epochs, --seed and --set applied."""
    config = DisNCLConfig(
        epochs=args.epochs, warmup_epochs=min(DisNCLConfig.warmup_epochs, args.epochs - 1), seed=args.seed
    )
    try:
        return config.with_overrides(args.overrides)
    except ValueError as exc:
        parser.error(f"--set: {exc}")


def run_method(method: str, rate: float, noisy_dir: Path, work: Path, args) -> list[dict]:
    tag = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-") + f"-{rate}"
    model_dir, report_dir = work / "models" / tag, work / "reports" / tag
    config = replace(args.base, **METHODS[method])
    start = time.perf_counter()
    fit(str(noisy_dir), model_dir, config, force=True)
    fit_seconds = time.perf_counter() - start
    score(str(noisy_dir), model_dir, report_dir, overwrite=True)
    report = read_report(report_dir)
    noisy = truth_from_file(report, noisy_dir / TRUTH_FILE)
    retrieval = retrieval_metrics(str(work / "test"), model_dir)

    if method == NCR:
        # NCR's own statistic, and the plain cosine of the same model for a fairer comparison.
        columns = {
            "loss mixture": -per_pair_loss(model_dir, noisy_dir, config),
            "mii_sim": report["mii_sim"].to_numpy(),
        }
    elif method == "DisNCL":
        columns = {c: report[c].to_numpy() for c in ("score", "mii_sim", "soft_agreement", "clip_sim")}
    else:
        columns = {"score": report["score"].to_numpy()}
    rows = []
    for column, values in columns.items():
        clean_post = TwoComponentMixture.fit(values, seed=args.seed).clean_posterior(values)
        space = "clip" if column == "clip_sim" else "mii"
        rows.append(
            {
                "rate": rate,
                "method": "raw backbone similarity" if column == "clip_sim" else method,
                "column": column,
                "auroc": float(roc_auc_score(noisy, -values)),
                "ap": float(average_precision_score(noisy, -values)),
                **kept_set_metrics(clean_post >= 0.5, noisy),
                "i2t_R@1": retrieval[space]["i2t_R@1"],
                "t2i_R@1": retrieval[space]["t2i_R@1"],
                "rsum": retrieval[space]["rsum"],
                "fit_seconds": fit_seconds,
            }
        )
    return rows


@torch.no_grad()
def per_pair_loss(model_dir: Path, shards: Path, config: DisNCLConfig, *, store: Path | None = None) -> np.ndarray:
    """NCR's statistic: each pair's InfoNCE loss within fixed random batches of the training size
    (features read from the embeddings directory ``store`` when given)."""
    model = NcleanerModel.load(model_dir, "cpu")
    embeddings = open_for_model(store, model.config, create=False) if store else None
    f_v, f_t, _ = encode_shards(model, str(shards), store=embeddings)
    v_s, t_s = model.heads.mii(f_v, f_t)
    order = torch.from_numpy(np.random.default_rng(config.seed).permutation(len(v_s)))
    loss = torch.empty(len(v_s))
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        loss[idx] = losses.infonce_per_pair(v_s[idx], t_s[idx], config.tau)
    return loss.numpy()


COLUMNS = [
    ("rate", "{:.1f}"),
    ("method", "{}"),
    ("column", "{}"),
    ("auroc", "{:.4f}"),
    ("ap", "{:.4f}"),
    ("kept_precision", "{:.3f}"),
    ("noise_removed", "{:.3f}"),
    ("i2t_R@1", "{:.1f}"),
    ("t2i_R@1", "{:.1f}"),
    ("rsum", "{:.1f}"),
    ("fit_seconds", "{:.0f}"),
]


def format_row(row: dict) -> str:
    return "| " + " | ".join(fmt.format(row[key]) for key, fmt in COLUMNS) + " |"


def markdown(rows: list[dict]) -> str:
    names = [
        "noise",
        "method",
        "score column",
        "AUROC",
        "AP",
        "kept precision",
        "noise removed",
        "i2t R@1",
        "t2i R@1",
        "rsum",
        "fit s",
    ]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    return "\n".join(lines + [format_row(r) for r in rows])


if __name__ == "__main__":
    main()
