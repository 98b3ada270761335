"""The speed benchmark's harness at CI size: every row is produced, measured or marked unavailable.

The full run (ViT-B-32, 1,000 pairs, scales 1,4,16) is a benchmark, not a timed test: this only
checks that pipelines/benchmark_speed.py --quick runs each step and writes each row, so that the
committed results can be re-measured. Its numbers are not asserted on.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "pipelines" / "benchmark_speed.py"
NOT_AVAILABLE = "not available in this version"
# What each optional row needs from the CLI (command, option).
NEEDS = {
    "1b": [("embed", None)],
    "2": [("fit", "--embeddings"), ("score", "--embeddings")],
    "3": [("fit", "--embeddings"), ("score", "--embeddings")],
}
ROWS = ["1a", "1b", "2", "3", "4 fit 1x", "4 score 1x", "4 fit 2x", "4 score 2x", "5"]


def cli_has(env: dict, command: str, option: str | None) -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "ncleaner", command, "--help"], env=env, capture_output=True, text=True
    )
    return done.returncode == 0 and (option is None or re.search(rf"(^|[\s,]){option}\b", done.stdout) is not None)


@pytest.mark.slow
def test_quick_speed_benchmark_produces_every_row(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "speed.md"
    command = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        if row["value"] == NOT_AVAILABLE:
            needs = NEEDS.get(name, [])
            assert needs and not all(cli_has(env, c, o) for c, o in needs), f"row {name}: the CLI has what it needs"
        else:
            assert isinstance(row["value"], float) and math.isfinite(row["value"]) and row["value"] > 0, row
    text = out.read_text()
    for name in ROWS:
        assert f"| {name} |" in text
    for key in ("Command:", "Machine:", "Date:", "torch", "open_clip", "## Extrapolation to 100 M pairs"):
        assert key in text

    # Measured from outside, per process: a plain copy stays small, so the harness itself does not
    # leak its memory into the children's peak RSS; the ncleaner steps hold torch.
    runs = doc["runs"]
    assert runs["copy"]["max_rss_mb"] < 200
    assert all(runs[n]["max_rss_mb"] > runs["copy"]["max_rss_mb"] for n in ("bare", "fit_main", "score_main"))
    assert set(doc["scale_summary"]) == {"fit", "score", "fit_sample"}
    x = doc["extrapolation"]
    assert x["bottleneck"] in ("decode CPU cores", "GPU encode")
    assert all(math.isfinite(x[k]) and x[k] > 0 for k in ("decode_cpu_s_per_pair", "flops_per_pair", "pairs_per_s"))
