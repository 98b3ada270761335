"""The realistic noise modes of inject-noise (hard, partial, boilerplate, mix) and evaluate's per-kind breakdown."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, run_cli, tar_members, write_tar

from ncleaner.errors import NcleanerError
from ncleaner.evaluate import detection_by_kind, evaluate_report, format_detection
from ncleaner.noise import NOISE_KINDS, inject_noise, plan_noise
from ncleaner.noise_text import caption_facts, is_boilerplate, normalise, partial_edit
from ncleaner.synthetic import make_generator, write_synthetic_shards

SHARDS = ("00000.tar", "00001.tar", "00002.tar")


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    write_synthetic_shards(out, n_samples=60, shard_size=20, noise_rate=0.0, seed=3)
    return out


def generated_captions(name: str, n: int, seed: int = 0) -> list[str]:
    """Captions of a generator's scenes, without rendering the images (fast)."""
    gen, rng = make_generator(name), np.random.default_rng(seed)
    return [gen._clutter(gen._caption(gen._scene(rng)[1], rng), rng) for _ in range(n)]


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def jaccard(a: str, b: str) -> float:
    return len(words(a) & words(b)) / len(words(a) | words(b))


@pytest.mark.parametrize("mode", ["hard", "partial", "boilerplate", "mix"])
def test_each_mode_changes_the_chosen_share_records_its_kind_and_copies_the_rest(clean_shards, tmp_path, mode):
    out = tmp_path / mode
    result = run_cli("inject-noise", clean_shards, "--out", out, "--rate", "0.4", "--seed", "5", "--mode", mode)
    assert "24 of 60 captions made noisy" in result.output
    truth = pd.read_parquet(out / "noise_truth.parquet").set_index("key")
    assert truth["noisy"].sum() == 24 and (truth["kind"].notna() == truth["noisy"]).all()
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {k: 6 for k in NOISE_KINDS} if mode == "mix" else {mode: 24}
    assert manifest["kinds"] == expected and manifest["noisy"] == 24 and manifest["not_changed"] == {}
    assert truth["kind"].value_counts().to_dict() == expected
    originals = {
        k[:-4]: v.decode() for n in SHARDS for k, v in tar_members(clean_shards / n).items() if k.endswith(".txt")
    }
    for name in SHARDS:
        before, after = tar_members(clean_shards / name), tar_members(out / name)
        assert before.keys() == after.keys()
        for member in before:
            key, ext = member.split(".", 1)
            if ext == "jpg":
                assert after[member] == before[member]  # images untouched, byte for byte
            if ext != "json":
                continue
            meta, old = json.loads(after[member]), json.loads(before[member])
            caption, kind = after[f"{key}.txt"].decode(), truth.loc[key, "kind"]
            assert meta["caption"] == caption and meta["ncleaner_noisy"] is bool(truth.loc[key, "noisy"])
            # Nothing else in the json changes.
            rest = {k: v for k, v in meta.items() if not k.startswith("ncleaner_") and k != "caption"}
            assert rest == {k: v for k, v in old.items() if not k.startswith("ncleaner_") and k != "caption"}
            if pd.isna(kind):
                assert caption == old["caption"] and "ncleaner_noise_kind" not in meta
                continue
            assert meta["ncleaner_noise_kind"] == kind and meta["ncleaner_original_caption"] == old["caption"]
            assert normalise(caption) != normalise(old["caption"])
            if kind == "hard":  # another sample's caption that states other facts
                assert caption in originals.values() and caption_facts(caption) != caption_facts(old["caption"])
            if kind == "partial":  # exactly one word changed
                new_words, old_words = caption.split(), old["caption"].split()
                assert len(new_words) == len(old_words)
                assert sum(a != b for a, b in zip(new_words, old_words, strict=True)) == 1
            if kind == "boilerplate":
                assert is_boilerplate(caption)


def test_every_mode_is_deterministic_given_the_seed(clean_shards, tmp_path):
    for name in ("a", "b"):
        inject_noise(str(clean_shards), tmp_path / name, rate=0.5, seed=9, mode="mix")
    for name in (*SHARDS, "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    truth = [pd.read_parquet(tmp_path / d / "noise_truth.parquet").drop(columns="shard") for d in ("a", "b")]
    pd.testing.assert_frame_equal(*truth)
    inject_noise(str(clean_shards), tmp_path / "c", rate=0.5, seed=10, mode="mix")
    assert (tmp_path / "c" / "00000.tar").read_bytes() != (tmp_path / "a" / "00000.tar").read_bytes()


@pytest.mark.parametrize("generator", ["scenes", "paraphrase", "hard"])
def test_hard_partners_share_more_words_than_random_ones(generator):
    captions = generated_captions(generator, 300)
    new, kinds, not_changed = plan_noise(captions, "hard", 0.5, np.random.default_rng(0))
    chosen = [i for i, k in enumerate(kinds) if k == "hard"]
    assert len(chosen) == 150 and not_changed == {}
    rng = np.random.default_rng(1)
    hard = np.mean([jaccard(captions[i], new[i]) for i in chosen])
    random = np.mean([jaccard(captions[i], captions[(i + int(rng.integers(1, 300))) % 300]) for i in chosen])
    assert hard > random + 0.2, (hard, random)
    # A near miss, never a rewording of the same scene: the facts differ.
    assert all(caption_facts(new[i]) != caption_facts(captions[i]) for i in chosen)


def test_hard_works_on_captions_no_vocabulary_knows(tmp_path):
    captions = [
        "Sunset over the old harbour in winter",
        "sunset over the old harbour in summer",
        "homemade pasta sauce recipe with basil",
        "homemade tomato sauce recipe with basil",
        "sunset over the old harbour in winter!",  # the first one again: never its partner
    ]
    new, kinds, _ = plan_noise(captions, "hard", 1.0, np.random.default_rng(0))
    assert kinds == ["hard"] * 5
    assert [normalise(c) for c in new] == [normalise(captions[i]) for i in (1, 0, 3, 2, 1)]


def test_hard_skips_rewordings_that_state_the_same_facts():
    captions = ["a red car, stock photo", "a red car, free download", "a blue car, stock photo", "two dogs"]
    new, _, _ = plan_noise(captions, "hard", 1.0, np.random.default_rng(0))
    assert new[0] == "a blue car, stock photo"  # not "a red car, free download": the same car
    assert new[1] == "a blue car, stock photo"


def test_a_caption_without_an_editable_word_stays_clean_and_is_counted(tmp_path):
    shard = write_tar(
        tmp_path / "in" / "in.tar",
        [
            ("k0.jpg", jpeg_bytes()),
            ("k0.txt", b"hello world"),
            ("k1.jpg", jpeg_bytes()),
            ("k1.txt", b"a red car"),
        ],
    )
    result = run_cli("inject-noise", shard, "--out", tmp_path / "o", "--rate", "1", "--mode", "partial")
    assert "1 of 2 captions made noisy (partial 1)" in result.output
    assert "1 chosen for partial left clean (no colour, count, object or position word to change)" in result.output
    out = tar_members(tmp_path / "o" / "in.tar")
    assert out["k0.txt"] == b"hello world" and json.loads(out["k0.json"])["ncleaner_noisy"] is False
    assert out["k1.txt"] != b"a red car" and json.loads(out["k1.json"])["ncleaner_noise_kind"] == "partial"
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["not_changed"] == {"partial": 1}


def test_partial_edit_changes_one_fact_and_keeps_the_grammar():
    caption = "An elephant and two dogs near a red car."
    seen = set()
    for seed in range(60):
        new = partial_edit(caption, np.random.default_rng(seed))
        changed = [(a, b) for a, b in zip(caption.split(), new.split(), strict=True) if a != b]
        assert len(changed) == 1
        old, word = changed[0]
        seen.add(old)
        assert old != "elephant"  # no other animal fits "An"
        if old == "dogs":
            assert word.endswith("s") and word != "dogs"  # another animal, still plural
        if old == "car.":
            vehicles = {"bus", "truck", "bicycle", "motorcycle", "train", "boat", "airplane"}
            assert word.endswith(".") and word[:-1] in vehicles
    assert seen == {"two", "dogs", "red", "car."}
    assert partial_edit("Red car", np.random.default_rng(0))[0].isupper()  # the case is kept
    assert partial_edit("an orange", np.random.default_rng(0)) is None  # no other colour fits "an"
    for seed in range(30):  # a colour is replaced by another family, never by a synonym of its own
        colour = partial_edit("a crimson circle", np.random.default_rng(seed)).split()[1]
        assert colour == "crimson" or colour not in ("red", "scarlet", "maroon")


def test_boilerplate_comes_from_the_list_and_differs_from_the_own_caption():
    captions = ["stock photo"] * 50 + ["a red circle"] * 50
    new, kinds, _ = plan_noise(captions, "boilerplate", 1.0, np.random.default_rng(0))
    assert all(is_boilerplate(c) for c in new) and kinds == ["boilerplate"] * 100
    assert "stock photo" not in new[:50]
    assert any(c.endswith((".jpg", ".JPG", ".png", ".webp")) for c in new) and any(" " in c for c in new)
    assert not is_boilerplate("a red circle") and not is_boilerplate("IMG_12.JPG")


def test_mix_contains_every_kind_in_equal_shares():
    captions = generated_captions("hard", 200)
    _, kinds, _ = plan_noise(captions, "mix", 0.42, np.random.default_rng(4))
    counts = pd.Series([k for k in kinds if k]).value_counts().to_dict()
    assert counts == {"permute": 21, "hard": 21, "partial": 21, "boilerplate": 21}


@pytest.mark.parametrize("mode", ["hard", "partial", "boilerplate", "mix"])
def test_a_zero_rate_changes_nothing(mode):
    captions = generated_captions("scenes", 20)
    assert plan_noise(captions, mode, 0.0, np.random.default_rng(0)) == (captions, [None] * 20, {})


def test_an_unknown_mode_is_a_one_line_error(clean_shards, tmp_path):
    with pytest.raises(NcleanerError, match="--mode shuffle: unknown noise mode"):
        inject_noise(str(clean_shards), tmp_path / "o", rate=0.2, mode="shuffle")
    result = run_cli("inject-noise", clean_shards, "--out", tmp_path / "o", "--rate", "0.2", "--mode", "x", ok=False)
    assert result.exit_code == 2 and not (tmp_path / "o").exists()


def known_report() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Scores where permuted captions are perfectly detected and near misses are not at all."""
    rows = [
        ("c0", 0.6, None),
        ("c1", 0.7, None),
        ("c2", 0.8, None),
        ("c3", 0.9, None),
        ("p0", 0.1, "permute"),
        ("p1", 0.2, "permute"),
        ("h0", 0.65, "hard"),
        ("h1", 0.85, "hard"),
        ("b0", np.nan, "boilerplate"),  # not scored: no breakdown for a kind without scored pairs
    ]
    report = pd.DataFrame(rows, columns=["key", "score", "ncleaner_noise_kind"])
    report["status"] = ["ok"] * 8 + ["bad_image"]
    report["clean_prob"] = report["score"]
    report["ncleaner_noisy"] = ["false"] * 4 + ["true"] * 5
    kinds = np.array([k if isinstance(k, str) else None for k in report["ncleaner_noise_kind"]], dtype=object)
    return report, np.array([k is not None for k in kinds]), kinds


def test_detection_by_kind_on_known_scores():
    report, noisy, kinds = known_report()
    by_kind = detection_by_kind(report, noisy, kinds)
    assert list(by_kind) == ["permute", "hard"]
    assert by_kind["permute"]["noisy"] == 2 and by_kind["hard"]["noisy"] == 2
    assert by_kind["permute"]["columns"]["score"] == {"auroc": 1.0, "ap": 1.0}
    # Near misses at 0.65 and 0.85 among clean 0.6..0.9: each beats half of the clean pairs.
    assert by_kind["hard"]["columns"]["score"]["auroc"] == pytest.approx(0.5)
    assert by_kind["hard"]["columns"]["score"]["ap"] == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 5)
    overall = evaluate_report(report, noisy, kinds)
    assert overall["by_kind"] == by_kind and overall["columns"]["score"]["auroc"] == pytest.approx((8 + 4) / 16)
    text = format_detection(overall)
    assert "AUROC by noise kind" in text and re.search(r"permute\s+2\s+1\.0000\s+1\.0000", text)
    assert re.search(r"hard\s+2\s+0\.5000\s+0\.5000", text) and "boilerplate" not in text


def test_detection_by_kind_refuses_kinds_that_disagree_with_the_flags():
    report, noisy, kinds = known_report()
    kinds[5] = None
    with pytest.raises(NcleanerError, match="report column 'k': 1 rows disagree .* key p1"):
        detection_by_kind(report, noisy, kinds, source="report column 'k'")


def _as_report_part(report: pd.DataFrame) -> pd.DataFrame:
    """``scoring`` with the columns every report part has (evaluate reads only what score writes)."""
    full = report.assign(shard="00000.tar", index=np.arange(len(report)), caption="a caption", url=None)
    full = full.assign(model_id="m", clip_sim=report["score"], mii_sim=report["score"], soft_agreement=report["score"])
    return full.astype({c: "float32" for c in ("score", "clean_prob", "clip_sim", "mii_sim", "soft_agreement")})


def test_evaluate_breaks_down_by_kind_from_a_kept_field_or_a_truth_file(tmp_path):
    report, noisy, kinds = known_report()
    (tmp_path / "r").mkdir()
    _as_report_part(report).to_parquet(tmp_path / "r" / "00000.parquet")
    out = run_cli("evaluate", "--report", tmp_path / "r", "--json", tmp_path / "a.json").output
    assert "AUROC by noise kind" in out and "AP by noise kind" in out
    from_field = json.loads((tmp_path / "a.json").read_text())["detection"]
    assert from_field["by_kind"]["hard"]["columns"]["score"]["auroc"] == pytest.approx(0.5)
    truth = pd.DataFrame({"key": report["key"], "noisy": noisy, "kind": pd.array(kinds, dtype="string")})
    truth.to_parquet(tmp_path / "truth.parquet")
    args = ["--report", tmp_path / "r", "--truth", tmp_path / "truth.parquet", "--json", tmp_path / "b.json"]
    run_cli("evaluate", *args)
    assert json.loads((tmp_path / "b.json").read_text())["detection"] == from_field
    # A truth file without kinds (written before the noise modes) gives no breakdown.
    truth.drop(columns="kind").to_parquet(tmp_path / "old.parquet")
    out = run_cli("evaluate", "--report", tmp_path / "r", "--truth", tmp_path / "old.parquet").output
    assert "by noise kind" not in out and "noise detection: 5 noisy of 9 pairs" in out
    truth.loc[0, "kind"] = "hard"  # a clean pair with a kind
    truth.to_parquet(tmp_path / "bad.parquet")
    result = run_cli("evaluate", "--report", tmp_path / "r", "--truth", tmp_path / "bad.parquet", ok=False)
    assert result.exit_code == 1 and "bad.parquet: column kind: 1 rows disagree" in result.output
    assert len(result.output.strip().splitlines()) == 1
