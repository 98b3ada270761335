"""The report's cheap columns (issue 21): width, height, caption length and language, and
DataComp's basic filter as one --where over them, through score and filter on real shards."""

from __future__ import annotations

import io
import json

import pandas as pd
from conftest import run_cli, write_tar
from PIL import Image

from ncleaner.shards import read_shards

# DataComp's basic filter (docs/commands.md), with py3langid's language in place of fastText's.
BASIC_FILTER = (
    "language = 'en' AND caption_words > 2 AND caption_chars > 5 "
    "AND least(width, height) > 200 AND greatest(width, height) < 3 * least(width, height)"
)
SAMPLES = {  # key: (width, height, caption, kept by the basic filter)
    "keep1": (320, 240, "a photo of a red car parked on the street", True),
    "keep2": (256, 512, "two dogs playing with a ball in the park", True),
    "french": (320, 240, "une photo d'une voiture rouge garée dans la rue", False),
    "short": (320, 240, "red car", False),
    "small": (150, 150, "a photo of a small blue bird on a branch", False),
    "wide": (900, 250, "a panorama of the mountains under a clear sky", False),
}


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_report_columns_and_the_datacomp_basic_filter(small_model, tmp_path):
    members = []
    for key, (w, h, caption, _) in SAMPLES.items():
        members += [(f"{key}.jpg", _jpeg(w, h)), (f"{key}.txt", caption.encode())]
    members += [("nocaption.jpg", _jpeg(300, 300)), ("noimage.txt", b"a caption without its image")]
    shard = write_tar(tmp_path / "pool" / "00000.tar", members)
    report = tmp_path / "report"
    run_cli("score", shard, "--model", small_model, "--out", report, "--workers", "0", "-q")
    rows = pd.read_parquet(report).set_index("key")
    for key, (w, h, caption, _) in SAMPLES.items():
        row = rows.loc[key]
        assert (row["width"], row["height"]) == (w, h), key
        assert (row["caption_chars"], row["caption_words"]) == (len(caption), len(caption.split())), key
        assert 0 < row["language_prob"] <= 1
    assert rows.loc["french", "language"] == "fr" and rows.loc["keep1", "language"] == "en"
    assert rows.loc["nocaption", "width"] == 300 and pd.isna(rows.loc["nocaption", "caption_chars"])
    assert pd.isna(rows.loc["noimage", "width"]) and rows.loc["noimage", "caption_words"] == 5

    run_cli("filter", shard, "--report", report, "--out", tmp_path / "clean", "--threshold", "-2",
            "--where", BASIC_FILTER)  # fmt: skip
    kept = {raw.key for raw in read_shards(str(p) for p in sorted((tmp_path / "clean").glob("*.tar")))}
    assert kept == {key for key, sample in SAMPLES.items() if sample[3]}
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["rejected_by_reason"] == {"where": 4, "missing_caption": 1, "missing_image": 1}


def test_the_report_memory_benchmark_runs_at_ci_size():
    """pipelines/benchmark_report_memory.py at 20,000 rows: every command runs on the generated
    report and gets a row (the committed run is 1,000,000 rows; its numbers are not asserted on)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "pipelines" / "benchmark_report_memory.py"
    done = subprocess.run([sys.executable, str(bench), "--rows", "20000"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1].split()[0] for r in rows] == ["filter", "filter", "evaluate", "inspect"]
