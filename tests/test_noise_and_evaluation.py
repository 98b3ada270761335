"""inject-noise, evaluate (detection and retrieval), the generators, and the benchmark harness."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, jpeg_bytes, run_cli, tar_members, write_tar

from ncleaner.synthetic import GENERATORS, make_generator, write_synthetic_shards


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    write_synthetic_shards(out, n_samples=60, shard_size=20, noise_rate=0.0, seed=3)
    return out


def test_inject_noise_permutes_the_given_fraction_and_records_the_truth(clean_shards, tmp_path):
    result = run_cli("inject-noise", clean_shards, "--out", tmp_path / "noisy", "--rate", "0.4", "--seed", "5")
    assert "24 of 60 captions permuted" in result.output
    truth = pd.read_parquet(tmp_path / "noisy" / "noise_truth.parquet")
    assert len(truth) == 60 and truth["noisy"].sum() == 24
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        before, after = tar_members(clean_shards / name), tar_members(tmp_path / "noisy" / name)
        assert before.keys() == after.keys()
        for member in before:
            key, ext = member.split(".", 1)
            if ext == "jpg":
                assert after[member] == before[member]  # images are untouched, byte for byte
            if ext == "json":
                meta, old = json.loads(after[member]), json.loads(before[member])
                noisy = bool(truth.loc[truth["key"] == key, "noisy"].iloc[0])
                assert meta["ncleaner_noisy"] is noisy
                caption = after[f"{key}.txt"].decode()
                assert meta["caption"] == caption
                if noisy:
                    assert caption != old["caption"] and meta["ncleaner_original_caption"] == old["caption"]
                else:
                    assert caption == old["caption"] and "ncleaner_original_caption" not in meta
    captions = lambda d: sorted(  # noqa: E731
        v.decode()
        for n in ("00000.tar", "00001.tar", "00002.tar")
        for k, v in tar_members(d / n).items()
        if k.endswith(".txt")
    )
    assert captions(clean_shards) == captions(tmp_path / "noisy")  # permuted among themselves


def test_inject_noise_is_deterministic(clean_shards, tmp_path):
    for name in ("a", "b"):
        run_cli("inject-noise", clean_shards, "--out", tmp_path / name, "--rate", "0.2", "--seed", "1")
    assert (tmp_path / "a" / "00001.tar").read_bytes() == (tmp_path / "b" / "00001.tar").read_bytes()


def test_inject_noise_handles_json_only_captions_and_samples_without_one(tmp_path):
    shard = write_tar(
        tmp_path / "in" / "in.tar",
        [
            ("k0.jpg", jpeg_bytes()),
            ("k0.json", b'{"caption": "first"}'),
            ("k1.jpg", jpeg_bytes()),
            ("k1.json", b'{"caption": "second"}'),
            ("k2.jpg", jpeg_bytes()),  # no caption: copied as it is
        ],
    )
    run_cli("inject-noise", shard, "--out", tmp_path / "o", "--rate", "1")
    out = tar_members(tmp_path / "o" / "in.tar")
    assert json.loads(out["k0.json"])["caption"] == "second" and json.loads(out["k1.json"])["caption"] == "first"
    assert "k2.json" not in out and out["k2.jpg"] == jpeg_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "1.5"], "1.5 is not in the range 0<=x<=1"),
        (["--rate", "-0.1"], "-0.1 is not in the range 0<=x<=1"),
    ],
)
def test_inject_noise_rejects_bad_rates(clean_shards, tmp_path, args, message):
    result = run_cli("inject-noise", clean_shards, "--out", tmp_path / "o", *args, ok=False)
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "o").exists()


def test_inject_noise_needs_two_captioned_samples(tmp_path):
    shard = write_tar(tmp_path / "in" / "one.tar", [("k0.jpg", jpeg_bytes()), ("k0.txt", b"alone")])
    result = run_cli("inject-noise", shard, "--out", tmp_path / "o", "--rate", "0.5", ok=False)
    assert result.exit_code != 0 and "need at least two" in result.output


def test_evaluate_reports_every_column_from_a_kept_field_or_a_truth_file(small_shards, small_model, tmp_path):
    run_cli(
        "score",
        small_shards,
        "--model",
        small_model,
        "--out",
        tmp_path / "r",
        "--quiet",
        "--keep-json-fields",
        "ncleaner_noisy",
    )
    out = run_cli("evaluate", "--report", tmp_path / "r", "--json", tmp_path / "e.json").output
    for column in ("score", "mii_sim", "soft_agreement", "clip_sim", "clean_prob", "auto rule"):
        assert column in out
    numbers = json.loads((tmp_path / "e.json").read_text())["detection"]
    assert numbers["pairs"] == 96 and numbers["noisy"] == 24
    assert 0 <= numbers["columns"]["score"]["auroc"] <= 1 and 0 <= numbers["auto"]["kept_precision"] <= 1
    report = pd.read_parquet(tmp_path / "r")
    truth = pd.DataFrame({"key": report["key"], "noisy": report["ncleaner_noisy"] == "true"})
    truth.to_parquet(tmp_path / "truth.parquet")
    run_cli(
        "evaluate", "--report", tmp_path / "r", "--truth", tmp_path / "truth.parquet", "--json", tmp_path / "f.json"
    )
    assert json.loads((tmp_path / "f.json").read_text())["detection"] == numbers


def test_evaluate_without_truth_is_a_one_line_error(small_shards, small_model, tmp_path):
    run_cli("score", small_shards, "--model", small_model, "--out", tmp_path / "r", "--quiet")
    result = run_cli("evaluate", "--report", tmp_path / "r", ok=False)
    assert result.exit_code != 0 and "--keep-json-fields ncleaner_noisy" in result.output


def test_retrieval_recall_on_a_clean_split(clean_shards, small_model, tmp_path):
    out = run_cli("evaluate", "--retrieval", clean_shards, "--model", small_model, "--json", tmp_path / "r.json")
    assert "retrieval on 60 clean pairs" in out.output
    numbers = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    for space in ("mii", "clip"):
        r = numbers[space]
        assert r["i2t_R@1"] <= r["i2t_R@5"] <= r["i2t_R@10"] <= 100
        assert np.isclose(r["rsum"], sum(v for k, v in r.items() if k != "rsum"))


def test_recall_at_k_on_a_known_matrix():
    import torch

    from ncleaner.evaluate import recall_at_k

    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
    r = recall_at_k(sim, ks=(1, 2))
    # Images 0, 1, 2 find their texts at ranks 1, 2, 2; texts 0 and 1 find their images first, text 2 ties
    # with image 1 and a tie counts against it.
    assert r["i2t_R@1"] == pytest.approx(100 / 3) and r["i2t_R@2"] == pytest.approx(100)
    assert r["t2i_R@1"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_deterministic_and_switch_clutter(name):
    a = make_generator(name).render(np.random.default_rng(0))
    b = make_generator(name).render(np.random.default_rng(0))
    assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes()
    plain_image, plain_caption = make_generator(name, image_clutter=False, text_clutter=False).render(
        np.random.default_rng(0)
    )
    assert not any(f in plain_caption for f in ("free download", "stock photo", "#art"))
    corner = np.asarray(plain_image)[0, 0]
    assert tuple(corner) == (128, 128, 128)  # plain background


@pytest.mark.slow
def test_benchmark_harness_produces_every_row(tmp_path):
    out = tmp_path / "bench.md"
    subprocess.run(
        [
            sys.executable,
            "pipelines/benchmark_noise.py",
            "--samples",
            "96",
            "--test-samples",
            "32",
            "--shard-size",
            "48",
            "--rates",
            "0.4",
            "--epochs",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    rows = json.loads(out.with_suffix(".json").read_text())
    methods = {(r["method"], r["column"]) for r in rows}
    assert methods == {
        ("DisNCL", "score"),
        ("DisNCL", "mii_sim"),
        ("DisNCL", "soft_agreement"),
        ("raw backbone similarity", "clip_sim"),
        ("w/o disentanglement", "score"),
        ("w/o L_reg", "score"),
        ("w/o soft targets", "score"),
        ("w/o noise weights", "score"),
        ("NCR-style InfoNCE + loss mixture", "loss mixture"),
        ("NCR-style InfoNCE + loss mixture", "mii_sim"),
    }
    text = out.read_text()
    assert "Command: `python pipelines/benchmark_noise.py" in text and text.count("\n| 0.4 |") == len(rows)
    for r in rows:
        assert 0 <= r["auroc"] <= 1 and r["fit_seconds"] > 0


def test_missing_truth_file_is_a_one_line_error(small_shards, small_model, tmp_path):
    run_cli("score", small_shards, "--model", small_model, "--out", tmp_path / "r", "--quiet")
    result = run_cli("evaluate", "--report", tmp_path / "r", "--truth", tmp_path / "none.parquet", ok=False)
    assert result.exit_code != 0 and "no such ground-truth file" in result.output


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_blobs_clutter_style_uses_its_own_phrases_and_background(name):
    from ncleaner.synthetic import FILLERS, SITE_TAGS

    rng = np.random.default_rng(5)
    captions = [make_generator(name, clutter="blobs").render(rng)[1] for _ in range(60)]
    assert any(tag in c for c in captions for tag in SITE_TAGS)
    assert not any(f in c for c in captions for f in FILLERS)
    stripes, _ = make_generator(name).render(np.random.default_rng(1))
    blobs, _ = make_generator(name, clutter="blobs").render(np.random.default_rng(1))
    assert stripes.tobytes() != blobs.tobytes()
    with pytest.raises(ValueError, match="clutter style"):
        make_generator(name, clutter="confetti")


def test_layout_family_captions_name_size_and_band_of_every_object():
    rng = np.random.default_rng(0)
    for _ in range(30):
        _, caption = make_generator("layout", text_clutter=False).render(rng)
        parts = caption.split("; ")
        assert 1 <= len(parts) <= 3
        for part in parts:
            band, _, thing = part.partition(": ")
            assert band in ("at the top", "in the middle", "at the bottom")
            assert thing.split()[1] in ("large", "small")


def test_evaluate_truth_tells_apart_keys_repeated_across_shards(small_shards, small_model, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("a.tar", "b.tar"):  # img2dataset pools merged by hand: the same keys in two shards
        shutil.copy(small_shards / "00000.tar", pool / name)
    noisy = tmp_path / "noisy"
    run_cli("inject-noise", pool, "--out", noisy, "--rate", "0.3", "--seed", "1", "-q")
    truth = pd.read_parquet(noisy / "noise_truth.parquet")
    assert truth["key"].duplicated().any() and truth.groupby("key")["noisy"].nunique().max() == 2
    run_cli("score", noisy, "--model", small_model, "--out", tmp_path / "r", "-q",
            "--keep-json-fields", "ncleaner_noisy,ncleaner_noise_kind")  # fmt: skip
    by_field = run_cli("evaluate", "--report", tmp_path / "r", "--json", tmp_path / "field.json")
    by_file = run_cli("evaluate", "--report", tmp_path / "r", "--truth", noisy / "noise_truth.parquet",
                      "--json", tmp_path / "file.json")  # fmt: skip
    assert by_file.output == by_field.output
    assert json.loads((tmp_path / "file.json").read_text()) == json.loads((tmp_path / "field.json").read_text())
