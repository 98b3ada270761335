"""Peak memory of the commands that read a whole report, on a generated report of many rows.

    python pipelines/benchmark_report_memory.py                  # 1,000,000 rows (the committed run)
    python pipelines/benchmark_report_memory.py --rows 100000    # smaller

Writes a report of ``--rows`` rows in parts of 10,000 (captions of about 80 characters, URLs,
hashes, uids: what ``score`` writes for a web pool) and empty stand-in shards, then runs, each in
a fresh process, ``filter --dry-run`` (the rule resolved and counted from the report: the same
report reading as a real filter, without the shard copy) with ``--keep-fraction`` and with
``--where``, and ``evaluate``; it reports each one's peak resident memory (``ru_maxrss``) and
the report's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ncleaner.schema import report_paths, report_schema  # noqa: E402

PART_ROWS = 10_000
WORDS = np.array("a the red blue green photo of on in with dog cat car street park house tree sky man woman".split())


def write_report(out: Path, shards: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    schema = report_schema(["ncleaner_noisy"])
    out.mkdir(parents=True)
    shards.mkdir(parents=True)
    for part in range(rows // PART_ROWS):
        name = f"{part:05d}"
        url = str(shards / f"{name}.tar")
        (shards / f"{name}.tar").write_bytes(b"")
        n = PART_ROWS
        words = WORDS[rng.integers(0, len(WORDS), size=(n, 14))]
        captions = [" ".join(w) for w in words]
        score = rng.normal(0.3, 0.05, n).astype(np.float32)
        columns = {
            "key": [f"{part:05d}{i:05d}" for i in range(n)],
            "shard": [url] * n,
            "index": np.arange(n),
            "caption": captions,
            "url": [f"https://images.example.invalid/{part}/{i}/{rng.integers(1 << 40):x}.jpg" for i in range(n)],
            "image_sha1": [f"{v:040x}" for v in rng.integers(0, 1 << 62, n)],
            "status": ["ok"] * n,
            "clip_sim": score,
            "mii_sim": score,
            "soft_agreement": score,
            "score": score,
            "clean_prob": rng.uniform(0, 1, n).astype(np.float32),
            "model_id": ["0123456789abcdef"] * n,
            "uid": [f"{v:032x}" for v in rng.integers(0, 1 << 62, n)],
            "width": rng.integers(200, 1000, n),
            "height": rng.integers(200, 1000, n),
            "caption_chars": [len(c) for c in captions],
            "caption_words": np.full(n, 14),
            "language": ["en"] * n,
            "language_prob": np.ones(n, np.float32),
            "ncleaner_noisy": ["true" if v else "false" for v in rng.random(n) < 0.2],
        }
        table = pa.table([columns[f.name] for f in schema], schema=schema)
        target, marker = report_paths(out, name)
        pq.write_table(table, target)
        marker.write_text(json.dumps({"shard": url, "rows": n, "model_id": "0123456789abcdef", "statuses": {"ok": n}}))


def peak(args: list[str]) -> tuple[float, float]:
    """(peak resident MB, seconds) of ``python -m ncleaner ARGS`` in a fresh process; a warning (the
    empty stand-in shards) is fine, a failure is not."""
    code = (
        "import resource, sys, runpy; sys.argv = ['ncleaner', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('ncleaner', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ncleaner {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    kb = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KB")))
    return kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "report_memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_report(tmp / "report", tmp / "shards", args.rows, args.seed)
        disk = sum(p.stat().st_size for p in (tmp / "report").glob("*.parquet")) / 2**20
        shards = str(tmp / "shards")
        runs = {
            "filter --keep-fraction 0.8 --dry-run": ["filter", shards, "--report", str(tmp / "report"), "--out",
                                                     str(tmp / "c1"), "--keep-fraction", "0.8", "--dry-run", "-q"],
            "filter --auto --where ... --dry-run": ["filter", shards, "--report", str(tmp / "report"), "--out",
                                                    str(tmp / "c2"), "--auto", "--where",
                                                    "caption_words > 2 AND least(width, height) > 300", "--dry-run",
                                                    "-q"],
            "evaluate --truth-field ncleaner_noisy": ["evaluate", "--report", str(tmp / "report"), "--truth-field",
                                                      "ncleaner_noisy"],
            "inspect --keep-fraction 0.8": ["inspect", shards, "--report", str(tmp / "report"), "--out",
                                            str(tmp / "page.html"), "--keep-fraction", "0.8", "-q"],
        }  # fmt: skip
        results = []
        for name, command in runs.items():
            mb, seconds = peak(command)
            results.append({"command": name, "peak_mb": mb, "seconds": seconds})
        page_kb = (tmp / "page.html").stat().st_size / 1024
    lines = [
        "# Report memory",
        "",
        f"`python pipelines/benchmark_report_memory.py --rows {args.rows}` on {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores: a generated report of {args.rows:,} rows in parts of "
        f"{PART_ROWS:,} ({disk:.0f} MB of Parquet on disk); each command in a fresh process, its peak "
        "resident memory (ru_maxrss, the Python interpreter and imports included). The stand-in shards are "
        "empty, so `inspect` draws its cards without images (each shard unreadable, with a warning): its page "
        f"was {page_kb:.0f} KiB.",
        "",
        "| command | peak MB | bytes a row | seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{r['command']}` | {r['peak_mb']:.0f} | {r['peak_mb'] * 2**20 / args.rows:.0f} | {r['seconds']:.1f} |"
        for r in results
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.rows == 1_000_000:
        args.out.with_suffix(".md").write_text(text)
        record = {"rows": args.rows, "results": results, "inspect_page_kib": page_kb}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
