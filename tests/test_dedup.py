"""dedup (issue 21): planted exact, re-encoded, resized and cropped copies found in generated
shards, the representative chosen as documented, filter --dedup rejecting the others, resuming,
semantic links from stored embeddings, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import run_cli

from ncleaner.shards import read_shards
from ncleaner.synthetic import write_shards_with_duplicates


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    """40 distinct pictures and 12 copies (each edit of COPY_EDITS), in three shards."""
    out = tmp_path_factory.mktemp("planted") / "pool"
    truth = write_shards_with_duplicates(out, n_distinct=40, n_copies=12, shard_size=20, seed=5)
    return out, truth


@pytest.fixture(scope="module")
def deduped(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dedup") / "dedup"
    run_cli("dedup", planted[0], "--out", out, "-q")
    return out


def _rows(dedup_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(dedup_dir)


def _source(truth: dict, key: str) -> str:
    return truth[key][0] if key in truth else key


def test_every_planted_copy_is_grouped_with_its_original_and_nothing_else_is(planted, deduped):
    pool, truth = planted
    assert {"exact", "reencode", "resize", "crop"} <= {edit for _, edit in truth.values()}
    rows = _rows(deduped)
    assert len(rows) == 52 and sorted(p.name for p in deduped.glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    assert sorted(p.name for p in deduped.glob("_*.done.json")) == [f"_0000{i}.done.json" for i in range(3)]
    group = dict(zip(rows["key"], rows["dup_group"], strict=True))
    for copy, (original, _) in truth.items():
        assert not np.isnan(group[copy]) and group[copy] == group[original], copy
    marked = rows[rows["duplicate_of"].notna()]
    sha256 = dict(zip(rows["key"], rows["image_sha256"], strict=True))
    # Each group keeps one sample; every other one repeats that sample's picture.
    assert len(marked) == len(truth)
    for key, of, kind, similarity in zip(marked["key"], marked["duplicate_of"], marked["dup_kind"],
                                         marked["dup_similarity"], strict=True):  # fmt: skip
        assert _source(truth, key) == _source(truth, of["key"])
        same_bytes = sha256[key] == sha256[of["key"]]
        assert (kind == "exact") == same_bytes and (similarity == 1.0) >= same_bytes
        assert kind in ("exact", "near") and 0.82 <= similarity <= 1.0
    # Without a report the representative is the first of its group in shard order.
    for _, members in rows[rows["dup_group"].notna()].groupby("dup_group"):
        first = members.sort_values(["shard", "index"]).iloc[0]
        assert first["duplicate_of"] is None
        assert all(of["key"] == first["key"] for of in members["duplicate_of"].iloc[1:] if of is not None)
    summary = json.loads((deduped / "_dedup.json").read_text())
    assert summary["groups"] == rows["dup_group"].nunique() and sum(summary["duplicates"].values()) == len(truth)


def test_filter_dedup_rejects_every_duplicate_and_counts_them(planted, deduped, small_model, tmp_path):
    pool, truth = planted
    report = tmp_path / "report"
    run_cli("score", pool, "--model", small_model, "--out", report, "--workers", "0", "-q")
    dry = run_cli("filter", pool, "--report", report, "--out", tmp_path / "never", "--threshold", "-2",
                  "--dedup", deduped, "--dry-run")  # fmt: skip
    assert f"would reject {len(truth)} ({len(truth)} duplicate)" in dry.output
    run_cli("filter", pool, "--report", report, "--out", tmp_path / "clean", "--threshold", "-2", "--dedup", deduped)
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["rejected_by_reason"] == {"duplicate": len(truth)} and manifest["dedup"] == str(deduped)
    kept = {raw.key for raw in read_shards(str(p) for p in sorted((tmp_path / "clean").glob("*.tar")))}
    rows = _rows(deduped)
    assert kept == set(rows.loc[rows["duplicate_of"].isna(), "key"])
    # --keep-keys still keeps a duplicate it names.
    named = rows.loc[rows["duplicate_of"].notna(), "key"].iloc[0]
    (tmp_path / "keep.txt").write_text(named + "\n")
    run_cli("filter", pool, "--report", report, "--out", tmp_path / "kept", "--threshold", "-2", "--dedup", deduped,
            "--keep-keys", tmp_path / "keep.txt")  # fmt: skip
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert manifest["kept_by_override"] == 1 and manifest["rejected_by_reason"] == {"duplicate": len(truth) - 1}

    # With the report, each group keeps its best score.
    by_score = tmp_path / "by_score"
    run_cli("dedup", pool, "--out", by_score, "--report", report, "-q")
    rows = _rows(by_score).merge(pd.read_parquet(report)[["key", "score"]], on="key")
    for _, members in rows[rows["dup_group"].notna()].groupby("dup_group"):
        best = members.loc[members["duplicate_of"].isna()]
        assert len(best) == 1 and best["score"].iloc[0] == members["score"].max()

    # inspect --dedup: the same counts as filter --dedup, and the groups side by side.
    page = tmp_path / "page.html"
    shown = run_cli("inspect", pool, "--report", report, "--out", page, "--threshold", "-2", "--dedup", deduped,
                    "--per-gallery", "500")  # fmt: skip
    assert f"keeps {52 - len(truth)}, rejects {len(truth)}" in shown.output
    html = page.read_text()
    section = html[html.index('data-gallery="duplicates"') :]
    cards = re.findall(r'data-key="([^"]+)"', section)
    notes = re.findall(r'<div class="dup">([^<]+)</div>', section)
    rows = _rows(deduped)
    grouped = rows[rows["dup_group"].notna()]
    assert sorted(cards) == sorted(grouped["key"]) and len(notes) == len(cards)
    for key, note in zip(cards, notes, strict=True):
        row = grouped.set_index("key").loc[key]
        group = int(row["dup_group"])
        if row["duplicate_of"] is None:
            assert note == f"group {group}: the one kept"
        else:
            assert note.startswith(f"group {group}: {row['dup_kind']} duplicate of {row['duplicate_of']['key']} (")
    # Each group's cards stand together, its representative first.
    order = [int(grouped.set_index("key").loc[k, "dup_group"]) for k in cards]
    assert order == sorted(order)


def test_dedup_resumes_from_its_hashes_and_hashes_a_changed_shard_again(planted, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(planted[0], pool)
    out = tmp_path / "dedup"
    first = run_cli("dedup", pool, "--out", out)
    assert "52 samples from 3 shard(s) (3 hashed now): 12 duplicate(s)" in first.output
    again = run_cli("dedup", pool, "--out", out)
    assert "(0 hashed now)" in again.output and "12 duplicate(s)" in again.output
    # Shard 00002 replaced by a copy of 00000 (another size and mtime): hashed again, and every
    # one of its samples now repeats a sample of 00000.
    shutil.copyfile(pool / "00000.tar", pool / "00002.tar")
    changed = run_cli("dedup", pool, "--out", out)
    assert "(1 hashed now)" in changed.output
    rows = _rows(out)
    third = rows[rows["shard"] == str(pool / "00002.tar")]
    first = rows[rows["shard"] == str(pool / "00000.tar")]
    assert third["duplicate_of"].map(lambda d: d is not None and d["shard"].endswith("00000.tar")).all()
    assert third["dup_group"].tolist() == first["dup_group"].tolist()  # each with its twin


def test_semantic_links_come_from_stored_embeddings(planted, tmp_path):
    pool, truth = planted
    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("ncleaner-tiny", pretrained=None).state_dict(), checkpoint)
    emb = tmp_path / "emb"
    run_cli(
        "embed", pool, "--backbone", "ncleaner-tiny", "--pretrained", checkpoint, "--out", emb, "--workers", "0", "-q"
    )
    out = tmp_path / "dedup"
    run_cli("dedup", pool, "--out", out, "--no-near", "--semantic", "0.995", "--embeddings", emb, "-q")
    rows = _rows(out)
    semantic = rows[rows["dup_kind"] == "semantic"]
    assert len(semantic) > 0 and (semantic["dup_similarity"] >= 0.995).all()
    # Exact copies are linked to their original whatever else is, and only copies repeat bytes.
    group = dict(zip(rows["key"], rows["dup_group"], strict=True))
    exact = {k: o for k, (o, edit) in truth.items() if edit == "exact"}
    assert all(group[k] == group[o] for k, o in exact.items())
    assert set(rows.loc[rows["dup_kind"] == "exact", "key"]) <= set(exact) | set(exact.values())
    summary = json.loads((out / "_dedup.json").read_text())
    assert summary["kinds"] == ["exact", "semantic"] and summary["semantic_threshold"] == 0.995


def test_bad_input_is_one_line(planted, deduped, small_model, small_shards, tmp_path):
    pool, _ = planted
    no_emb = run_cli("dedup", pool, "--out", tmp_path / "d", "--semantic", "0.9", ok=False)
    assert no_emb.output.strip().endswith(
        "--semantic needs --embeddings DIR (ncleaner embed's output for these shards)"
    )
    report = tmp_path / "report"
    run_cli("score", small_shards, "--model", small_model, "--out", report, "--workers", "0", "-q")
    other = run_cli("filter", small_shards, "--report", report, "--out", tmp_path / "c", "--auto", "--dedup",
                    deduped, ok=False)  # fmt: skip
    assert "made from other samples than the report's" in other.output and "Traceback" not in other.output
    assert not (tmp_path / "c").exists()
    junk = tmp_path / "junk" / "junk.tar"
    junk.parent.mkdir()
    junk.write_bytes(b"not a tar" * 50)
    failed = run_cli("dedup", junk, "--out", tmp_path / "j", ok=False)
    assert "junk.tar" in failed.output and "Traceback" not in failed.output
    skipped = run_cli("dedup", pool, junk, "--out", tmp_path / "s", "--on-bad-shard", "skip")
    assert "52 samples from 3 shard(s)" in skipped.output and "1 unreadable shard(s) skipped" in skipped.output


def test_the_dedup_benchmark_runs_at_ci_size():
    """pipelines/benchmark_dedup.py --quick: every row produced, and at this size every planted
    copy found with nothing wrongly marked (the committed run is the full one)."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "pipelines" / "benchmark_dedup.py"
    done = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| scenes", "| hard"))]
    assert len(rows) == 4
    for cells in rows:
        recall, wrong = float(cells[4]), int(cells[-4])
        assert recall >= 0.95 and wrong == 0, cells
