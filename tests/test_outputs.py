"""Output locations that cannot be written: one line naming the path, nothing partial left behind."""

from __future__ import annotations

import errno
import tarfile
import time

import pytest
from conftest import run_cli

UNWRITABLE = {
    "under a file": lambda tmp: tmp / "a-file" / "out",
    "read-only system directory": lambda tmp: __import__("pathlib").Path("/sys/ncleaner-test-out"),
}


def commands(where, small_shards, small_model, report):
    return {
        "fit": ["fit", small_shards, "--out", where, "--epochs", "1", "--quiet"],
        "score": ["score", small_shards, "--model", small_model, "--out", where, "--quiet"],
        "filter": ["filter", small_shards, "--report", report, "--out", where, "--auto"],
        "inject-noise": ["inject-noise", small_shards, "--out", where, "--rate", "0.5"],
    }


@pytest.fixture(scope="module")
def report(small_shards, small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "report"
    run_cli("score", small_shards, "--model", small_model, "--out", out, "--quiet")
    return out


@pytest.mark.parametrize("place", list(UNWRITABLE))
@pytest.mark.parametrize("command", ["fit", "score", "filter", "inject-noise"])
def test_unwritable_output_is_one_line_naming_the_path(command, place, small_shards, small_model, report, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    where = UNWRITABLE[place](tmp_path)
    started = time.monotonic()
    result = run_cli(*commands(where, small_shards, small_model, report)[command], ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(where.parent if place == "under a file" else where).split("/")[1] in lines[0]
    assert "cannot write here" in lines[0] or "Not a directory" in lines[0] or "not a directory" in lines[0]
    # Refused before any slow work (model load, training, reading the pool).
    assert time.monotonic() - started < 20


def test_full_disk_while_writing_shards_is_one_line_and_leaves_nothing_partial(
    small_shards, report, tmp_path, monkeypatch
):
    real_addfile = tarfile.TarFile.addfile
    written = []

    def addfile(self, info, fileobj=None):
        written.append(info.name)
        if len(written) > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    out = tmp_path / "clean"
    # Every pair kept (so that enough is written to hit the full disk), without a threshold that might
    # lie below every score and add its own warning line.
    result = run_cli("filter", small_shards, "--report", report, "--out", out, "--keep-fraction", "1", "-q", ok=False)
    assert result.exit_code == 1 and f"{out}/00000.tar: cannot write here: No space left on device" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial shard, no staging directory


def test_a_failing_close_still_removes_the_partial_file(small_shards, report, tmp_path, monkeypatch):
    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "close", close)
    result = run_cli("filter", small_shards, "--report", report, "--out", tmp_path / "clean", "--auto", ok=False)
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert not list(tmp_path.rglob("*.partial")) and list(tmp_path.iterdir()) == []


# -- one model per report, rules that mean something ------------------------------------------------


def test_score_refuses_a_report_directory_holding_another_models_parts(small_shards, small_model, tmp_path):
    other = tmp_path / "other-model"
    run_cli("fit", small_shards, "--out", other, "--epochs", "1", "--warmup-epochs", "0", "--seed", "3", "--quiet")
    report = tmp_path / "report"
    run_cli("score", small_shards / "00000.tar", "--model", small_model, "--out", report, "--quiet")
    # Another shard, another model, same directory: nothing to overwrite, but rankings would mix.
    refused = run_cli("score", small_shards / "00001.tar", "--model", other, "--out", report, "--quiet", ok=False)
    assert refused.exit_code == 1 and "holds shards scored by another model" in refused.output
    assert sorted(p.name for p in report.iterdir()) == ["00000.parquet", "_00000.done.json"]
    # With --overwrite the user says they mean it; filter then refuses the mixed report.
    run_cli("score", small_shards / "00001.tar", "--model", other, "--out", report, "--overwrite", "--quiet")
    shards = [small_shards / "00000.tar", small_shards / "00001.tar"]
    mixed = run_cli("filter", *shards, "--report", report, "--out", tmp_path / "c", "--keep-fraction", "0.5", ok=False)
    assert mixed.exit_code == 1 and "holds scores of 2 models" in mixed.output and not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_threshold_that_cannot_mean_anything_is_a_usage_error(value, small_shards, report, tmp_path):
    result = run_cli(
        "filter", small_shards, "--report", report, "--out", tmp_path / "c", "--threshold", value, ok=False
    )
    assert result.exit_code == 2 and "not a finite number" in result.output and not (tmp_path / "c").exists()


def test_a_threshold_outside_the_observed_range_warns_with_the_range_and_counts(small_shards, report, tmp_path):
    result = run_cli("filter", small_shards, "--report", report, "--out", tmp_path / "c", "--threshold", "2")
    warning = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert "lies outside the score values of this report" in warning and "it keeps 0 of 96 scored pairs" in warning
    assert "kept 0 of 96 pairs" in result.output
