"""Dedup benchmark: planted copies found, distinct pictures left alone, and what it costs.

    python pipelines/benchmark_dedup.py            # the committed run
    python pipelines/benchmark_dedup.py --quick    # CI size, under a minute

Per generator family, a pool of distinct generated pictures with copies of some of them planted
(``synthetic.write_shards_with_duplicates``: the same bytes, re-encoded, resized, cropped), then
``ncleaner.dedup`` through the package API at several ``near_similarity`` values (the hashes are
computed once and reused). A copy is found when it lands in its original's group; a sample marked
as a duplicate is right when its group's representative is its own picture or a copy of it.
``scenes`` and ``layout`` are the families the default was chosen on; ``hard`` and ``paraphrase``
are reported, never tuned on. The cost rows time the grouping's link search on random hashes of
growing pools (every pair within clusters of ``CLUSTER_SIZE``), and the first pass per sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ncleaner.config import DEFAULT_NEAR_SIMILARITY  # noqa: E402
from ncleaner.dedup import CLUSTER_SIZE, VIEWS, Prints, dedup, linked_in_clusters  # noqa: E402
from ncleaner.engine import RunOptions  # noqa: E402
from ncleaner.synthetic import COPY_EDITS, make_generator, write_shards_with_duplicates  # noqa: E402

TUNED = ("scenes", "layout")
HELD_OUT = ("hard", "paraphrase")


def measure(rows: pd.DataFrame, truth: dict[str, tuple[str, str]]) -> dict:
    """Recall per edit and precision of the marked duplicates, from one dedup directory's rows."""
    source = {k: truth[k][0] if k in truth else k for k in rows["key"]}
    group = dict(zip(rows["key"], rows["dup_group"], strict=True))
    found = Counter()
    for key, (original, edit) in truth.items():
        g = group[key]
        found[edit] += bool(g == g and g == group[original])  # g == g: not NaN
    per_edit = Counter(edit for _, edit in truth.values())
    marked = rows[rows["duplicate_of"].notna()]
    right = sum(source[k] == source[d["key"]] for k, d in zip(marked["key"], marked["duplicate_of"], strict=True))
    return {
        "recall": {e: found[e] / per_edit[e] for e in COPY_EDITS if per_edit[e]},
        "recall_all": sum(found.values()) / max(1, len(truth)),
        "marked": int(len(marked)),
        "wrongly_marked": int(len(marked) - right),
        "precision": right / max(1, len(marked)),
    }


def family_rows(family: str, args, work: Path) -> list[dict]:
    pool = work / family
    truth = write_shards_with_duplicates(
        pool, args.distinct, args.copies, shard_size=500, seed=args.seed, generator=make_generator(family)
    )
    out = work / f"{family}-dedup"
    results = []
    runs = [(s, CLUSTER_SIZE) for s in args.similarities] + [(DEFAULT_NEAR_SIMILARITY, c) for c in args.cluster_sizes]
    for i, (similarity, cluster_size) in enumerate(runs):
        start = time.perf_counter()
        dedup(str(pool), out, near_similarity=similarity, cluster_size=cluster_size, run=RunOptions())
        seconds = time.perf_counter() - start
        rows = pd.read_parquet(out)
        results.append(
            {
                "family": family,
                "tuned_on": family in TUNED,
                "near_similarity": similarity,
                "cluster_size": cluster_size,
                "samples": len(rows),
                "seconds": seconds,
                "hashed": i == 0,  # the first run hashes, the later ones reuse the hashes
                **measure(rows, truth),
            }
        )
    return results


def cost_rows(sizes: list[int], seed: int) -> list[dict]:
    """The link search alone on generated fingerprints (every view): seconds, and per sample."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        # Random whole views; each centre view agrees with its whole in about 80 % of the bits and
        # colours, as a picture's own views do (not independent: those would land in four clusters).
        views = 1 + len(VIEWS)
        raw = np.repeat(rng.integers(0, 256, size=(n, 1, 80), dtype=np.uint8), views, axis=1)
        flips = np.packbits(rng.random((n, views - 1, 256)) < 0.2, axis=2)
        raw[:, 1:, :32] ^= flips
        prints = Prints(np.arange(n), raw)
        start = time.perf_counter()
        linked_in_clusters(
            n, prints.signs, prints.features, prints.similarity, DEFAULT_NEAR_SIMILARITY, views=prints.views
        )
        seconds = time.perf_counter() - start
        rows.append(
            {
                "samples": n,
                "clusters": max(1, n // CLUSTER_SIZE),
                "seconds": seconds,
                "us_per_sample": 1e6 * seconds / n,
            }
        )
    return rows


def table(results: list[dict], costs: list[dict], args) -> str:
    lines = [
        "# Dedup benchmark",
        "",
        f"`python pipelines/benchmark_dedup.py{' --quick' if args.quick else ''}` on {platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores: {args.distinct} distinct generated pictures a family "
        f"(64 x 64 px JPEG) with {args.copies} planted copies ({', '.join(COPY_EDITS)}: same bytes; saved again at "
        "quality 50-80; scaled to 50-80 %; cropped by 4-10 % on every side; on one or two adjacent sides; made "
        "grey). Recall: copies grouped with their original. "
        "Wrong: samples marked as duplicates of another picture. Default near_similarity "
        f"{DEFAULT_NEAR_SIMILARITY}, chosen on {' and '.join(TUNED)}; {' and '.join(HELD_OUT)} are held out.",
        "",
        "| family | near_similarity | cluster size | recall | " + " | ".join(COPY_EDITS) + " | marked | wrong "
        "| precision | s |",
        "|---|---|---|---|" + "---|" * len(COPY_EDITS) + "---|---|---|---|",
    ]
    for r in results:
        name = r["family"] + ("" if r["tuned_on"] else " (held out)")
        per = [f"{r['recall'].get(e, float('nan')):.3f}" for e in COPY_EDITS]
        lines.append(
            f"| {name} | {r['near_similarity']:.2f} | {r['cluster_size']} | {r['recall_all']:.3f} | {' | '.join(per)} "
            f"| {r['marked']} | {r['wrongly_marked']} | {r['precision']:.3f} "
            f"| {r['seconds']:.1f}{' (hashing)' if r['hashed'] else ''} |"
        )
    lines += [
        "",
        "Link search (the grouping's cost) on generated fingerprints (random wholes, centre views 80 % like "
        "their whole): every pair within k-means clusters of "
        f"{CLUSTER_SIZE} samples on average (each sample in the clusters of its {1 + len(VIEWS)} views), so once the "
        f"pool holds two clusters it grows as n x {CLUSTER_SIZE} x (views it spreads over), not as n squared.",
        "",
        "| samples | clusters | seconds | us a sample |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c['samples']} | {c['clusters']} | {c['seconds']:.2f} | {c['us_per_sample']:.0f} |" for c in costs]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=1500)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument(
        "--similarities", type=float, nargs="+", default=[0.78, 0.80, DEFAULT_NEAR_SIMILARITY, 0.84, 0.86]
    )
    parser.add_argument(
        "--cluster-sizes",
        type=int,
        nargs="+",
        default=[256, 64],
        help="Also run the default threshold with these cluster sizes: the pool split into clusters, as a "
        "large pool is, to measure the links lost between clusters.",
    )
    parser.add_argument("--families", nargs="+", default=[*TUNED, *HELD_OUT])
    parser.add_argument("--cost-sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="CI size")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dedup_benchmark")
    args = parser.parse_args()
    if args.quick:
        args.distinct, args.copies, args.similarities = 200, 40, [DEFAULT_NEAR_SIMILARITY]
        args.families, args.cost_sizes, args.cluster_sizes = ["scenes", "hard"], [1000], [64]
    with tempfile.TemporaryDirectory() as tmp:
        results = [r for family in args.families for r in family_rows(family, args, Path(tmp))]
    costs = cost_rows(args.cost_sizes, args.seed)
    text = table(results, costs, args)
    print(text)
    if not args.quick:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"results": results, "costs": costs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
