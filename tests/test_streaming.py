"""The encode stage, embeddings written once and reused, decode workers, and the fit sample (issue 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import copy_with_changed_caption, run_cli, tar_members

import ncleaner.decode
import ncleaner.encode
from ncleaner import DisNCLConfig
from ncleaner.backbone import build_backbone
from ncleaner.embeddings import embed
from ncleaner.encode import encode_text
from ncleaner.engine import RunOptions
from ncleaner.fitting import Reservoir, fit
from ncleaner.scoring import score
from ncleaner.synthetic import write_synthetic_shards

FROZEN = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32", "--quiet"]


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = open_clip.create_model("ncleaner-tiny", pretrained=None)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A local checkpoint file standing in for pretrained weights (random, so only the plumbing is real)."""
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool")
    write_synthetic_shards(out, n_samples=120, shard_size=40, noise_rate=0.25, seed=3)
    return out


@pytest.fixture(scope="module")
def embedded(pool, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb"
    run_cli("embed", pool, "--backbone", "ncleaner-tiny", "--pretrained", tiny_checkpoint, "--out", out, "-q")
    return out


def _fit_frozen(shards, out, checkpoint, *extra):
    run_cli("fit", shards, "--out", out, "--set", f"pretrained={checkpoint}", *FROZEN, *extra)
    return out


def test_embed_writes_clip_retrieval_layout(embedded, pool):
    info = json.loads((embedded / "embeddings.json").read_text())
    assert info["backbone"] == "ncleaner-tiny" and info["dim"] == 128 and info["dtype"] == "float16"
    assert len(info["pretrained_sha256"]) == 64 and info["normalized"] is True
    names = sorted(p.stem for p in pool.glob("*.tar"))
    for name in names:
        img = np.load(embedded / "img_emb" / f"img_emb_{name}.npy")
        txt = np.load(embedded / "text_emb" / f"text_emb_{name}.npy")
        meta = pd.read_parquet(embedded / "metadata" / f"metadata_{name}.parquet")
        assert img.dtype == np.float16 and img.shape == txt.shape == (len(meta), 128)
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
        # Row i of the metadata is row i of both arrays, and names the sample it came from.
        members = tar_members(pool / f"{name}.tar")
        assert [members[f"{k}.txt"].decode() for k in meta["image_path"]] == list(meta["caption"])
        assert set(meta["status"]) == {"ok"} and set(meta["shard"]) == {str(pool / f"{name}.tar")}


def test_embed_lists_undecodable_samples_in_skipped(messy_shard, tiny_checkpoint, tmp_path):
    out = tmp_path / "emb"
    result = run_cli(
        "embed", messy_shard, "--backbone", "ncleaner-tiny", "--pretrained", tiny_checkpoint, "--out", out, "-q"
    )
    assert "4 pairs embedded" in result.output
    meta = pd.read_parquet(out / "metadata" / "metadata_00000.parquet")
    skipped = pd.read_parquet(out / "skipped" / "skipped_00000.parquet")
    assert list(meta["image_path"]) == ["a0", "a4", "a5", "a7"]
    assert dict(zip(skipped["image_path"], skipped["status"], strict=True)) == {
        "a1": "bad_image",
        "a2": "missing_caption",
        "a3": "missing_image",
        "a6": "bad_json",
    }


def test_embed_resumes_shard_by_shard(embedded, pool, tiny_checkpoint, tmp_path):
    copy = tmp_path / "emb"
    shutil.copytree(embedded, copy)
    (copy / "metadata" / "metadata_00001.parquet").unlink()  # as if killed before this part was complete
    before = (copy / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns
    result = embed(
        str(pool), copy, backbone="ncleaner-tiny", pretrained=str(tiny_checkpoint), run=RunOptions(workers=0)
    )
    assert [Path(u).name for u in result.done_now] == ["00001.tar"]
    assert len(result.done_before) == 2
    assert (copy / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns == before
    for side in ("img_emb/img_emb_00001.npy", "text_emb/text_emb_00001.npy"):
        np.testing.assert_array_equal(np.load(copy / side), np.load(embedded / side))


def _count_encoded(monkeypatch) -> list[int]:
    counted: list[int] = []
    real = ncleaner.encode.Encoder.__call__

    def counting(self, images, tokens):
        counted.append(len(images))
        return real(self, images, tokens)

    monkeypatch.setattr(ncleaner.encode.Encoder, "__call__", counting)
    return counted


def test_fit_then_score_with_embeddings_encode_each_pair_once_and_match(pool, tiny_checkpoint, tmp_path, monkeypatch):
    plain_model = _fit_frozen(pool, tmp_path / "plain", tiny_checkpoint)
    run_cli("score", pool, "--model", plain_model, "--out", tmp_path / "plain_report", "-q")

    counted = _count_encoded(monkeypatch)
    emb = tmp_path / "emb"
    emb_model = _fit_frozen(pool, tmp_path / "emb_model", tiny_checkpoint, "--embeddings", emb)
    assert sum(counted) == 120  # fit encoded the pool once and wrote it to --embeddings
    run_cli("score", pool, "--model", emb_model, "--out", tmp_path / "emb_report", "--embeddings", emb, "-q")
    assert sum(counted) == 120  # score encoded nothing again

    plain = pd.read_parquet(tmp_path / "plain_report")
    from_emb = pd.read_parquet(tmp_path / "emb_report")
    assert list(plain["key"]) == list(from_emb["key"]) and (from_emb["status"] == "ok").all()
    for column in ("clip_sim", "mii_sim", "soft_agreement", "score", "clean_prob"):
        # Fresh features are rounded to float16 as stored ones are: the same numbers, the same model. What
        # is left is float32 rounding, which depends on batch shapes and on the CPU's BLAS kernels
        # (1.7e-6 on clip_sim on an Intel Xeon): the margin holds on any machine.
        np.testing.assert_allclose(from_emb[column], plain[column], rtol=0, atol=1e-5, err_msg=column)


@pytest.fixture(scope="module")
def frozen_model(pool, tiny_checkpoint, tmp_path_factory) -> Path:
    return _fit_frozen(pool, tmp_path_factory.mktemp("frozen") / "model", tiny_checkpoint)


def test_score_with_embeddings_encodes_changed_and_missing_shards_again(
    embedded, pool, frozen_model, tmp_path, monkeypatch, caplog
):
    shards = tmp_path / "shards"
    first = copy_with_changed_caption(pool, shards, "00000.tar", b"a caption written after the embeddings were")
    emb = tmp_path / "emb"
    shutil.copytree(embedded, emb)
    for sub, name in (("img_emb", "img_emb"), ("text_emb", "text_emb"), ("metadata", "metadata")):
        suffix = "parquet" if sub == "metadata" else "npy"
        (emb / sub / f"{name}_00002.{suffix}").unlink()  # this shard is not embedded yet

    counted = _count_encoded(monkeypatch)
    result = score(str(shards), frozen_model, tmp_path / "report", embeddings=emb, run=RunOptions(workers=0))
    # The changed shard and the missing one were encoded; the untouched one was read from EMB.
    assert sum(counted) == 80 and result.statuses == {"ok": 120}
    assert "00000.tar: part 00000 of" in caplog.text and "1 sample(s) changed" in caplog.text
    report = pd.read_parquet(tmp_path / "report")
    assert report.loc[report["key"] == first, "caption"].item() == "a caption written after the embeddings were"
    # Both parts now hold what the shards hold, so the next run encodes nothing.
    meta = pd.read_parquet(emb / "metadata" / "metadata_00000.parquet")
    assert meta.loc[meta["image_path"] == first, "caption"].item() == "a caption written after the embeddings were"
    assert (emb / "metadata" / "metadata_00002.parquet").is_file()
    score(str(shards), frozen_model, tmp_path / "again", embeddings=emb, run=RunOptions(workers=0))
    assert sum(counted) == 80


def test_another_pools_shard_of_the_same_name_is_encoded_not_matched(embedded, frozen_model, tiny_checkpoint, tmp_path):
    """img2dataset names every pool's first shard 00000.tar: a part is tied to bytes, not to a name."""
    other = tmp_path / "other"
    write_synthetic_shards(other, n_samples=40, shard_size=40, noise_rate=0.25, seed=11)
    emb = tmp_path / "emb"
    shutil.copytree(embedded, emb)
    run_cli("score", other, "--model", frozen_model, "--out", tmp_path / "plain", "-q")
    run_cli("score", other, "--model", frozen_model, "--out", tmp_path / "emb_report", "--embeddings", emb, "-q")
    plain, from_emb = pd.read_parquet(tmp_path / "plain"), pd.read_parquet(tmp_path / "emb_report")
    assert (from_emb["status"] == "ok").all() and list(from_emb["caption"]) == list(plain["caption"])
    np.testing.assert_allclose(from_emb["score"], plain["score"], rtol=0, atol=1e-5)
    # score replaced the part with the other pool's, so embed finds it current.
    again = run_cli("embed", other, "--backbone", "ncleaner-tiny", "--pretrained", tiny_checkpoint, "--out", emb)
    assert "0 pairs embedded from 0 shard(s), 1 shard(s) already there" in again.output


def test_embed_replaces_a_part_made_from_a_truncated_copy(pool, tiny_checkpoint, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    complete = (pool / "00000.tar").read_bytes()
    (shards / "00000.tar").write_bytes(complete[: len(complete) // 2])
    args = ("embed", shards, "--backbone", "ncleaner-tiny", "--pretrained", tiny_checkpoint, "--out", tmp_path / "e")
    cut = run_cli(*args)
    assert "1 truncated shard(s) flagged" in cut.output
    (shards / "00000.tar").write_bytes(complete)
    whole = run_cli(*args)
    assert "40 pairs embedded from 1 shard(s) (1 again: their parts were from other bytes)" in whole.output
    assert "no row there" in whole.output or "damaged copy" in whole.output
    assert len(pd.read_parquet(tmp_path / "e" / "metadata" / "metadata_00000.parquet")) == 40


def test_statuses_of_another_max_image_pixels_and_non_finite_rows_are_not_used(
    pool, tiny_checkpoint, frozen_model, tmp_path
):
    emb = tmp_path / "emb"
    run_cli("embed", pool, "--backbone", "ncleaner-tiny", "--pretrained", tiny_checkpoint, "--out", emb,
            "--max-image-pixels", "1000", "-q")  # fmt: skip
    assert set(pd.read_parquet(emb / "skipped" / "skipped_00000.parquet")["status"]) == {"too_large"}
    run_cli("score", pool, "--model", frozen_model, "--out", tmp_path / "r", "--embeddings", emb, "-q")
    assert (pd.read_parquet(tmp_path / "r")["status"] == "ok").all()  # decided again under the default
    img = np.load(emb / "img_emb" / "img_emb_00001.npy")
    img[3] = np.nan
    np.save(emb / "img_emb" / "img_emb_00001.npy", img)
    result = run_cli("score", pool, "--model", frozen_model, "--out", tmp_path / "r2", "--embeddings", emb)
    # A NaN row is not what was written with the part's metadata (a NaN from the backbone never is:
    # the encoder refuses it), so the part is stale.
    assert "00001.tar: part 00001 of" in result.output and "not those written with its features" in result.output
    report = pd.read_parquet(tmp_path / "r2")
    assert (report["status"] == "ok").all() and report["score"].notna().all()
    assert np.isfinite(np.load(emb / "img_emb" / "img_emb_00001.npy")).all()


def test_embeddings_of_another_backbone_are_refused(embedded, pool, tmp_path):
    other = _checkpoint(tmp_path / "other.pt", seed=2)
    model = _fit_frozen(pool, tmp_path / "model", other)
    result = run_cli("score", pool, "--model", model, "--out", tmp_path / "r", "--embeddings", embedded, ok=False)
    assert result.exit_code == 1
    assert "embeddings.json: embeddings of ncleaner-tiny with weights tiny.pt" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_trained_backbone_model_refuses_embeddings(embedded, pool, small_model, tmp_path):
    result = run_cli("score", pool, "--model", small_model, "--out", tmp_path / "r", "--embeddings", embedded, ok=False)
    assert result.exit_code == 1 and "trains its backbone" in result.output


def test_clip_retrieval_directory_is_read_with_named_backbone(embedded, pool, tiny_checkpoint, tmp_path):
    """clip-retrieval's own output: no embeddings.json, no skipped/, parts that do not follow shards."""
    model = _fit_frozen(pool, tmp_path / "model", tiny_checkpoint)
    foreign = tmp_path / "foreign"
    for sub in ("img_emb", "text_emb", "metadata"):
        (foreign / sub).mkdir(parents=True)
    names = ["00000", "00001", "00002"]
    img = np.concatenate([np.load(embedded / "img_emb" / f"img_emb_{n}.npy") for n in names])
    txt = np.concatenate([np.load(embedded / "text_emb" / f"text_emb_{n}.npy") for n in names])
    meta = pd.concat([pd.read_parquet(embedded / "metadata" / f"metadata_{n}.parquet") for n in names])
    meta = meta[["image_path", "caption"]].reset_index(drop=True)
    # Two parts that cut across shards, rows in another order than the shards'.
    order = np.random.default_rng(0).permutation(len(meta))
    for part, rows in enumerate(np.array_split(order, 2)):
        np.save(foreign / "img_emb" / f"img_emb_{part}.npy", img[rows])
        np.save(foreign / "text_emb" / f"text_emb_{part}.npy", txt[rows])
        meta.iloc[rows].to_parquet(foreign / "metadata" / f"metadata_{part}.parquet")

    refused = run_cli("score", pool, "--model", model, "--out", tmp_path / "r0", "--embeddings", foreign, ok=False)
    assert refused.exit_code == 1 and "--embeddings-backbone" in refused.output
    run_cli("score", pool, "--model", model, "--out", tmp_path / "r1", "-q")
    run_cli(
        "score", pool, "--model", model, "--out", tmp_path / "r2", "--embeddings", foreign,
        "--embeddings-backbone", "ncleaner-tiny", "-q",
    )  # fmt: skip
    fresh, read = pd.read_parquet(tmp_path / "r1"), pd.read_parquet(tmp_path / "r2")
    np.testing.assert_allclose(read["score"], fresh["score"], atol=1e-4)
    assert list(read["key"]) == list(fresh["key"])

    # A changed caption cannot be re-encoded into another tool's directory: refused in one line.
    shards = tmp_path / "shards"
    copy_with_changed_caption(pool, shards, "00001.tar", b"another caption")
    refused = run_cli("score", shards, "--model", model, "--out", tmp_path / "r3", "--embeddings", foreign,
                      "--embeddings-backbone", "ncleaner-tiny", "-q", ok=False)  # fmt: skip
    # One line for the refusal, after the one warning that another tool's weights cannot be checked.
    warning, error = refused.output.strip().splitlines()
    assert refused.exit_code == 1 and "records no weights" in warning and "only their width is checked" in warning
    assert "00001.tar: " in error and "1 sample(s) changed" in refused.output
    assert "written by another tool" in error


def test_report_does_not_depend_on_decode_workers(small_shards, small_model, tmp_path, monkeypatch):
    for workers in (0, 1, 2):
        run_cli("score", small_shards, "--model", small_model, "--out", tmp_path / f"w{workers}", "--workers",
                workers, "--batch-size", "16", "-q")  # fmt: skip
    # Workers replaced after every shard: three generations of decode processes for three shards.
    monkeypatch.setattr(ncleaner.decode, "SHARDS_PER_WORKER", 1)
    run_cli("score", small_shards, "--model", small_model, "--out", tmp_path / "recycled", "--workers", "2",
            "--batch-size", "16", "-q")  # fmt: skip
    for part in sorted((tmp_path / "w0").glob("*.parquet")):
        data = part.read_bytes()
        for other in ("w1", "w2", "recycled"):
            assert (tmp_path / other / part.name).read_bytes() == data, other


def test_unreadable_shard_in_a_worker_is_one_line_or_skipped(small_shards, small_model, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    (shards / "00001.tar").write_bytes(b"not a tar at all" * 100)
    failed = run_cli("score", shards, "--model", small_model, "--out", tmp_path / "r", "--workers", "2", ok=False)
    assert failed.exit_code == 1 and "00001.tar: cannot read shard" in failed.output
    assert "Traceback" not in failed.output
    skipped = run_cli("score", shards, "--model", small_model, "--out", tmp_path / "r", "--workers", "2",
                      "--on-bad-shard", "skip", "-q")  # fmt: skip
    assert "1 unreadable shard(s) skipped" in skipped.output
    assert sorted(p.name for p in (tmp_path / "r").glob("*.parquet")) == ["00000.parquet", "00002.parquet"]


def test_fit_trains_on_a_uniform_sample_of_max_fit_pairs(pool, tiny_checkpoint, tmp_path):
    result = fit(
        str(pool),
        tmp_path / "model",
        DisNCLConfig(pretrained=str(tiny_checkpoint), epochs=1, warmup_epochs=0, batch_size=16, max_fit_pairs=50),
        run=RunOptions(workers=0),
    )
    # A frozen backbone is not trained again after the self-check, so its slice stays out of training.
    assert result.pairs_used + result.pairs_held_out == 50 and result.pairs_held_out > 0
    assert not result.retrained and result.statuses["ok"] == 120
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["max_fit_pairs"] == 50


def test_reservoir_sample_is_uniform_and_seeded():
    counts = np.zeros(100)
    for seed in range(400):
        reservoir = Reservoir(10, seed)
        for start in range(0, 100, 7):  # batches of uneven size, as shards give them
            rows = torch.arange(start, min(start + 7, 100))
            reservoir.add(rows, rows * 2)
        values, doubled = reservoir.sample()
        assert len(values) == 10 and len(set(values.tolist())) == 10 and torch.equal(doubled, values * 2)
        counts[values.numpy()] += 1
    # Each row is kept with probability 1/10: 40 of 400 runs, binomial sd 6.
    assert counts.min() > 15 and counts.max() < 65
    assert abs(counts[:50].sum() - counts[50:].sum()) < 200  # early and late rows alike
    again = Reservoir(10, 3)
    again.add(torch.arange(100))
    other = Reservoir(10, 3)
    other.add(torch.arange(100))
    assert torch.equal(again.sample()[0], other.sample()[0])


@pytest.mark.parametrize("name", ["ncleaner-tiny", "ViT-B-32"])
def test_text_tower_cut_to_the_longest_caption_gives_the_same_features(name):
    backbone = build_backbone(name, None)
    backbone.model.eval()
    captions = ["a red square", "two small green circles on a grey background", "x"]
    tokens = backbone.tokenizer(captions)
    assert (tokens[:, 20:] == 0).all()  # the padding the cut removes
    with torch.no_grad():
        full = backbone.model.encode_text(tokens)
        cut = encode_text(backbone.model, tokens)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-4)


def test_evaluate_retrieval_reads_embeddings(embedded, pool, tiny_checkpoint, tmp_path, monkeypatch):
    model = _fit_frozen(pool, tmp_path / "model", tiny_checkpoint)
    fresh = run_cli("evaluate", "--retrieval", pool, "--model", model, "--json", tmp_path / "fresh.json")
    counted = _count_encoded(monkeypatch)
    stored = run_cli(
        "evaluate", "--retrieval", pool, "--model", model, "--embeddings", embedded, "--json", tmp_path / "emb.json"
    )
    assert sum(counted) == 0  # every shard was read from the embeddings
    assert fresh.output == stored.output
    assert json.loads((tmp_path / "emb.json").read_text())["retrieval"]["pairs"] == 90  # the 30 noisy left out


def test_a_relative_pretrained_path_is_stored_so_the_model_loads_from_anywhere(pool, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    checkpoint = _checkpoint(work / "weights.pt", seed=4)
    monkeypatch.chdir(work)
    _fit_frozen(pool, tmp_path / "model", "weights.pt")  # as typed: relative to the directory fit ran in
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["pretrained"] == str(checkpoint) and len(config["pretrained_sha256"]) == 64
    monkeypatch.chdir(tmp_path)
    run_cli("score", pool, "--model", tmp_path / "model", "--out", tmp_path / "r", "-q")
    # Started from that config.json without its checkpoint, the new model does not inherit the hash.
    run_cli("fit", pool, "--out", tmp_path / "scratch", "--config", tmp_path / "model" / "config.json",
            "--set", "pretrained=null", "--train-backbone", "all", "--epochs", "1", "--set", "selfcheck_fraction=0",
            "--set", "score_term=clip_sim", "--set", "score_weight=0", "-q")  # fmt: skip
    assert json.loads((tmp_path / "scratch" / "config.json").read_text())["pretrained_sha256"] is None

    _checkpoint(checkpoint, seed=5)  # other weights under the same name
    other = run_cli("score", pool, "--model", tmp_path / "model", "--out", tmp_path / "r2", ok=False)
    assert other.exit_code == 1 and len(other.output.strip().splitlines()) == 1, other.output
    assert f"config.json: the backbone checkpoint {checkpoint} holds other weights" in other.output
    checkpoint.unlink()
    gone = run_cli("score", pool, "--model", tmp_path / "model", "--out", tmp_path / "r2", ok=False)
    assert gone.exit_code == 1 and f"the backbone checkpoint {checkpoint} is missing" in gone.output


def _edit_info(emb: Path, **fields) -> None:
    info = json.loads((emb / "embeddings.json").read_text())
    (emb / "embeddings.json").write_text(json.dumps({**info, **fields}))


def test_embeddings_json_fields_are_type_checked(embedded, frozen_model, pool, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(embedded, emb)
    _edit_info(emb, dim="128")
    result = run_cli("score", pool, "--model", frozen_model, "--out", tmp_path / "r", "--embeddings", emb, ok=False)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "embeddings.json: field dim must be an integer, got '128'" in result.output


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("reorder", "its rows are not those written with its features (reordered or edited)"),
        ("pickle", "img_emb_00001.npy: holds Python objects, not an array of numbers"),
        ("garbage", "img_emb_00001.npy: not a .npy array"),
        ("missing", "img_emb_00001.npy: missing (the part's metadata is there, its embeddings are not)"),
    ],
)
def test_a_part_whose_files_do_not_belong_together_is_encoded_again(
    embedded, frozen_model, pool, tmp_path, damage, reason
):
    emb = tmp_path / "emb"
    shutil.copytree(embedded, emb)
    img = emb / "img_emb" / "img_emb_00001.npy"
    if damage == "reorder":  # every pair would get another's features
        meta = pq.read_table(emb / "metadata" / "metadata_00001.parquet")
        pq.write_table(meta.take(np.roll(np.arange(meta.num_rows), 1)), emb / "metadata" / "metadata_00001.parquet")
    elif damage == "pickle":
        np.save(img, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "garbage":
        img.write_bytes(b"not an array")
    else:
        img.unlink()
    result = run_cli("score", pool, "--model", frozen_model, "--out", tmp_path / "r", "--embeddings", emb, "-q")
    assert f"00001.tar: part 00001 of {emb} cannot be used: " in result.output and reason in result.output
    assert "encoding it again" in result.output
    fresh = run_cli("score", pool, "--model", frozen_model, "--out", tmp_path / "plain", "-q")
    assert fresh.exit_code == 0
    np.testing.assert_allclose(
        pd.read_parquet(tmp_path / "r")["score"], pd.read_parquet(tmp_path / "plain")["score"], rtol=0, atol=1e-5
    )
