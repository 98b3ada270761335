"""The CLI's conventions and the one configuration dataclass: overrides, validation, logging."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_cli, tar_members, write_tar

import ncleaner
from ncleaner.backbone import _quiet_random_init, build_backbone
from ncleaner.config import DisNCLConfig


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"train_backbone": "some"}, "train_backbone must be one of"),
        ({"train_backbone": "none"}, "a frozen backbone needs pretrained weights"),
        ({"epochs": 0}, "epochs >= 1"),
        ({"epochs": 2, "warmup_epochs": 3}, "warmup_epochs <= epochs"),
        ({"batch_size": 1}, "batch_size must be at least 2"),
        ({"identity_mix": 1.5}, "identity_mix must be in [0, 1]"),
        ({"tau": 0.0}, "tau and target_tau must be > 0"),
    ],
)
def test_validate_refuses_each_impossible_config(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        DisNCLConfig(**fields).validate()
    DisNCLConfig().validate()  # the defaults are valid


def test_with_overrides_reads_field_assignments_with_their_types():
    base = DisNCLConfig()
    config = base.with_overrides(["lambda_reg=0.02", "soft_targets=false", "backbone=ViT-B-32", "pretrained=null"])
    assert (config.lambda_reg, config.soft_targets, config.backbone, config.pretrained) == (
        0.02,
        False,
        "ViT-B-32",
        None,
    )
    assert base == DisNCLConfig()  # a copy, never the caller's object
    assert base.with_overrides({"epochs": 3}).epochs == 3
    for bad, message in [
        (["epochs=1.5"], "field epochs must be an integer"),
        (["tau=abc"], "field tau must be a number"),
        (["nosuchfield=1"], "not a DisNCLConfig field"),
        (["embed_dim=64"], "derived, not set"),
        (["epochs"], "expected FIELD=VALUE"),
    ]:
        with pytest.raises(ValueError, match=message):
            base.with_overrides(bad)


def test_fit_takes_config_file_then_typed_options_then_set(small_shards, tmp_path):
    config_file = tmp_path / "base.json"
    config_file.write_text(json.dumps({"epochs": 1, "lambda_reg": 0.05, "batch_size": 16, "version": "0.0.1"}))
    run_cli("fit", small_shards / "00000.tar", "--out", tmp_path / "m", "--config", config_file, "--epochs", "2",
            "--set", "mei_dim=16", "--set", "warmup_epochs=1", "--quiet")  # fmt: skip
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["epochs"], saved["lambda_reg"], saved["batch_size"], saved["mei_dim"]) == (2, 0.05, 16, 16)
    assert saved["warmup_epochs"] == 1 and saved["embed_dim"] == 128 and saved["version"] == ncleaner.__version__
    refused = run_cli("fit", small_shards, "--out", tmp_path / "n", "--set", "embed_dim=3", ok=False)
    assert refused.exit_code == 2 and "derived, not set" in refused.output and not (tmp_path / "n").exists()


def test_keep_json_fields_may_not_overwrite_a_report_column(small_shards, small_model, tmp_path):
    result = run_cli("score", small_shards, "--model", small_model, "--out", tmp_path / "r",
                     "--keep-json-fields", "url,status", ok=False)  # fmt: skip
    assert result.exit_code == 1 and "status would overwrite a report column" in result.output


def test_filter_refuses_a_shard_that_changed_since_it_was_scored(small_shards, small_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_shards / "00000.tar", data / "00000.tar")
    run_cli("score", data, "--model", small_model, "--out", tmp_path / "r", "--quiet")
    shutil.copy(small_shards / "00001.tar", data / "00000.tar")  # other samples under the same name
    result = run_cli("filter", data, "--report", tmp_path / "r", "--out", tmp_path / "c", "--auto", ok=False)
    assert result.exit_code == 1 and "changed since it was scored" in result.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("member", ["txt", "jpg"])
def test_filter_and_inspect_refuse_samples_whose_caption_or_image_changed_since_scored(
    small_shards, small_model, tmp_path, member
):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_shards / "00000.tar", data / "00000.tar")
    run_cli("score", data, "--model", small_model, "--out", tmp_path / "r", "--quiet")
    # Same keys in the same order, each sample given its neighbour's caption or image.
    members = tar_members(data / "00000.tar")
    keys = sorted({name.split(".")[0] for name in members})
    moved = {f"{k}.{member}": members[f"{nxt}.{member}"] for k, nxt in zip(keys, keys[1:] + keys[:1], strict=True)}
    write_tar(data / "00000.tar", [(name, moved.get(name, data_)) for name, data_ in sorted(members.items())])
    what = {"txt": "caption", "jpg": "image"}[member]
    expected = f"00000.tar: sample 0 ({keys[0]}) does not match its report row (its {what} differs)"
    for command, out in (("filter", tmp_path / "c"), ("inspect", tmp_path / "page.html")):
        result = run_cli(command, data, "--report", tmp_path / "r", "--out", out, "--auto", "-q", ok=False)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert expected in result.output and "changed since it was scored" in result.output
        assert not out.exists()


def test_python_dash_m_ncleaner_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "ncleaner", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "fit" in out.stdout and "filter" in out.stdout


def test_random_init_warning_is_silenced_on_every_logger_open_clip_uses(caplog):
    with caplog.at_level(logging.WARNING):
        build_backbone("ncleaner-tiny", None)  # the installed open_clip's own warning
        with _quiet_random_init():
            # A newer open_clip logs through its module logger; the record reaches the root's
            # handlers without passing the root logger's filters.
            logging.getLogger("open_clip.factory").warning("No pretrained weights loaded for model 'x'.")
        logging.getLogger("open_clip.factory").warning("No pretrained weights loaded for model 'y'.")
    assert [r.getMessage() for r in caplog.records] == ["No pretrained weights loaded for model 'y'."]


def test_quiet_and_verbose(small_shards, tmp_path):
    args = ["fit", small_shards / "00000.tar", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16"]
    normal = run_cli(*args, "--out", tmp_path / "a")
    quiet = run_cli(*args, "--out", tmp_path / "b", "-q")
    assert "epoch 1/1" in normal.output and "epoch 1/1" not in quiet.output
    assert run_cli(*args, "--out", tmp_path / "c", "-v").exit_code == 0


def _ncleaner(*args) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter: logging as a user's shell gets it, not as pytest sets it up."""
    return subprocess.run([sys.executable, "-m", "ncleaner", *map(str, args)], capture_output=True, text=True)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]


@pytest.mark.slow
def test_each_message_of_a_command_that_builds_a_model_is_printed_once(small_shards, small_model, tmp_path):
    # open_clip logs through logging.info(), which gives the root logger a stderr handler of its own.
    fit = _ncleaner("fit", small_shards / "00000.tar", "--out", tmp_path / "m", "--epochs", "1", "--warmup-epochs",
                    "0", "--batch-size", "16")  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    # The backbone trains, so fit trains twice: once without the self-check's slice, once on every pair.
    epoch = [line for line in _lines(fit.stderr) if "epoch 1/1:" in line]
    again = [line for line in _lines(fit.stderr) if "training again on all" in line]
    warnings = [line for line in _lines(fit.stderr) if "self-check: too few" in line]
    assert len(again) == 1 and len(epoch) == 2, fit.stderr
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), fit.stderr
    assert not [line for line in _lines(fit.stderr) if line.startswith(("INFO:", "WARNING:"))], fit.stderr

    cut = tmp_path / "cut.tar"
    cut.write_bytes((small_shards / "00000.tar").read_bytes()[:20000])
    score = _ncleaner("score", cut, "--model", small_model, "--out", tmp_path / "r", "-q")
    assert score.returncode == 0, score.stderr
    lines = _lines(score.stderr)  # -q: the shard's one warning and nothing else
    assert len(lines) == 1 and lines[0].startswith(f"warning: {cut}: ends early") and "truncated_shard" in lines[0]


def test_every_option_of_every_command_has_help_text():
    import click

    from ncleaner.cli import main

    missing = [
        f"{name} {param.opts[0]}"
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert missing == []


def test_every_command_takes_quiet_and_verbose(small_shards, tmp_path):
    from ncleaner.cli import main

    lacking = [
        name for name, command in main.commands.items() if not {"quiet", "verbose"} <= {p.name for p in command.params}
    ]
    assert lacking == []
    d = tmp_path / "pool"
    (d / "sub.tar").mkdir(parents=True)
    shutil.copy(small_shards / "00000.tar", d)
    loud = run_cli("inject-noise", d, "--out", tmp_path / "a", "--rate", "0.5", "-v")
    quiet = run_cli("inject-noise", d, "--out", tmp_path / "b", "--rate", "0.5", "-q")
    assert "warning: " in loud.output and "warning: " in quiet.output  # -q keeps warnings


def test_every_setting_of_disnclconfig_is_a_fit_option(small_shards, tmp_path):
    from ncleaner.cli import fit as fit_command

    settable = [f.name for f in dataclasses.fields(DisNCLConfig) if "help" in f.metadata]
    assert {"epochs", "mei_dim", "soft_targets", "score_weight", "selfcheck_margin"} <= set(settable)
    options = {p.name: p for p in fit_command.params}
    assert all(name in options and options[name].help for name in settable)
    assert not {"embed_dim", "version", "pretrained_sha256"} & set(options)  # derived: never typed
    run_cli("fit", small_shards / "00000.tar", "--out", tmp_path / "m", "--epochs", "1", "--warmup-epochs", "0",
            "--mei-dim", "16", "--no-soft-targets", "--score-term", "clip_sim", "--score-weight", "0",
            "--selfcheck-fraction", "0", "-q")  # fmt: skip
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["mei_dim"], saved["soft_targets"], saved["score_term"], saved["score_weight"]) == (
        16,
        False,
        "clip_sim",
        0.0,
    )
    refused = run_cli("fit", small_shards, "--out", tmp_path / "n", "--mei-dim", "0", ok=False)
    assert refused.exit_code == 2 and "--mei-dim" in refused.output
