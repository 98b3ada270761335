"""The reader and decode stages: every SHARDS form, and bad samples turned into statuses."""

from __future__ import annotations

import gzip
import re
import shutil

import pytest
from conftest import MESSY_STATUSES, jpeg_bytes, run_cli, write_tar

from ncleaner.backbone import build_backbone
from ncleaner.decode import decode_pair
from ncleaner.errors import NcleanerError
from ncleaner.shards import expand_shards, read_shard, shard_names


def test_every_shards_form_expands_to_the_same_files(small_shards):
    files = sorted(str(p) for p in small_shards.glob("*.tar"))
    assert len(files) == 3
    assert expand_shards(str(small_shards)) == files
    assert expand_shards(str(small_shards / "*.tar")) == files
    assert expand_shards(str(small_shards / "{00000..00002}.tar")) == files
    assert expand_shards("::".join(files)) == files
    assert expand_shards(files) == files  # several arguments, as a shell glob gives them
    assert expand_shards(f"pipe:cat {files[0]}") == [f"pipe:cat {files[0]}"]


def test_pipe_spec_reads_the_same_samples_as_the_file(small_shards):
    path = str(small_shards / "00000.tar")
    direct = [(s.key, s.members) for s in read_shard(path)]
    piped = [(s.key, s.members) for s in read_shard(f"pipe:cat {path}")]
    assert direct == piped and len(direct) == 32


@pytest.mark.parametrize(
    "spec, message",
    [("nowhere/{0..1}.tar", "no such shard file"), ("nowhere/*.tar", "matches no files"), ("missing.tar", "no such")],
)
def test_missing_shards_fail_before_any_work(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NcleanerError, match=message):
        expand_shards(spec)


def test_directory_without_shards_is_an_error(tmp_path):
    with pytest.raises(NcleanerError, match=r"holds no shards \(\.tar, "):
        expand_shards(str(tmp_path))


def test_a_directory_gives_every_tar_the_reader_opens_and_names_what_it_skips(small_shards, tmp_path):
    # A directory once gave only its *.tar files: the gzip, .tgz and upper-case shards were left out unsaid,
    # and a subdirectory named like a shard failed as one.
    d = tmp_path / "pool"
    (d / "sub.tar").mkdir(parents=True)
    write_tar(d / "sub.tar" / "00009.tar", [("z.txt", b"inside a subdirectory")])
    (d / "notes.txt").write_text("not a shard")
    shutil.copy(small_shards / "00000.tar", d / "00000.tar")
    for name, source in (("00001.tar.gz", "00001.tar"), ("00002.tgz", "00002.tar")):
        (d / name).write_bytes(gzip.compress((small_shards / source).read_bytes()))
    shutil.copy(small_shards / "00000.tar", d / "00003.TAR")
    result = run_cli("inject-noise", d, "--out", tmp_path / "out", "--rate", "0")
    assert "wrote 128 pairs to 4 shard(s)" in result.output
    assert f"warning: {d / 'sub.tar'}: not a file, so not a shard; skipped" in result.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]


def test_shard_names_that_need_changing_stay_distinct_and_recognisable():
    urls = ["d/a b.tar", "d/a_b.tar", "d/café.tar", "d/line\n1.tar", "d/_x.tar", "d/00000.TAR", "d/y.tar.gz"]
    names = shard_names(urls)
    assert len(set(names)) == len(urls)
    assert names[1] == "a_b" and names[5:] == ["00000", "y"]  # names already safe are kept as they are
    for name, start in zip(names, ["a_b-", None, "caf_-", "line_1-", "x-"], strict=False):
        if start:  # changed: a recognisable stem and 8 hex digits of the original name
            assert name.startswith(start) and len(name) == len(start) + 8, name
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) for n in names)


def test_colliding_shard_names_are_disambiguated():
    names = shard_names(["a/00000.tar", "b/00000.tar", "b/00001.tar", "pipe:curl -s http://h/x/00002.tar"])
    assert names[0] != names[1] and names[0].startswith("00000-") and names[2:] == ["00001", "00002"]


def test_reader_keeps_member_bytes_and_suffix_case(messy_shard):
    samples = list(read_shard(str(messy_shard)))
    assert [s.key for s in samples] == [f"a{i}" for i in range(8)]
    assert [s.index for s in samples] == list(range(8))
    assert set(samples[4].members) == {"JPG", "json"}
    assert samples[7].members["extra.bin"] == b"\x00\x01keep me"


def test_empty_shard_has_no_samples(tmp_path):
    assert list(read_shard(str(write_tar(tmp_path / "empty.tar", [])))) == []


def test_corrupt_tar_is_a_one_line_error_naming_the_shard(tmp_path, small_shards):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"garbage" * 100 + (small_shards / "00000.tar").read_bytes())
    with pytest.raises(NcleanerError) as err:
        list(read_shard(str(broken)))
    assert str(broken) in str(err.value) and "\n" not in str(err.value)


def test_tar_corrupt_midway_yields_what_it_read_and_says_where_it_ends(tmp_path, small_shards):
    broken = tmp_path / "broken.tar"
    broken.write_bytes((small_shards / "00000.tar").read_bytes()[:5000] + b"garbage" * 100)
    reader = read_shard(str(broken))
    assert [s.key for s in reader] == ["000000000"]
    assert reader.damage and "ends early" in reader.damage


@pytest.fixture(scope="module")
def preprocess():
    return build_backbone("ncleaner-tiny", None).preprocess


def test_decode_statuses(messy_shard, preprocess):
    pairs = [decode_pair(s, preprocess) for s in read_shard(str(messy_shard))]
    assert [p.status for p in pairs] == MESSY_STATUSES
    assert pairs[0].caption == "a red square" and pairs[0].url == "http://x/a0.jpg"
    assert pairs[4].caption == "a caption from json" and pairs[4].url == "http://x/a4"
    assert pairs[5].caption == "a png image"  # broken json does not matter when txt has the caption
    assert all((p.image is not None) == p.ok for p in pairs)
    assert tuple(pairs[0].image.shape) == (3, 64, 64)


def test_blank_caption_counts_as_missing(tmp_path, preprocess):
    shard = write_tar(tmp_path / "blank.tar", [("k.jpg", jpeg_bytes()), ("k.txt", b"  \n")])
    assert decode_pair(next(read_shard(str(shard))), preprocess).status == "missing_caption"


def test_a_list_of_local_names_is_checked_before_any_work(tmp_path, monkeypatch, small_shards):
    monkeypatch.chdir(small_shards)
    assert expand_shards("00000.tar::00001.tar") == ["00000.tar", "00001.tar"]
    with pytest.raises(NcleanerError, match="nope.tar: no such shard file"):
        expand_shards("00000.tar::nope.tar")


def test_filter_needs_neither_torch_nor_open_clip():
    # filter only reads the report and the shards: importing the model stack would cost seconds and a GB.
    import subprocess
    import sys

    code = "import sys, ncleaner.filtering; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
