"""The package API a user imports, the frozen-backbone regime, and the committed sample data."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import open_clip
import pandas as pd
import pytest
import torch
from conftest import SAMPLE_DATA, run_cli
from PIL import Image
from safetensors.torch import load_file

import ncleaner
from ncleaner.backbone import build_backbone
from ncleaner.config import DisNCLConfig


def test_package_api_runs_the_whole_path(small_shards, tmp_path, caplog):
    config = DisNCLConfig(epochs=2, warmup_epochs=1, batch_size=32)
    with caplog.at_level(logging.INFO, logger="ncleaner"):
        fitted = ncleaner.fit(str(small_shards), tmp_path / "m", config)
    assert fitted.pairs_read == fitted.pairs_used == 96 and len(fitted.history) == 2
    assert any(r.name == "ncleaner.fitting" and r.getMessage().startswith("epoch 2/2") for r in caplog.records)
    assert config.embed_dim == 0  # the caller's config is not changed; the model's copy has the width
    assert json.loads((tmp_path / "m" / "config.json").read_text())["embed_dim"] == 128
    scored = ncleaner.score(str(small_shards), tmp_path / "m", tmp_path / "r")
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
    assert "trained on 77 pairs, 19 held out for the self-check" in result.output  # frozen: no second training
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pretrained"] == str(checkpoint) and config["train_backbone"] == "auto"
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any(k.startswith("backbone.") for k in weights)  # the checkpoint is the backbone
    run_cli("score", small_shards, "--model", tmp_path / "m", "--out", tmp_path / "r", "--quiet")
    report = pd.read_parquet(tmp_path / "r")
    # A frozen backbone gives exactly the checkpoint's features: clip_sim must equal the cosine that
    # open_clip itself computes from the checkpoint, on pairs read with plain tarfile and PIL.
    model, _, preprocess = open_clip.create_model_and_transforms("ncleaner-tiny", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("ncleaner-tiny")
    model.eval()
    expected = {}
    for shard in sorted(small_shards.glob("*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            key = name[: -len(".jpg")]
            image = preprocess(Image.open(io.BytesIO(members[name])).convert("RGB"))[None]
            with torch.no_grad():
                f_v = model.encode_image(image)
                f_t = model.encode_text(tokenizer([members[key + ".txt"].decode()]))
            expected[key] = torch.nn.functional.cosine_similarity(f_v, f_t).item()
    measured = dict(zip(report["key"], report["clip_sim"], strict=True))
    assert measured.keys() == expected.keys()
    assert max(abs(measured[k] - expected[k]) for k in expected) < 1e-4


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


@pytest.mark.slow
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
