"""The frozen-backbone benchmark at CI size: the pretrained stand-in, every table, the downstream step.

The committed run (pipelines/results/frozen_benchmark.md) takes about two hours; this runs the same
code on one seed and pools of 240 pairs, and checks what each stage produced, not how good it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ncleaner.model import TERMS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pipelines"))


def test_pretrained_stand_in_is_deterministic_and_loads_as_pretrained(tmp_path):
    import torch
    from pretrain_backbone import PretrainSettings, checkpoint, pretrain
    from safetensors.torch import load_file

    from ncleaner.backbone import build_backbone

    settings = PretrainSettings(pairs=64, epochs=1, batch_size=32)
    a = pretrain(settings, tmp_path / "a.safetensors")
    b = checkpoint(settings, cache_dir=tmp_path / "cache")
    assert a.read_bytes() == b.read_bytes()  # same settings, same bytes: the cache can be regenerated
    assert checkpoint(settings, cache_dir=tmp_path / "cache") == b  # and is reused
    other = pretrain(PretrainSettings(pairs=64, epochs=1, batch_size=32, seed=1), tmp_path / "c.safetensors")
    assert other.read_bytes() != a.read_bytes()
    # What `--pretrained PATH` loads is these weights, not open_clip's random initialisation.
    loaded = build_backbone("ncleaner-tiny", str(a)).model.state_dict()
    saved = load_file(a)
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.slow
def test_quick_frozen_benchmark_produces_every_table(tmp_path):
    out = tmp_path / "frozen.md"
    env = {**os.environ, "NCLEANER_BENCH_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "pipelines/benchmark_frozen.py",
        "--quick",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    text = out.read_text()
    for title in ("## Detection by noise rate and mode", "## score - clip_sim AUROC", "## Detection per family",
                  "AUROC by noise kind", "score columns and ablations", "## Pool size", "## Downstream"):  # fmt: skip
        assert title in text
    rows = json.loads(out.with_suffix(".json").read_text())
    detection = rows["detection"]
    assert {r["regime"] for r in detection} == {"seen", "unseen"}
    assert {r["mode"] for r in detection} == {"permute", "mix"}
    methods = {r["method"] for r in detection}
    assert {"DisNCL", "clip_sim (frozen backbone)", "NCR-style InfoNCE + loss mixture", "+ edit negatives",
            "+ neighbourhood batches", "weight fixed at 1", "no self-check (score = mii_sim)"} <= methods  # fmt: skip
    # The self-check's estimate and choice are next to the true difference of every DisNCL pool.
    assert "self-check estimate" in text and "worst |estimate - gap|" in text
    ours = [r for r in detection if r["method"] == "DisNCL" and r["column"] == "score"]
    assert ours and all("selfcheck_gain" in r and r["score_term"] in TERMS for r in ours)
    mixed = [r for r in detection if r["mode"] == "mix" and r["column"] == "score"]
    assert all(f"auroc_{k}" in r for r in mixed for k in ("permute", "hard", "partial", "boilerplate"))
    assert all(0.0 <= r["auroc"] <= 1.0 for r in detection)
    down = rows["downstream"]
    assert {r["kept_by"] for r in down} == {
        "no filter (all pairs)", "clip_sim top share", "ncleaner score top share", "oracle (clean pairs)"
    }  # fmt: skip
    oracle = [r for r in down if r["kept_by"].startswith("oracle")]
    assert all(r["kept_noisy"] == 0 and r["kept"] == 144 for r in oracle)  # 240 pairs, 40 % noisy
    assert all(r["kept"] == 144 for r in down if "top share" in r["kept_by"])
    assert all(r["rsum"] >= 0 for r in down)
    # The two analysis scripts run on the pools the benchmark left behind.
    pool = "unseen-scenes-240-s1-mix-0.4"
    probe = subprocess.run(
        [sys.executable, "pipelines/probe_subspaces.py", str(tmp_path / "work"), pool],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert all(name in probe.stdout for name in ("F_T (backbone)", "T_S (MII)", "T_X (MEI)"))
    tune = subprocess.run(
        [sys.executable, "pipelines/tune_frozen.py", str(tmp_path / "work"), pool, '{"lr": 1e-4}',
         "--scratch", str(tmp_path / "tune")],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert tune.stdout.startswith('{"lr": 1e-4}') and "mii_sim - clip_sim per pool" in tune.stdout
