"""Frozen-backbone benchmark: DisNCL heads on a frozen pretrained backbone against that backbone's
own ``clip_sim``, an NCR-style baseline on the same frozen features and DisNCL's ablations, over
seeds, noise rates and modes, generator families and two clutter regimes; then the model trained
from scratch on each method's kept set.

    python pipelines/benchmark_frozen.py                 # the committed run (see --help for knobs)
    python pipelines/benchmark_frozen.py --quick         # CI size, a few minutes

The backbone is a ``pipelines/pretrain_backbone.py`` checkpoint (ncleaner-tiny pretrained on
20,000 clean generated pairs), passed as ``--pretrained PATH`` with ``train_backbone=none``: only
the heads train, as a user runs ncleaner. Evaluation pools come from seeds below 1,000 (the
corpus used 7,000 up) in two regimes:

- ``seen``: the backbone was pretrained with ``stripes`` clutter, and the pool carries the same
  kind: a backbone pretrained on data like the pool's;
- ``unseen``: the backbone was pretrained without any clutter (flat backgrounds, plain captions),
  and the pool carries ``blobs`` backgrounds and ``SITE_TAGS`` phrases: clutter it never saw, as
  a real pool's boilerplate differs from a backbone's training data.

Families: ``scenes`` and ``paraphrase`` are the ones defaults may be tuned on; ``hard`` and
``layout`` are reported, never tuned on (``layout`` is also absent from the pretraining corpus).
Each pool is embedded once (``ncleaner.embed``); every method fits and scores from that
embeddings directory through the package API.
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_noise import METHODS, NCR, per_pair_loss  # noqa: E402
from pretrain_backbone import PretrainSettings, checkpoint, train_contrastive, zero_shot_recall  # noqa: E402

from ncleaner.config import DisNCLConfig  # noqa: E402
from ncleaner.embeddings import embed  # noqa: E402
from ncleaner.engine import RunOptions  # noqa: E402
from ncleaner.evaluate import detection_by_kind, detection_metrics, noise_kinds_from_file, truth_from_file  # noqa: E402
from ncleaner.fitting import fit  # noqa: E402
from ncleaner.noise import TRUTH_FILE, inject_noise  # noqa: E402
from ncleaner.scoring import read_report, score  # noqa: E402
from ncleaner.shards import expand_shards, image_member, read_shards, read_text_fields  # noqa: E402
from ncleaner.synthetic import make_generator, write_synthetic_shards  # noqa: E402

# regime: (the pool's clutter style, whether the backbone's pretraining corpus had clutter)
REGIMES = {"seen": ("stripes", True), "unseen": ("blobs", False)}
TUNED_FAMILIES = ("scenes", "paraphrase")
HELD_OUT_FAMILIES = ("hard", "layout")
MAIN_METHODS = ("DisNCL", NCR)
# The ablations of the anchored score (docs/design.md sections 2.1 and 3.1), run at 40 % mix on the
# main family: the hard negatives added one at a time and together, the weight fixed instead of
# chosen, and no self-check at all (the heads' MII similarity as the score, as before the anchor).
FROZEN_METHODS = {
    "DisNCL": METHODS["DisNCL"],
    NCR: METHODS[NCR],
    "+ edit negatives": {"lambda_edit": 1.0},
    "+ neighbourhood batches": {"hard_batch_share": 0.5},
    "+ edit negatives + neighbourhood batches": {"lambda_edit": 1.0, "hard_batch_share": 0.5},
    "weight fixed at 1": {"score_weight": 1.0},
    "no self-check (score = mii_sim)": {"selfcheck_fraction": 0.0, "score_term": "mii_sim", "score_weight": 1.0},
    "w/o noise weights": METHODS["w/o noise weights"],
}


@dataclass(frozen=True)
class Pool:
    """One noisy evaluation pool: what it is drawn from and how its noise is made."""

    regime: str
    family: str
    size: int
    rate: float
    mode: str
    seed: int

    @property
    def name(self) -> str:
        """The clean pool's name: the pools of every rate and mode share it."""
        return f"{self.regime}-{self.family}-{self.size}-s{self.seed}"

    @property
    def tag(self) -> str:
        """This noisy pool's name (its shards, embeddings, models and reports in the workdir)."""
        return f"{self.name}-{self.mode}-{self.rate}"


def clean_pool(work: Path, pool: Pool, shard_size: int) -> None:
    out = work / "clean" / pool.name
    if not out.exists():
        generator = make_generator(pool.family, clutter=REGIMES[pool.regime][0])
        write_synthetic_shards(out, pool.size, min(shard_size, pool.size), 0.0, pool.seed, generator)


def run_pool(pool: Pool, methods: tuple[str, ...], work: Path, base: DisNCLConfig) -> list[dict]:
    """Noise, embed, then fit and score every method; one row per (method, score column)."""
    torch.set_num_threads(1)
    backbone = base.pretrained
    tag = pool.tag
    noisy_dir = work / "noisy" / tag
    inject_noise(str(work / "clean" / pool.name), noisy_dir, rate=pool.rate, seed=pool.seed, mode=pool.mode, force=True)
    store = work / "embeddings" / tag
    embed(str(noisy_dir), store, backbone=base.backbone, pretrained=backbone, run=RunOptions(workers=0))
    rows = []
    for method in methods:
        config = replace(base, seed=pool.seed, **FROZEN_METHODS[method])
        model_dir, report_dir = work / "models" / tag / _slug(method), work / "reports" / tag / _slug(method)
        start = time.perf_counter()
        fit(str(noisy_dir), model_dir, config, force=True, embeddings=store, run=RunOptions(workers=0))
        fit_seconds = time.perf_counter() - start
        score(str(noisy_dir), model_dir, report_dir, overwrite=True, embeddings=store, run=RunOptions(workers=0))
        report = read_report(report_dir)
        noisy = truth_from_file(report, noisy_dir / TRUTH_FILE)
        if method == NCR:
            report["loss mixture"] = -per_pair_loss(model_dir, noisy_dir, config, store=store)
            columns = ["loss mixture", "mii_sim"]
        elif method == "DisNCL":
            columns = ["score", "mii_sim", "soft_agreement", "clip_sim"]
        else:
            columns = ["score"]
        estimate = selfcheck_estimate(model_dir)
        kinds = noise_kinds_from_file(report, noisy_dir / TRUTH_FILE)
        overall = detection_metrics(report, noisy, columns=columns)
        by_kind = detection_by_kind(report, noisy, kinds, columns=columns) if kinds is not None else {}
        for column in columns:
            rows.append(
                {
                    **asdict(pool),
                    "method": "clip_sim (frozen backbone)" if column == "clip_sim" else method,
                    "column": column,
                    **overall[column],
                    "fit_seconds": fit_seconds,
                    **(estimate if column == "score" else {}),
                    **{f"auroc_{kind}": k["columns"][column]["auroc"] for kind, k in by_kind.items()},
                }
            )
    return rows


def selfcheck_estimate(model_dir: Path) -> dict:
    """What fit's self-check chose and estimated (score - clip_sim AUROC on its half B), if it ran."""
    path = model_dir / "selfcheck.json"
    calibration = json.loads((model_dir / "calibration.json").read_text())
    out = {"score_term": calibration["term"], "score_weight": calibration["weight"]}
    if path.is_file():
        final = json.loads(path.read_text())["rows"][-1]
        out.update(selfcheck_gain=final["gain"], selfcheck_gain_se=final["gain_se"])
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -- downstream: a fresh backbone trained on each kept set -----------------------------------------


def read_pairs(shards: str | Path) -> tuple[list[str], list, list[str]]:
    """(keys, PIL images, captions) of every sample of generated shards, in shard order."""
    from io import BytesIO

    from PIL import Image

    keys, images, captions = [], [], []
    for raw in read_shards(expand_shards(str(shards))):
        caption, _, _, _ = read_text_fields(raw)
        keys.append(raw.key)
        images.append(Image.open(BytesIO(image_member(raw))).convert("RGB"))
        captions.append(caption)
    return keys, images, captions


def downstream(pool: Pool, work: Path, test_dir: Path, *, steps: int, batch_size: int) -> list[dict]:
    """Train ncleaner-tiny from scratch with the same step budget on the pairs each selector keeps
    at the true clean share, and measure retrieval on ``test_dir`` (clean held-out pairs)."""
    torch.set_num_threads(1)
    tag = pool.tag
    noisy_dir = work / "noisy" / tag
    report = read_report(work / "reports" / tag / _slug("DisNCL")).set_index("key")
    keys, images, captions = read_pairs(noisy_dir)
    report = report.loc[keys]
    noisy = truth_from_file(report.reset_index(), noisy_dir / TRUTH_FILE)
    k = int(round((1 - pool.rate) * len(keys)))
    selectors = {
        "no filter (all pairs)": np.arange(len(keys)),
        "clip_sim top share": np.argsort(-report["clip_sim"].to_numpy(), kind="stable")[:k],
        "ncleaner score top share": np.argsort(-report["score"].to_numpy(), kind="stable")[:k],
        "oracle (clean pairs)": np.flatnonzero(~noisy),
    }
    _, test_images, test_captions = read_pairs(test_dir)
    rows = []
    for name, kept in selectors.items():
        backbone = train_contrastive(
            "ncleaner-tiny",
            [images[i] for i in kept],
            [captions[i] for i in kept],
            epochs=1,
            batch_size=batch_size,
            lr=2e-3,
            seed=pool.seed,
            steps=steps,
        )
        recall = zero_shot_recall(backbone, test_images, test_captions)
        rows.append(
            {**asdict(pool), "kept_by": name, "kept": len(kept), "kept_noisy": int(noisy[kept].sum()), **recall}
        )
    return rows


# -- tables ---------------------------------------------------------------------------------------


def mean_std(frame: pd.DataFrame, by: list[str], values: list[str]) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds, formatted ``0.912 ± 0.004``."""
    grouped = frame.groupby(by, sort=False)[values]
    mean, std, n = grouped.mean(), grouped.std(ddof=1).fillna(0.0), grouped.size()
    out = pd.DataFrame(index=mean.index)
    for v in values:
        digits = 1 if "R@" in v or v == "rsum" else 0 if v.startswith("kept") else 3
        out[v] = [
            "—" if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean[v], std[v], strict=True)
        ]
    out["seeds"] = n
    return out.reset_index()


def to_markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def gap_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per condition: score - clip_sim AUROC, its mean and std over seeds, whether the mean
    exceeds two standard deviations of the per-seed differences, and the self-check's estimate
    of the same difference (on its own injected noise) with its worst error over seeds."""
    keys = ["regime", "family", "size", "rate", "mode"]
    rows = frame[(frame.method == "DisNCL") & (frame.column == "score")].set_index([*keys, "seed"])
    base = frame[frame.column == "clip_sim"].set_index([*keys, "seed"])["auroc"]
    diff = pd.DataFrame({"gap": rows["auroc"] - base}).dropna()
    diff["estimate"] = rows["selfcheck_gain"] if "selfcheck_gain" in rows else np.nan
    diff["chosen"] = rows["score_term"] + " " + rows["score_weight"].map(lambda w: f"{w:g}")
    diff = diff.reset_index()
    g = diff.groupby(keys, sort=False)
    out = pd.DataFrame(
        {"gap_mean": g["gap"].mean(), "gap_std": g["gap"].std(ddof=1).fillna(0.0), "seeds": g.size()}
    ).reset_index()
    out["score ≥ clip_sim on every seed"] = g["gap"].min().to_numpy() >= -1e-12
    out["mean > 2 std"] = out.gap_mean > 2 * out.gap_std
    out["self-check estimate"] = g["estimate"].mean().map(lambda v: "—" if np.isnan(v) else f"{v:+.3f}").to_numpy()
    error = (diff["estimate"] - diff["gap"]).abs().groupby([diff[k] for k in keys], sort=False).max()
    out["worst |estimate - gap|"] = error.map(lambda v: "—" if np.isnan(v) else f"{v:.3f}").to_numpy()
    out["chosen (term weight), per seed"] = g["chosen"].agg(lambda c: ", ".join(c)).to_numpy()
    out["gap_mean"] = out.gap_mean.map(lambda v: f"{v:+.3f}")
    out["gap_std"] = out.gap_std.map(lambda v: f"{v:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: one seed, small pools, few steps")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--size", type=int, default=2000, help="pairs per pool in the main tables")
    parser.add_argument("--sizes", default="1000,5000,20000", help="pool sizes of the size sweep ('' to skip)")
    parser.add_argument("--rates", default="0.2,0.4,0.6")
    parser.add_argument("--modes", default="permute,mix")
    parser.add_argument("--regimes", default="seen,unseen")
    parser.add_argument("--families", default="scenes,paraphrase,hard,layout")
    parser.add_argument("--main-family", default="scenes", help="family of the rate x mode table")
    parser.add_argument("--family-modes", default="mix", help="noise modes of the other families' pools")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--downstream-steps", type=int, default=80, help="optimiser steps per downstream model")
    parser.add_argument("--downstream-seeds", default="1,2,3", help="'' to skip the downstream step")
    parser.add_argument("--test-size", type=int, default=1000, help="clean held-out pairs for downstream retrieval")
    parser.add_argument("--pretrain-pairs", type=int, default=PretrainSettings.pairs)
    parser.add_argument("--pretrain-epochs", type=int, default=PretrainSettings.epochs)
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="pools run at once")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="pipelines/results/frozen_benchmark.md")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.size, args.sizes, args.rates = "1", 240, "", "0.4"
        args.families, args.downstream_steps, args.downstream_seeds, args.test_size = args.main_family, 6, "1", 64
        args.pretrain_pairs, args.pretrain_epochs = 256, 1
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    modes, regimes, families = args.modes.split(","), args.regimes.split(","), args.families.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ncleaner-frozen-"))
    started = time.perf_counter()

    backbones, bases = {}, {}
    for regime in regimes:
        clutter = REGIMES[regime][1]
        settings = PretrainSettings(
            pairs=args.pretrain_pairs, epochs=args.pretrain_epochs, image_clutter=clutter, text_clutter=clutter
        )
        backbones[regime] = str(checkpoint(settings))
        bases[regime] = DisNCLConfig(
            backbone=settings.backbone, pretrained=backbones[regime], train_backbone="none"
        ).with_overrides(args.overrides)

    # Which methods each pool runs: every rate and mode on the main family, 40 % on every family,
    # ablations at 40 % on the main family, and the size sweep at 40 % mix.
    tasks: dict[Pool, tuple[str, ...]] = {}
    for regime in regimes:
        for seed in seeds:
            for family in families:
                main = family == args.main_family
                for rate in rates if main else [r for r in rates if r == 0.4] or rates[:1]:
                    for mode in modes if main else [m for m in modes if m in args.family_modes.split(",")]:
                        pool = Pool(regime, family, args.size, rate, mode, seed)
                        ablate = args.ablations and family == args.main_family and rate == 0.4 and mode == "mix"
                        tasks[pool] = tuple(FROZEN_METHODS) if ablate else MAIN_METHODS
            for size in [int(s) for s in args.sizes.split(",") if s and seed == seeds[0]]:
                tasks.setdefault(Pool(regime, args.main_family, size, 0.4, "mix", seed), ("DisNCL",))
    for pool in tasks:
        clean_pool(work, pool, 500)

    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        # The largest pools first, so that the last ones to finish are short.
        order = sorted(tasks, key=lambda p: -p.size * len(tasks[p]))
        futures = {pool: ex.submit(run_pool, pool, tasks[pool], work, bases[pool.regime]) for pool in order}
        for pool, future in futures.items():
            rows.extend(future.result())
            print(f"{pool.name} {pool.mode} {pool.rate}: done ({time.perf_counter() - started:.0f} s)", flush=True)
        frame = pd.DataFrame(rows)

        # Downstream: 40 % mix on the main family, both regimes.
        down_pools = [
            Pool(regime, args.main_family, args.size, 0.4, "mix", int(s))
            for regime in regimes
            for s in args.downstream_seeds.split(",")
            if s
        ]
        down_pools = [p for p in down_pools if p in tasks]
        tests = {}
        for regime in {p.regime for p in down_pools}:
            tests[regime] = work / "test" / regime
            if not tests[regime].exists():
                write_synthetic_shards(
                    tests[regime],
                    args.test_size,
                    500,
                    0.0,
                    900,
                    make_generator(args.main_family, clutter=REGIMES[regime][0]),
                )
        down_futures = [
            ex.submit(downstream, p, work, tests[p.regime], steps=args.downstream_steps, batch_size=128)
            for p in down_pools
        ]
        down = pd.DataFrame([r for f in down_futures for r in f.result()])
    elapsed = time.perf_counter() - started
    write_results(args, frame, down, backbones, elapsed)


def write_results(args, frame: pd.DataFrame, down: pd.DataFrame, backbones: dict, elapsed: float) -> None:
    kinds = [c for c in frame.columns if c.startswith("auroc_")]
    main_frame = frame[(frame.family == args.main_family) & (frame["size"] == args.size)]
    headline = main_frame[main_frame.method.isin(["DisNCL", "clip_sim (frozen backbone)", NCR])]
    headline = headline[headline.column.isin(["score", "clip_sim", "loss mixture"])]
    sections = [
        (
            "Detection by noise rate and mode (family " + args.main_family + ")",
            mean_std(headline, ["regime", "mode", "rate", "method", "column"], ["auroc", "ap"]),
        ),
        ("score - clip_sim AUROC, per condition (differences taken seed by seed)", gap_table(frame)),
        (
            "Detection per family at 40 % noise (scenes, paraphrase: tuned on; hard, layout: never tuned on)",
            mean_std(
                frame[
                    (frame.rate == 0.4)
                    & (frame["size"] == args.size)
                    & frame.column.isin(["score", "clip_sim", "loss mixture"])
                ],
                ["regime", "family", "mode", "method", "column"],
                ["auroc", "ap"],
            ),
        ),
        (
            "AUROC by noise kind (mix mode, 40 %, every family)",
            mean_std(
                frame[
                    (frame["mode"] == "mix")
                    & (frame.rate == 0.4)
                    & (frame["size"] == args.size)
                    & frame.column.isin(["score", "clip_sim", "loss mixture"])
                ],
                ["regime", "family", "method", "column"],
                kinds,
            ),
        ),
        (
            "DisNCL's score columns and ablations (40 %, family " + args.main_family + "; ablations: mix mode)",
            mean_std(
                main_frame[(main_frame.rate == 0.4) & (main_frame.method != NCR)],
                ["regime", "mode", "method", "column"],
                ["auroc", "ap"],
            ),
        ),
        (
            "Pool size (40 % mix, family " + args.main_family + ")",
            mean_std(
                frame[
                    (frame.family == args.main_family)
                    & (frame["mode"] == "mix")
                    & (frame.rate == 0.4)
                    & frame.column.isin(["score", "clip_sim", "loss mixture"])
                ],
                ["regime", "size", "method", "column"],
                ["auroc", "ap"],
            ),
        ),
    ]
    if len(down):
        sections.append(
            (
                "Downstream: ncleaner-tiny trained from scratch on each kept set (40 % mix, family "
                + args.main_family
                + f", {args.downstream_steps} steps of 128), retrieval on clean held-out pairs",
                mean_std(down, ["regime", "kept_by"], ["kept", "kept_noisy", "i2t_R@1", "t2i_R@1", "rsum"]),
            )
        )
    header = [
        "# Frozen-backbone benchmark",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        "Backbones (pipelines/pretrain_backbone.py, ncleaner-tiny, "
        f"{args.pretrain_pairs} pairs, {args.pretrain_epochs} epochs), frozen: "
        + "; ".join(f"{r}: `{Path(b).name}`" for r, b in backbones.items())
        + f". Seeds {args.seeds}; pools of {args.size} pairs; the size sweep on seed {args.seeds.split(',')[0]}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, {args.jobs} jobs; "
        f"{time.strftime('%Y-%m-%d')}; whole run {elapsed / 60:.0f} min."
        + (f" Overrides: {', '.join(args.overrides)}." if args.overrides else ""),
        "",
        "AUROC / AP: detecting the noisy pairs (positive = noisy) from each column, higher is better; "
        "mean ± sample std over seeds.",
    ]
    body = "\n\n".join(f"## {title}\n\n{to_markdown(table)}" for title, table in sections)
    text = "\n".join(header) + "\n\n" + body + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"detection": frame.to_dict("records"), "downstream": down.to_dict("records")}, indent=1) + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
