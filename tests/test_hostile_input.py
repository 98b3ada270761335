"""Hostile and broken input: nothing executed, nothing of the user's deleted, nothing dropped silently."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import jpeg_bytes, run_cli
from PIL import Image

from ncleaner.errors import UnreadableShard
from ncleaner.shards import expand_shards, read_shard


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def good_sample(key: str, caption: str, color=(200, 30, 30)) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg_bytes(color)), (f"{key}.txt", caption.encode())]


@pytest.fixture
def data_dir(small_shards, tmp_path) -> Path:
    """A copy of the small shards under img2dataset's own names, in a directory of its own."""
    d = tmp_path / "data"
    shutil.copytree(small_shards, d)
    return d


@pytest.fixture
def scored(data_dir, small_model, tmp_path) -> Path:
    report = tmp_path / "report"
    run_cli("score", data_dir, "--model", small_model, "--out", report, "--quiet")
    return report


# -- outputs never touch inputs ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["out", "rejected", "inside", "parent"])
def test_filter_refuses_output_near_the_input_shards_and_keeps_them_byte_for_byte(where, data_dir, scored, tmp_path):
    before = snapshot(data_dir)
    target = {"out": data_dir, "rejected": data_dir, "inside": data_dir / "clean", "parent": tmp_path}[where]
    out, rejected = (tmp_path / "clean", target) if where == "rejected" else (target, tmp_path / "rej")
    args = ["filter", data_dir, "--report", scored, "--out", out, "--rejected-out", rejected, "--auto", "--force"]
    result = run_cli(*args, ok=False)
    assert result.exit_code == 1 and "directory of input shards" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(data_dir) == before


def test_inject_noise_refuses_to_write_over_its_input(data_dir):
    before = snapshot(data_dir)
    result = run_cli("inject-noise", data_dir, "--out", data_dir, "--rate", "0.5", "--force", ok=False)
    assert result.exit_code == 1 and "directory of input shards" in result.output
    assert snapshot(data_dir) == before


def test_force_never_deletes_a_file_it_cannot_prove_it_wrote(data_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "my_precious_dataset.tar").write_bytes(b"precious")
    (other / "00000.tar").write_bytes(b"named like ours, but not in a manifest of ours")
    for command in (["inject-noise", data_dir, "--rate", "0.5"],):
        result = run_cli(*command, "--out", other, "--force", ok=False)
        assert result.exit_code == 1 and "refusing to replace" in result.output
    assert (other / "my_precious_dataset.tar").read_bytes() == b"precious"
    assert (other / "00000.tar").read_bytes().startswith(b"named like ours")


def test_force_replaces_exactly_what_the_previous_run_recorded(data_dir, scored, tmp_path):
    out = tmp_path / "clean"
    run_cli("filter", data_dir, "--report", scored, "--out", out, "--keep-fraction", "0.5", "--maxcount", "10")
    first = snapshot(out)
    assert len([n for n in first if n.endswith(".tar")]) == 5
    refused = run_cli("filter", data_dir, "--report", scored, "--out", out, "--auto", ok=False)
    assert "use --force" in refused.output and snapshot(out) == first
    run_cli("filter", data_dir, "--report", scored, "--out", out, "--keep-fraction", "0.25", "--maxcount", "10",
            "--force")  # fmt: skip
    second = snapshot(out)
    assert sorted(n for n in second if n.endswith(".tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert json.loads(second["manifest.json"])["kept_count"] == 24
    # A file the user adds is never deleted, and the directory is then refused whole.
    (out / "notes.txt").write_text("mine")
    refused = run_cli("filter", data_dir, "--report", scored, "--out", out, "--auto", "--force", ok=False)
    assert "notes.txt" in refused.output and (out / "notes.txt").read_text() == "mine"
    assert snapshot(out) == {**second, "notes.txt": b"mine"}


# -- nothing is executed -------------------------------------------------------------------------


def test_a_shard_named_like_a_pipe_command_is_read_as_a_file(small_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = "pipe:touch PWNED; cat 00000.tar; echo x.tar"
    shutil.copy(small_shards / "00000.tar", tmp_path / evil)
    shutil.copy(small_shards / "00000.tar", tmp_path / "00000.tar")
    for spec in ([evil], ["*.tar"], ["."]):  # the shell's glob, ncleaner's glob, a directory listing
        urls = expand_shards(spec)
        assert "./" + evil in urls or os.path.join(".", evil) in urls
        for url in urls:
            assert len(list(read_shard(url))) == 32
    assert not (tmp_path / "PWNED").exists()


def test_score_on_a_directory_holding_a_pipe_named_file_runs_nothing(small_shards, small_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "downloaded"
    d.mkdir()
    shutil.copy(small_shards / "00000.tar", d / "pipe:touch PWNED; echo x.tar")
    run_cli("score", d, "--model", small_model, "--out", tmp_path / "r", "--quiet")
    assert not (tmp_path / "PWNED").exists() and not (d / "PWNED").exists()
    assert len(pd.read_parquet(tmp_path / "r")) == 32


# -- every sample gets a status, none is dropped ---------------------------------------------------


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def tar_with(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tf.addfile(info, io.BytesIO(e[1]))
    return path


def link(name: str, target: str, kind=tarfile.LNKTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture
def hostile_shard(tmp_path) -> Path:
    """One shard with every kind of hostile or odd member, between good samples."""
    image = jpeg_bytes()
    return tar_with(
        tmp_path / "hostile" / "00000.tar",
        [
            *good_sample("g0", "a red square"),
            ("../../escape.jpg", image),
            ("../../escape.txt", b"climbs out of the directory"),
            ("/abs/path.jpg", image),
            ("/abs/path.txt", b"an absolute path"),
            ("bomb.png", bomb_png()),
            ("bomb.txt", b"a decompression bomb"),
            ("hard.jpg", image),
            ("hard.txt", b"the first copy"),
            link("hard2.jpg", "hard.jpg"),
            ("hard2.txt", b"a hard link to the first copy's image"),
            link("sym.jpg", "g0.jpg", tarfile.SYMTYPE),
            ("sym.txt", b"a symlinked image"),
            ("img.001.jpg", image),
            ("img.002.jpg", image),
            ("img.001.txt", b"dotted keys"),
            ("latin.jpg", image),
            ("latin.txt", "caf\xe9 au lait".encode("latin-1")),
            ("deep.jpg", image),
            ("deep.json", b"[" * 100_000 + b"]" * 100_000),
            ("dup.jpg", image),
            ("dup.txt", b"first"),
            ("dup.txt", b"second"),
            ("odd.jpg", image),
            ("odd.txt", b"members without extension or with an underscore"),
            ("odd._private", b"private"),
            ("README", b"no extension at all"),
            *good_sample("g1", "a blue square", (30, 30, 200)),
        ],
    )


HOSTILE_STATUSES = {
    "g0": "ok",
    "../../escape": "unsafe_name",
    "/abs/path": "unsafe_name",
    "bomb": "too_large",
    "hard": "ok",
    "hard2": "ok",
    "sym": "symlink_member",
    "img": "ambiguous_members",
    "latin": "bad_caption",
    "deep": "bad_json",
    "dup": "duplicate_member",
    "odd": "ok",
    "README": "missing_image",
    "g1": "ok",
}


def test_every_hostile_member_gets_a_status_and_the_filter_keeps_every_byte(hostile_shard, small_model, tmp_path):
    report_dir, clean, rejected = tmp_path / "r", tmp_path / "clean", tmp_path / "rej"
    result = run_cli("score", hostile_shard, "--model", small_model, "--out", report_dir, "--quiet")
    assert "Traceback" not in result.output
    report = pd.read_parquet(report_dir)
    assert dict(zip(report["key"], report["status"], strict=True)) == HOSTILE_STATUSES
    run_cli("filter", hostile_shard, "--report", report_dir, "--out", clean, "--rejected-out", rejected,
            "--threshold", "-1")  # fmt: skip
    kept = read_all(clean)
    assert set(kept) == {k for k, s in HOSTILE_STATUSES.items() if s == "ok"}
    # Nothing unsafe is written among the kept samples, and every member is there byte for byte.
    assert kept["hard2"] == {"hard2.jpg": jpeg_bytes(), "hard2.txt": b"a hard link to the first copy's image"}
    assert kept["odd"]["odd._private"] == b"private"
    rejected_members = read_all(rejected)
    assert rejected_members["README"] == {"README": b"no extension at all"}
    assert rejected_members["dup"] == {"dup.jpg": jpeg_bytes(), "dup.txt": b"second"}  # both written, last shown
    assert raw_names(rejected).count("dup.txt") == 2
    assert ("sym.jpg", "g0.jpg") in raw_links(rejected)
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["input_count"] == len(HOSTILE_STATUSES) == manifest["kept_count"] + manifest["rejected_count"]
    assert manifest["rejected_by_reason"]["unsafe_name"] == 2
    # Every one of the input's 30 tar entries is written, to one side or the other.
    with tarfile.open(hostile_shard) as tf:
        assert sorted(raw_names(clean) + raw_names(rejected)) == sorted(tf.getnames()) and len(tf.getnames()) == 30


def read_all(directory: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member name: bytes} of every regular member, read with plain tarfile (not ncleaner's reader)."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    base = m.name.rsplit("/", 1)[-1]
                    key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    out.setdefault(key, {})[m.name] = tf.extractfile(m).read()
    return out


def raw_names(directory: Path) -> list[str]:
    names = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tf:
            names += tf.getnames()
    return names


def raw_links(directory: Path) -> list[tuple[str, str]]:
    links = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tf:
            links += [(m.name, m.linkname) for m in tf.getmembers() if m.issym()]
    return links


# -- truncated shards -----------------------------------------------------------------------------


def cut_points(shard: Path) -> dict[str, int]:
    """Byte offsets that cut a tar at a header boundary, inside a header and inside a member's data."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    txt = next(m for m in members[4:] if m.name.endswith(".txt"))
    return {
        "header boundary": members[5].offset,
        "inside a header": members[5].offset + 100,
        "inside a txt header": txt.offset + 200,
        "inside member data": members[5].offset_data + members[5].size // 2,
        "no end-of-archive block": members[-1].offset_data + -(-members[-1].size // 512) * 512,
    }


CUTS = ["header boundary", "inside a header", "inside a txt header", "inside member data", "no end-of-archive block"]


@pytest.mark.parametrize("where", CUTS)
def test_a_truncated_shard_is_reported_and_none_of_its_samples_kept(where, small_shards, small_model, tmp_path):
    source = small_shards / "00000.tar"
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(source.read_bytes()[: cut_points(source)[where]])
    report_dir = tmp_path / "r"
    result = run_cli("score", cut.parent, small_shards / "00001.tar", "--model", small_model, "--out", report_dir,
                     "--quiet")  # fmt: skip
    assert "truncated shard(s) flagged" in result.output and str(cut) in result.output
    report = pd.read_parquet(report_dir)
    flagged = report[report["shard"] == str(cut)]
    assert len(flagged) >= 1 and (flagged["status"] == "truncated_shard").all()
    assert flagged[["score", "clean_prob"]].isna().all().all()
    assert (report.loc[report["shard"] != str(cut), "status"] == "ok").all()
    run_cli("filter", cut.parent, small_shards / "00001.tar", "--report", report_dir, "--out", tmp_path / "clean",
            "--threshold", "-1", "--rejected-out", tmp_path / "rej")  # fmt: skip
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["truncated_shards"] == [str(cut)]
    assert manifest["rejected_by_reason"] == {"truncated_shard": len(flagged)}
    assert not set(read_all(tmp_path / "clean")) & set(flagged["key"])


def test_fit_leaves_out_a_truncated_shard(small_shards, tmp_path):
    cut = tmp_path / "cut.tar"
    source = small_shards / "00000.tar"
    cut.write_bytes(source.read_bytes()[: cut_points(source)["no end-of-archive block"]])
    result = run_cli("fit", cut, small_shards / "00001.tar", "--out", tmp_path / "m", "--epochs", "1",
                     "--warmup-epochs", "0", "--batch-size", "16", "--quiet")  # fmt: skip
    assert "trained on 32 pairs" in result.output and "pairs of truncated shards left out" in result.output


# -- one bad shard among good ones -----------------------------------------------------------------


@pytest.fixture
def pool_with_a_bad_shard(small_shards, tmp_path) -> Path:
    pool = tmp_path / "pool"
    shutil.copytree(small_shards, pool)
    (pool / "00001.tar").write_bytes(b"this is not a tar file at all" * 40)
    return pool


def test_one_unreadable_shard_stops_every_command_with_one_line(pool_with_a_bad_shard, small_model, tmp_path):
    bad = pool_with_a_bad_shard / "00001.tar"
    for args in (
        ["fit", pool_with_a_bad_shard, "--out", tmp_path / "m", "--epochs", "1", "--quiet"],
        ["score", pool_with_a_bad_shard, "--model", small_model, "--out", tmp_path / "r", "--quiet"],
    ):
        result = run_cli(*args, ok=False)
        assert result.exit_code == 1 and str(bad) in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "m").exists()


def test_skip_records_the_bad_shard_and_goes_on(pool_with_a_bad_shard, small_model, tmp_path):
    bad = str(pool_with_a_bad_shard / "00001.tar")
    fit = run_cli("fit", pool_with_a_bad_shard, "--out", tmp_path / "m", "--epochs", "1", "--warmup-epochs", "0",
                  "--batch-size", "16", "--on-bad-shard", "skip", "--quiet")  # fmt: skip
    assert "trained on 64 pairs" in fit.output and "1 unreadable shard(s) skipped" in fit.output
    report = tmp_path / "r"
    score = run_cli("score", pool_with_a_bad_shard, "--model", small_model, "--out", report, "--on-bad-shard",
                    "skip", "--quiet")  # fmt: skip
    assert "64 rows" in score.output and "1 unreadable shard(s) skipped" in score.output
    assert bad in json.loads((report / "_00001.failed.json").read_text())["shard"]
    # filter stops at the shard without a report unless told to skip it too.
    refused = run_cli("filter", pool_with_a_bad_shard, "--report", report, "--out", tmp_path / "c", "--auto", ok=False)
    assert "score could not read it" in refused.output
    run_cli("filter", pool_with_a_bad_shard, "--report", report, "--out", tmp_path / "c", "--auto",
            "--on-bad-shard", "skip")  # fmt: skip
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert list(manifest["unreadable_shards"]) == [bad] and manifest["input_count"] == 64


def test_reader_raises_unreadable_shard_for_a_file_that_is_not_a_tar(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x89PNG not a tar" * 100)
    with pytest.raises(UnreadableShard, match="junk.tar"):
        list(read_shard(str(junk)))


# -- fit --force is safe ---------------------------------------------------------------------------


def test_fit_force_keeps_the_old_model_until_the_new_one_is_complete(small_shards, small_model, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(small_model, model)
    before = snapshot(model)
    (model / ".model.safetensors.1234-abcd.partial").write_bytes(b"left by an interrupted save")

    import ncleaner.fitting

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ncleaner.fitting, "_finalise", crash)
    result = run_cli("fit", small_shards, "--out", model, "--epochs", "1", "--force", "--quiet", ok=False)
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert {k: v for k, v in snapshot(model).items() if not k.endswith(".partial")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # no staging left behind
    monkeypatch.undo()
    run_cli("fit", small_shards, "--out", model, "--epochs", "1", "--warmup-epochs", "0", "--force", "--quiet")
    assert set(snapshot(model)) - {"selfcheck.json"} == {"calibration.json", "config.json", "model.safetensors"}
