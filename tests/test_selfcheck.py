"""The anchored score (Eq. S1), the self-check that chooses it, and the hard negatives of fit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from ncleaner.config import DisNCLConfig
from ncleaner.fitting import epoch_batches, neighbourhood_batches
from ncleaner.losses import edit_negative_loss
from ncleaner.model import CORRECTION_TERMS, TERMS, Calibration, anchored_score
from ncleaner.noise_text import _replacements, partial_edit
from ncleaner.selfcheck import KINDS, CheckHalf, auroc, choose, slice_size
from ncleaner.synthetic import write_synthetic_shards

FIT = ("--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32", "--quiet")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """240 generated pairs, 30 % permuted: enough for a self-check with halves of a few dozen pairs."""
    out = tmp_path_factory.mktemp("selfcheck_pool")
    write_synthetic_shards(out, n_samples=240, shard_size=80, noise_rate=0.3, seed=11)
    return out


def test_weight_zero_is_clip_sim_bit_for_bit_through_fit_and_score(pool, tmp_path):
    model, report = tmp_path / "model", tmp_path / "report"
    run_cli("fit", pool, "--out", model, *FIT, "--set", "score_term=mii_sim", "--set", "score_weight=0")
    run_cli("score", pool, "--model", model, "--out", report, "--quiet")
    frame = pd.read_parquet(report)
    ok = frame[frame.status == "ok"]
    assert len(ok) == 240
    assert np.array_equal(ok.score.to_numpy(), ok.clip_sim.to_numpy())
    order = np.argsort(ok.clip_sim.to_numpy(), kind="stable")
    assert np.array_equal(np.argsort(ok.score.to_numpy(), kind="stable"), order)
    calibration = json.loads((model / "calibration.json").read_text())
    assert (calibration["term"], calibration["weight"]) == ("mii_sim", 0.0)


def test_a_self_check_with_too_few_clean_held_out_pairs_leaves_score_at_clip_sim(pool, tmp_path):
    """A slice of 4 pairs (2 % of 240, no minimum) leaves halves under MIN_HALF_PAIRS clean pairs:
    fit says so and score is clip_sim. tests/test_end_to_end.py drives a full self-check on
    sample_data/."""
    model = tmp_path / "model"
    small = ("--set", "selfcheck_fraction=0.02", "--set", "selfcheck_min_pairs=0")
    result = run_cli("fit", pool, "--out", model, *FIT, *small)
    # the backbone trains here, so the model is trained again on every pair after the check
    assert "trained on 240 pairs (a first training left 4 out for the self-check" in result.output
    assert "too few held-out pairs judged clean to test a correction; score is clip_sim" in result.output
    assert not (model / "selfcheck.json").exists()
    calibration = json.loads((model / "calibration.json").read_text())
    assert (calibration["term"], calibration["weight"]) == ("clip_sim", 0.0)
    assert result.output.rstrip().endswith("score is clip_sim (the backbone's own cosine)")


def test_without_a_self_check_the_configured_term_and_weight_are_used(pool, tmp_path):
    model = tmp_path / "model"
    run_cli(
        "fit", pool, "--out", model, *FIT,
        "--set", "selfcheck_fraction=0", "--set", "score_term=soft_agreement", "--set", "score_weight=1",
    )  # fmt: skip
    assert not (model / "selfcheck.json").exists()
    calibration = json.loads((model / "calibration.json").read_text())
    assert (calibration["term"], calibration["weight"]) == ("soft_agreement", 1.0)
    result = run_cli("fit", pool, "--out", tmp_path / "m2", *FIT, "--set", "selfcheck_fraction=0", ok=False)
    assert "without the self-check (selfcheck_fraction 0), set score_term and score_weight" in result.output


def _quantiles(terms):
    return Calibration.quantiles_of(terms, 101)


def test_anchored_score_interpolates_on_clip_sims_scale():
    rng = np.random.default_rng(0)
    terms = {name: rng.normal(size=500).astype(np.float32) for name in TERMS}
    q = _quantiles(terms)
    assert anchored_score(terms, "mii_sim", 0.0, q) is not None
    assert np.array_equal(anchored_score(terms, "negclip", 0.0, q), terms["clip_sim"])
    full = anchored_score(terms, "mii_sim", 1.0, q)
    # weight 1 ranks by the term alone, and its values lie on clip_sim's range
    assert np.array_equal(np.argsort(full), np.argsort(terms["mii_sim"]))
    assert terms["clip_sim"].min() - 1e-6 <= full.min() and full.max() <= terms["clip_sim"].max() + 1e-6
    half = anchored_score(terms, "mii_sim", 0.5, q)
    assert np.allclose(half, (terms["clip_sim"] + full) / 2, atol=1e-6)


def _half(rng, n, separation):
    """Clean and noisy terms where clip_sim separates by 1 and each correction term by ``separation[term]``."""
    clean = {name: rng.normal(size=n) + separation.get(name, 1.0) for name in TERMS}
    noisy = {kind: {name: rng.normal(size=n) for name in TERMS} for kind in KINDS}
    return CheckHalf(clean=clean, noisy=noisy)


@pytest.mark.parametrize("mii_separation, chosen", [(3.0, "mii_sim"), (0.0, "clip_sim")])
def test_choose_keeps_a_correction_only_where_it_beats_clip_sim(mii_separation, chosen):
    rng = np.random.default_rng(1)
    separation = {"clip_sim": 1.0, "mii_sim": mii_separation, "soft_agreement": 0.0, "negclip": 0.0}
    halves = (_half(rng, 300, separation), _half(rng, 300, separation))
    pooled = {n: np.concatenate([halves[0].clean[n], *(v[n] for v in halves[0].noisy.values())]) for n in TERMS}
    check = choose(halves, _quantiles(pooled), DisNCLConfig(), rng)
    assert check.term == chosen and check.passed == (chosen != "clip_sim")
    assert check.rows[0]["name"] == "clip_sim" and check.rows[0]["gain"] == 0
    final = check.final
    if chosen == "clip_sim":
        assert check.weight == 0.0 and final["gain"] == 0 and "score is clip_sim" in check.summary()
    else:
        assert check.weight > 0 and final["gain"] > 2 * final["gain_se"] > 0
        assert f"score = clip_sim + {check.weight:g} x (mii_sim - clip_sim)" in check.summary()
    assert {r["term"] for r in check.rows[1:-1]} == set(CORRECTION_TERMS)
    assert "| clip_sim | clip_sim | 0 |" in check.table()


def test_auroc_counts_noisy_pairs_scored_below_clean_ones():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5


def test_slice_size_bounds():
    config = DisNCLConfig()
    assert slice_size(100_000, config) == 10_000
    assert slice_size(1_000_000, config) == 20_000
    assert slice_size(2_000, config) == 300
    assert slice_size(240, config) == 48
    assert slice_size(2_000, DisNCLConfig(selfcheck_fraction=0.0, score_term="clip_sim", score_weight=0.0)) == 0


def test_edit_vocabularies_are_disjoint_and_every_part_edits():
    captions = ["a red car and two dogs to the left of a blue chair", "three green apples on a table"]
    words = {}
    for part in range(3):
        words[part] = set()
        for caption in captions:
            for token in caption.split():
                words[part] |= {w.lower() for w in _replacements(token, None, (part, 3))}
        rng = np.random.default_rng(part)
        assert all(partial_edit(c, rng, vocabulary=(part, 3)) not in (None, c) for c in captions)
    assert all(words[p] for p in words)
    assert not (words[0] & words[1]) and not (words[0] & words[2]) and not (words[1] & words[2])


def test_edit_negative_loss_prefers_the_own_caption_and_ignores_noisy_pairs():
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    w = torch.ones(4)
    assert edit_negative_loss(v, v, e, w, 0.1) < edit_negative_loss(v, e, v, w, 0.1)
    assert edit_negative_loss(v, e, v, torch.zeros(4), 0.1) == 0


def test_neighbourhood_batches_use_every_pair_once_and_group_neighbours():
    rng = np.random.default_rng(0)
    centres = torch.nn.functional.normalize(torch.randn(20, 16), dim=-1)
    f = torch.nn.functional.normalize(centres.repeat_interleave(10, 0) + 0.05 * torch.randn(200, 16), dim=-1)
    f_v = torch.nn.functional.normalize(torch.randn(200, 16), dim=-1)  # images unrelated: no near duplicates
    batches = neighbourhood_batches(f_v.half(), f.half(), 32, 0.5, rng)
    assert len(batches) == len(epoch_batches(200, 32, np.random.default_rng(0)))
    assert sorted(torch.cat(batches).tolist()) == list(range(200))
    first_group = batches[0][:8]  # an anchor and its 7 nearest captions: all from one cluster of 10
    assert len({int(i) // 10 for i in first_group}) == 1
