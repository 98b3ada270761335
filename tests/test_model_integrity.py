"""A model directory that lies must not produce scores.

Each test damages a copy of the fitted ``small_model`` the way an edit, a bad
copy or a newer/older tool could, and checks that ``score`` (or
``NcleanerModel.load``) refuses it on one line naming the file, before any
NaN reaches a report and before any download.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from ncleaner.backbone import download_reason
from ncleaner.errors import NcleanerError
from ncleaner.model import NcleanerModel


@pytest.fixture
def model_copy(small_model, tmp_path) -> Path:
    """A copy of the fitted model that a test may damage."""
    return Path(shutil.copytree(small_model, tmp_path / "model"))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def set_config(model: Path, **fields) -> None:
    edit_json(model / "config.json", lambda c: c.update(fields))


def flip_tensor_bytes(path: Path, keep=lambda name, info: True) -> None:
    """Overwrite the data of the chosen float32 tensors with 0xFF bytes (NaN), leaving the header intact."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    flipped = 0
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == "F32" and keep(name, info):
            start, end = (8 + header_len + o for o in info["data_offsets"])
            raw[start:end] = b"\xff" * (end - start)
            flipped += 1
    assert flipped
    path.write_bytes(bytes(raw))


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def refused(small_shards, model: Path, tmp_path: Path, *extra: str) -> str:
    """Run ``score`` on the model; assert it fails on one line without a traceback and wrote no report."""
    out = tmp_path / "report"
    result = run_cli("score", small_shards, "--model", model, "--out", out, "--quiet", *extra, ok=False)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list(out.glob("*.parquet"))
    return result.output


def load_error(model: Path, **kwargs) -> str:
    with pytest.raises(NcleanerError) as info:
        NcleanerModel.load(model, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def no_open_clip_build(monkeypatch):
    """Fail if open_clip is asked to build a model or tokenizer (where its downloads start)."""

    def called(*args, **kwargs):
        raise AssertionError("open_clip reached: a download could have started")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", called)
    monkeypatch.setattr(open_clip, "get_tokenizer", called)


# -- 1. non-finite weights or outputs --------------------------------------------------------------


def test_nan_weights_are_refused_on_load(small_shards, model_copy, tmp_path):
    flip_tensor_bytes(model_copy / "model.safetensors")
    out = refused(small_shards, model_copy, tmp_path)
    assert str(model_copy) in out and "non-finite" in out and "heads." in out


def test_nan_bank_is_refused_on_load(model_copy):
    flip_tensor_bytes(model_copy / "model.safetensors", keep=lambda name, info: name == "bank.t")
    assert "non-finite values in bank.t" in load_error(model_copy)


def test_nan_backbone_weights_are_refused_when_scoring(small_shards, model_copy, tmp_path):
    flip_tensor_bytes(model_copy / "model.safetensors", keep=lambda name, info: name.startswith("backbone."))
    out = refused(small_shards, model_copy, tmp_path)
    assert str(model_copy) in out and "non-finite image features" in out


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the NaN input row
def test_non_finite_score_column_names_the_model_and_column(small_model):
    model = NcleanerModel.load(small_model)
    model.config.tau = 0.0  # as a config.json that skipped validation would set it
    f = torch.randn(4, model.config.embed_dim)
    with pytest.raises(NcleanerError, match="soft_agreement is not finite for 4 of 4 pairs") as info:
        model.score_features(f, torch.randn_like(f))
    assert str(small_model) in str(info.value)
    # Non-finite input is the caller's, not the model's: those rows pass through as NaN.
    model.config.tau = 0.05
    f[0] = float("nan")
    scores = model.score_features(f, torch.randn_like(f))
    assert np.isnan(scores["clip_sim"][0]) and np.isfinite(scores["clip_sim"][1:]).all()


def test_tau_zero_is_refused(small_shards, model_copy, tmp_path):
    set_config(model_copy, tau=0)
    out = refused(small_shards, model_copy, tmp_path)
    assert f"{model_copy / 'config.json'}: tau and target_tau must be > 0" in out


# -- 2. weights that do not match the config --------------------------------------------------------


@pytest.mark.parametrize(
    "value, problem",
    [("none", "a frozen backbone needs pretrained weights"), ("bogus", "train_backbone must be one of")],
)
def test_edited_train_backbone_is_refused(small_shards, model_copy, tmp_path, value, problem):
    set_config(model_copy, train_backbone=value)
    assert f"{model_copy / 'config.json'}: {problem}" in refused(small_shards, model_copy, tmp_path)


def test_backbone_weights_with_frozen_config_are_refused(model_copy, tmp_path, no_open_clip_build):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")  # exists, so pretrained is a local file; never read
    set_config(model_copy, pretrained=str(checkpoint))  # train_backbone auto + pretrained = frozen
    message = load_error(model_copy)
    assert "holds trained backbone weights but config.json says the backbone is frozen" in message


def test_trained_config_without_backbone_weights_is_refused(model_copy, no_open_clip_build):
    edit_tensors(
        model_copy / "model.safetensors",
        lambda t: [t.pop(k) for k in list(t) if k.startswith("backbone.")],
    )
    message = load_error(model_copy)
    assert "config.json says the backbone was trained" in message and "holds no backbone weights" in message


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda t: t.pop("heads.decode_text.0.bias"), "1 missing (e.g. decode_text.0.bias)"),
        (lambda t: t.update({"heads.extra.weight": torch.zeros(2)}), "1 unexpected (e.g. extra.weight)"),
        (
            lambda t: t.update({"heads.decode_text.0.bias": torch.zeros(3)}),
            "1 of the wrong shape (e.g. decode_text.0.bias: [3], not [256])",
        ),
    ],
)
def test_head_tensors_must_fit_the_config(model_copy, edit, problem, no_open_clip_build):
    edit_tensors(model_copy / "model.safetensors", edit)
    message = load_error(model_copy)
    assert "does not fit the heads that config.json describes" in message and problem in message


def test_backbone_tensors_must_fit_the_backbone(model_copy):
    edit_tensors(model_copy / "model.safetensors", lambda t: t.pop("backbone.logit_scale"))
    assert "does not fit backbone ncleaner-tiny: tensors 1 missing (e.g. logit_scale)" in load_error(model_copy)


def test_missing_bank_is_refused(model_copy, no_open_clip_build):
    edit_tensors(model_copy / "model.safetensors", lambda t: t.pop("bank.v"))
    assert "has no reference bank (missing bank.v)" in load_error(model_copy)


# -- 3. sizes and types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"embed_dim": 64}, "{model}: model.safetensors holds heads for embed_dim 128 but config.json says 64"),
        ({"mei_dim": 32}, "{model}: model.safetensors holds heads for mei_dim 64 but config.json says 32"),
        ({"hidden_dim": 8}, "{model}: model.safetensors holds heads for hidden_dim 256 but config.json says 8"),
        ({"backbone": "RN50"}, "{model}: backbone RN50 has embed_dim 1024 but config.json says 128"),
        ({"tau": "abc"}, "{model}/config.json: field tau must be a number, got 'abc'"),
        ({"backbone": "no-such-net"}, "{model}/config.json: no-such-net: not an open_clip model name"),
    ],
)
def test_size_and_type_mismatches_are_one_line(small_shards, model_copy, tmp_path, fields, problem):
    set_config(model_copy, **fields)
    assert problem.format(model=model_copy) in refused(small_shards, model_copy, tmp_path)


@pytest.mark.parametrize(
    "field, value, described",
    [
        ("epochs", 2.5, "an integer"),
        ("epochs", True, "an integer"),
        ("tau", True, "a number"),
        ("soft_targets", 1, "true or false"),
        ("backbone", None, "a string"),
        ("pretrained", 3, "a string or null"),
    ],
)
def test_config_fields_must_have_their_declared_type(model_copy, field, value, described, no_open_clip_build):
    set_config(model_copy, **{field: value})
    expected = f"{model_copy / 'config.json'}: field {field} must be {described}, got {value!r}"
    assert load_error(model_copy) == expected


def test_int_for_a_float_field_and_unknown_fields_are_accepted(model_copy):
    set_config(model_copy, tau=1, some_future_field={"x": 1})
    model = NcleanerModel.load(model_copy)
    assert model.config.tau == 1.0 and isinstance(model.config.tau, float)
    assert model.model_dir == model_copy


# -- 4. damaged JSON files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file, content, problem",
    [
        ("config.json", "[1, 2]", "config.json: must be a JSON object"),
        ("config.json", "{not json", "config.json: cannot read JSON: Expecting property name"),
        ("calibration.json", '{"term": "clip_sim", "weight": 0}', "missing field 'mixture'"),
        (
            "calibration.json",
            '{"mii_quantiles": [0.1], "soft_quantiles": [0.2]}',
            "written by ncleaner 0.1 (before the anchored score); fit the model again",
        ),
        ("calibration.json", "[]", "calibration.json: must be a JSON object"),
    ],
)
def test_damaged_json_names_the_file_and_field(small_shards, model_copy, tmp_path, file, content, problem):
    (model_copy / file).write_text(content)
    out = refused(small_shards, model_copy, tmp_path)
    assert f"{model_copy}/" in out and problem in out


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda c: c["mixture"].pop("variances"), "missing field 'mixture.variances'"),
        (lambda c: c["mixture"].update(means=[0.1]), "field 'mixture.means' must be 2 finite numbers"),
        (lambda c: c["mixture"].update(clean=2), "field 'mixture.clean' must be 0 or 1, got 2"),
        (lambda c: c["quantiles"].update(mii_sim=[]), "field 'quantiles.mii_sim' must be a list of finite numbers"),
        (lambda c: c["quantiles"].pop("negclip"), "missing field 'quantiles.negclip'"),
        (
            lambda c: c.update(term="bogus"),
            "field 'term' must be one of clip_sim, mii_sim, soft_agreement, negclip, got 'bogus'",
        ),
        (lambda c: c.update(weight=1.5), "field 'weight' must be in [0, 1], got 1.5"),
        (lambda c: c.update(weight="x"), "field 'weight' must be 1 finite numbers"),
        (lambda c: c.update(negclip_tau=0), "field 'negclip_tau' must be > 0, got 0.0"),
    ],
)
def test_calibration_fields_are_checked(model_copy, edit, problem, no_open_clip_build):
    edit_json(model_copy / "calibration.json", edit)
    assert load_error(model_copy) == f"{model_copy / 'calibration.json'}: {problem}"


def test_unreadable_safetensors_names_the_file(model_copy, no_open_clip_build):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 4)
    assert load_error(model_copy).startswith(f"{model_copy / 'model.safetensors'}: cannot read tensors: ")


# -- 5. no downloads unless allowed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"backbone": "hf-hub:org/some-clip"}, "backbone hf-hub:org/some-clip is fetched from the Hugging Face hub"),
        (
            {"backbone": "RN50", "pretrained": "openai", "train_backbone": "none"},
            "pretrained openai is an open_clip tag",
        ),
        (
            {"backbone": "xlm-roberta-base-ViT-B-32"},
            "backbone xlm-roberta-base-ViT-B-32 fetches xlm-roberta-base from the Hugging Face hub",
        ),
    ],
)
def test_downloads_are_refused_unless_allowed(small_shards, model_copy, tmp_path, fields, reason, no_open_clip_build):
    set_config(model_copy, **fields)
    out = refused(small_shards, model_copy, tmp_path)
    assert f"{model_copy / 'config.json'}: {reason}" in out and "pass --allow-download" in out
    # evaluate --retrieval loads the model the same way.
    result = run_cli("evaluate", "--retrieval", small_shards, "--model", model_copy, ok=False)
    assert result.exit_code != 0 and "pass --allow-download" in result.output


def test_allow_download_reaches_open_clip(small_shards, model_copy, tmp_path, no_open_clip_build):
    set_config(model_copy, backbone="hf-hub:org/some-clip")
    out = refused(small_shards, model_copy, tmp_path, "--allow-download")
    assert "open_clip reached" in out
    result = run_cli("evaluate", "--retrieval", small_shards, "--model", model_copy, "--allow-download", ok=False)
    assert result.exit_code != 0 and "open_clip reached" in result.output


@pytest.mark.parametrize(
    "name, pretrained, fetches",
    [
        ("ncleaner-tiny", None, False),
        ("RN50", None, False),
        ("RN50", "openai", True),
        ("RN50", "OpenAI", True),  # open_clip normalises tags
        ("RN50", __file__, False),  # a local checkpoint file
        ("hf-hub:org/some-clip", None, True),
        ("roberta-ViT-B-32", None, True),  # HF text tower: config fetched even without weights
        ("ViT-B-16-SigLIP", None, True),  # HF tokenizer
        ("local-dir:/no/such/dir", None, False),  # building it fails locally
    ],
)
def test_download_rule(name, pretrained, fetches, no_open_clip_build):
    assert (download_reason(name, pretrained) is not None) == fetches


def test_a_trained_backbone_does_not_fetch_its_pretrained_tag(model_copy, monkeypatch):
    """With train_backbone all, the weights are in model.safetensors: the tag is not loaded, so not refused."""
    set_config(model_copy, pretrained="openai", train_backbone="all")
    built = []
    create = open_clip.create_model_and_transforms
    monkeypatch.setattr(
        open_clip,
        "create_model_and_transforms",
        lambda name, pretrained=None, **kw: built.append(pretrained) or create(name, pretrained=pretrained, **kw),
    )
    NcleanerModel.load(model_copy)
    assert built == [None]


def test_a_frozen_backbone_from_a_local_checkpoint_scores_offline(small_shards, tmp_path, monkeypatch):
    """A pretrained *file* is local: fit a frozen model on one and score with it, with open_clip unable to fetch."""

    def fetch(*args, **kwargs):
        raise AssertionError("open_clip tried to download")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", fetch)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", fetch)
    checkpoint = tmp_path / "tiny.pt"
    model, _, _ = open_clip.create_model_and_transforms("ncleaner-tiny")
    torch.save(model.state_dict(), checkpoint)
    model_dir = tmp_path / "frozen"
    run_cli("fit", small_shards, "--out", model_dir, "--pretrained", checkpoint, "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "32", "--quiet")  # fmt: skip
    assert not NcleanerModel.load(model_dir).trains_backbone
    run_cli("score", small_shards, "--model", model_dir, "--out", tmp_path / "report", "--quiet")
