"""Shared fixtures: small generated shards, hand-built shards with bad samples, a fitted model."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from ncleaner.cli import main
from ncleaner.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"


def jpeg_bytes(color=(200, 30, 30), size=32, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding exactly these (name, bytes) members, in this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def copy_with_changed_caption(pool: Path, out: Path, shard: str, caption: bytes) -> str:
    """Copy the shards of ``pool`` to ``out`` with the first sample of ``shard`` given another
    caption (every other byte of it kept); returns that sample's key."""
    shutil.copytree(pool, out)
    members = tar_members(out / shard)
    first = sorted({name.split(".")[0] for name in members})[0]
    members[f"{first}.txt"] = caption
    write_tar(out / shard, sorted(members.items()))
    return first


def run_cli(*args: str, ok: bool = True):
    """Run the ncleaner CLI in-process; assert on the exit code, return the result."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """96 generated pairs with 25 % permuted captions in three shards."""
    out = tmp_path_factory.mktemp("small_shards")
    write_synthetic_shards(out, n_samples=96, shard_size=32, noise_rate=0.25, seed=7)
    return out


@pytest.fixture(scope="session")
def small_model(small_shards, tmp_path_factory) -> Path:
    """A model fitted on ``small_shards`` in a few seconds (too short to be good, long enough to be real)."""
    out = tmp_path_factory.mktemp("small_model") / "model"
    run_cli("fit", small_shards, "--out", out, "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32", "--quiet")
    return out


# What decoding makes of messy_shard's samples a0..a7, in order.
MESSY_STATUSES = ["ok", "bad_image", "missing_caption", "missing_image", "ok", "ok", "bad_json", "ok"]


@pytest.fixture(scope="session")
def messy_shard(tmp_path_factory) -> Path:
    """One shard with every kind of problem a crawl produces, next to good samples."""
    d = tmp_path_factory.mktemp("messy")
    good = jpeg_bytes()
    members = [
        ("a0.jpg", good),
        ("a0.txt", b"a red square"),
        ("a0.json", b'{"url": "http://x/a0.jpg"}'),
        ("a1.jpg", b"\xff\xd8\xff not really a jpeg"),
        ("a1.txt", b"a corrupt image"),
        ("a2.jpg", good),
        ("a2.json", b'{"url": "http://x/a2.jpg"}'),  # no caption anywhere
        ("a3.txt", b"a caption without an image"),
        ("a4.JPG", good),
        ("a4.json", b'{"caption": "a caption from json", "url": "http://x/a4"}'),
        ("a5.png", jpeg_bytes(fmt="PNG")),
        ("a5.txt", b"a png image"),
        ("a5.json", b"{not json"),
        ("a6.jpg", good),
        ("a6.json", b"{not json"),
        ("a7.webp", jpeg_bytes(fmt="WEBP")),
        ("a7.txt", b"a webp image"),
        ("a7.extra.bin", b"\x00\x01keep me"),
    ]
    return write_tar(d / "00000.tar", members)


# Captions that would run script if the page treated them as markup.
SCRIPT_CAPTION = "<script>document.title='pwned'</script>"
IMG_CAPTION = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="session")
def hostile_shard(tmp_path_factory) -> Path:
    """One shard whose captions and a key are markup, next to samples that cannot be scored."""
    d = tmp_path_factory.mktemp("hostile")
    noisy, clean = b'{"ncleaner_noisy": true}', b'{"ncleaner_noisy": false}'
    members = [
        ("h0.jpg", jpeg_bytes((30, 200, 30))),
        ("h0.txt", SCRIPT_CAPTION.encode()),
        ("h0.json", noisy),
        ("h1.jpg", jpeg_bytes((30, 30, 200))),
        ("h1.txt", IMG_CAPTION.encode()),
        ("h1.json", noisy),
        # The same captions on samples that cannot be scored: their gallery is always on the page.
        ("h2.jpg", b"\xff\xd8\xff not really a jpeg"),
        ("h2.txt", SCRIPT_CAPTION.encode()),
        ("h2.json", clean),
        ("h3.txt", IMG_CAPTION.encode()),
        ("h3.json", clean),
        ('h4"<b>x.jpg', jpeg_bytes((200, 200, 30))),
        ('h4"<b>x.txt', b"a key holding markup"),
        ('h4"<b>x.json', clean),
    ]
    return write_tar(d / "hostile.tar", members)


@pytest.fixture(scope="session")
def inspect_pool(small_shards, hostile_shard, small_model, tmp_path_factory) -> dict:
    """small_shards plus hostile_shard scored by small_model, with the ground truth kept."""
    report = tmp_path_factory.mktemp("inspect_pool") / "report"
    shards = [str(small_shards), str(hostile_shard)]
    run_cli("score", *shards, "--model", small_model, "--out", report, "--keep-json-fields", "ncleaner_noisy", "-q")
    return {"shards": shards, "report": report, "model": small_model}
