"""The package API a user imports, the frozen-backbone regime, and the committed sample data."""

from __future__ import annotations

import json

import pandas as pd
import torch
from conftest import SAMPLE_DATA, run_cli
from safetensors.torch import load_file

import ncleaner
from ncleaner.backbone import build_backbone
from ncleaner.config import DisNCLConfig


def test_package_api_runs_the_whole_path(small_shards, tmp_path):
    messages = []
    config = DisNCLConfig(epochs=2, warmup_epochs=1, batch_size=32)
    fitted = ncleaner.fit(str(small_shards), tmp_path / "m", config, progress=False, log=messages.append)
    assert fitted.pairs_read == fitted.pairs_used == 96 and len(fitted.history) == 2
    assert any(m.startswith("epoch 2/2") for m in messages)
    scored = ncleaner.score(str(small_shards), tmp_path / "m", tmp_path / "r", progress=False)
    assert scored.rows == 96 and scored.model_id == fitted.model_id
    report = ncleaner.read_report(tmp_path / "r")
    assert len(report) == 96
    result = ncleaner.filter_shards(str(small_shards), tmp_path / "r", tmp_path / "c", keep_fraction=0.25)
    assert result.kept_count == 24 and result.kept_count + result.rejected_count == 96


def test_frozen_pretrained_backbone_caches_features_and_trains_only_the_heads(small_shards, tmp_path):
    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny-pretrained.pt"
    torch.save(build_backbone("ncleaner-tiny", None).model.state_dict(), checkpoint)
    result = run_cli(
        "fit",
        small_shards,
        "--out",
        tmp_path / "m",
        "--pretrained",
        checkpoint,
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--quiet",
    )
    assert "trained on 96 pairs" in result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pretrained"] == str(checkpoint) and config["train_backbone"] == "auto"
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any(k.startswith("backbone.") for k in weights)  # the checkpoint is the backbone
    run_cli("score", small_shards, "--model", tmp_path / "m", "--out", tmp_path / "r", "--quiet")
    report = pd.read_parquet(tmp_path / "r")
    # A frozen backbone gives exactly the features of the checkpoint, so clip_sim is the checkpoint's own.
    backbone = build_backbone("ncleaner-tiny", str(checkpoint))
    assert report["clip_sim"].between(-1, 1).all() and backbone.embed_dim == 128


def test_every_command_documents_its_options():
    for command, options in {
        "fit": [
            "--out",
            "--backbone",
            "--pretrained",
            "--epochs",
            "--batch-size",
            "--device",
            "--seed",
            "--train-backbone",
            "--force",
        ],
        "score": ["--model", "--out", "--batch-size", "--device", "--overwrite", "--keep-json-fields"],
        "filter": [
            "--report",
            "--out",
            "--threshold",
            "--keep-fraction",
            "--auto",
            "--column",
            "--rejected-out",
            "--maxcount",
        ],
    }.items():
        text = run_cli(command, "--help").output
        for option in options:
            assert option in text, (command, option)


def test_sample_data_is_what_the_generator_script_makes(tmp_path):
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "pipelines/make_sample_data.py", "--out", str(tmp_path / "sd")],
        check=True,
        cwd=SAMPLE_DATA.parent,
        capture_output=True,
    )
    committed = sorted(SAMPLE_DATA.glob("*.tar"))
    assert [p.name for p in committed] == [p.name for p in sorted((tmp_path / "sd").glob("*.tar"))]
    for p in committed:
        assert p.read_bytes() == (tmp_path / "sd" / p.name).read_bytes()
