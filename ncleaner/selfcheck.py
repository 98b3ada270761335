"""fit's self-check: noise injected into a held-out slice of the user's own pool decides what
``score`` is (docs/design.md section 3.1).

No clean labels exist, so whether the DisNCL heads improve on the backbone's own cosine
for *this* pool and *this* backbone cannot be read off the training loss. ``fit`` holds
out a slice of the pool from training, keeps the pairs of it that the clip_sim or the
mii_sim mixture judges clean, and makes noisy pairs from them of every kind
``inject-noise`` knows (a permuted caption, a hard partner's caption, a one-fact edit, a
boilerplate caption). The slice is split in two halves whose edits draw from disjoint
vocabularies (and neither shares one with the edits that training uses): every
(term, weight) of Eq. S1 (``model.Calibration``) is scored on half A, the best is
kept only if it beats clip_sim on half B by more than ``selfcheck_margin`` bootstrap
standard errors, and the table reported is half B's. Otherwise ``score`` is clip_sim.

The user's shards are never touched: the edited captions exist only in memory, and
``selfcheck.json`` in the model directory records the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

from .config import DisNCLConfig
from .mixture import TwoComponentMixture
from .model import CORRECTION_TERMS, anchored_score
from .noise_text import boilerplate_caption, caption_facts, normalise, partial_edit

logger = logging.getLogger(__name__)

KINDS = ("permute", "hard", "partial", "boilerplate")
# The weights tried for each correction term (0 is clip_sim itself).
WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.1, 1.0, 10))
# partial_edit's disjoint vocabularies: one for the edits training sees, one for each half.
VOCABULARY_PARTS = 3
TRAINING_VOCABULARY = 0
HALF_VOCABULARIES = (1, 2)
BOOTSTRAP_ROUNDS = 200
# Below this many clean pairs in a half, AUROCs are too coarse to decide anything.
MIN_HALF_PAIRS = 8
# A hard partner must not be the same picture: above this image cosine it may well describe the anchor.
NEAR_DUPLICATE_IMAGE = 0.95
HARD_CANDIDATES = 16
# Training pairs searched for hard partners (brute force: |slice| x this many cosines).
PARTNER_POOL = 20_000

Terms = dict[str, np.ndarray]


def slice_size(n: int, config: DisNCLConfig) -> int:
    """How many of ``n`` usable pairs the self-check holds out: ``selfcheck_fraction`` of them,
    at least ``selfcheck_min_pairs`` and at most ``selfcheck_max_pairs``, never over a fifth."""
    if config.selfcheck_fraction <= 0:
        return 0
    size = max(config.selfcheck_min_pairs, int(config.selfcheck_fraction * n))
    return int(min(size, config.selfcheck_max_pairs, n // 5))


@dataclass
class CheckHalf:
    """One half of the slice: the clean pairs' terms and, per kind, the noisy pairs' terms."""

    clean: Terms
    noisy: dict[str, Terms]

    @property
    def sizes(self) -> dict[str, int]:
        return {"clean": len(self.clean["clip_sim"]), **{k: len(v["clip_sim"]) for k, v in self.noisy.items()}}


def make_half(
    f_v: torch.Tensor,
    f_t: torch.Tensor,
    captions: Sequence[str],
    partners: tuple[torch.Tensor, torch.Tensor, Sequence[str]],
    *,
    terms: Callable[[torch.Tensor, torch.Tensor], Terms],
    encode_text: Callable[[list[str]], torch.Tensor],
    vocabulary: int,
    rng: np.random.Generator,
) -> CheckHalf:
    """The clean pairs (``f_v``, ``f_t``, ``captions``) and one noisy pair of each kind per clean
    pair where that kind applies; ``partners`` (backbone features and captions of training
    pairs) supply the hard partners."""
    m = len(captions)
    facts = [caption_facts(c) for c in captions]
    said = [normalise(c) for c in captions]
    rows: dict[str, list[int]] = {kind: [] for kind in KINDS}
    texts: dict[str, list] = {kind: [] for kind in KINDS}

    # permute: the next caption in a random cycle, unless it says the same.
    order = rng.permutation(m)
    for a, b in zip(order, np.roll(order, -1), strict=True):
        if a != b and facts[a] != facts[b] and said[a] != said[b]:
            rows["permute"].append(int(a))
            texts["permute"].append(f_t[b])

    # hard: the training caption closest to the pair's own that states other facts and is not
    # attached to (nearly) the same image.
    p_v, p_t, p_captions = partners
    if len(p_captions):
        k = min(HARD_CANDIDATES, len(p_captions))
        near = (f_t @ p_t.T).topk(k, dim=1).indices
        image_sim = (f_v @ p_v.T).gather(1, near)
        for i in range(m):
            for j, sim in zip(near[i].tolist(), image_sim[i].tolist(), strict=True):
                if sim < NEAR_DUPLICATE_IMAGE and caption_facts(p_captions[j]) != facts[i]:
                    if normalise(p_captions[j]) != said[i]:
                        rows["hard"].append(i)
                        texts["hard"].append(p_t[j])
                        break

    # partial: one fact word replaced, from this half's vocabulary; boilerplate: alt-text.
    edited, boiler = [], []
    for i, caption in enumerate(captions):
        new = partial_edit(caption, rng, vocabulary=(vocabulary, VOCABULARY_PARTS))
        if new is not None:
            rows["partial"].append(i)
            edited.append(new)
        while normalise(b := boilerplate_caption(rng)) == said[i]:
            pass
        rows["boilerplate"].append(i)
        boiler.append(b)
    for kind, written in (("partial", edited), ("boilerplate", boiler)):
        if written:
            texts[kind] = list(encode_text(written))

    noisy = {}
    for kind in KINDS:
        if rows[kind]:
            idx = torch.tensor(rows[kind])
            noisy[kind] = terms(f_v[idx], torch.stack(texts[kind]))
    return CheckHalf(clean=terms(f_v, f_t), noisy=noisy)


def auroc(clean: np.ndarray, noisy: np.ndarray) -> float:
    """AUROC of finding the noisy pairs by a low score: P(noisy < clean), ties counted half."""
    ranks = rankdata(np.concatenate([noisy, clean]))
    n_c, n_n = len(clean), len(noisy)
    return float((ranks[n_n:].sum() - n_c * (n_c + 1) / 2) / (n_c * n_n))


def _scores(half: CheckHalf, term: str, weight: float, quantiles: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return (
        anchored_score(half.clean, term, weight, quantiles),
        {k: anchored_score(t, term, weight, quantiles) for k, t in half.noisy.items()},
    )


def _kind_aurocs(clean: np.ndarray, noisy: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: auroc(clean, v) for k, v in noisy.items()}


@dataclass
class SelfCheck:
    """What the self-check measured and chose. ``rows`` are half B's AUROCs (per kind and their
    mean) for clip_sim, each correction term at the weight half A preferred, and the final score,
    with bootstrap standard errors of the mean and of its gain over clip_sim."""

    term: str
    weight: float
    held_out: int
    sizes: dict[str, dict[str, int]]
    chosen_on_a: dict
    rows: list[dict] = field(default_factory=list)
    passed: bool = False
    margin: float = 2.0

    @property
    def final(self) -> dict:
        return self.rows[-1]

    @property
    def clip(self) -> dict:
        return self.rows[0]

    def summary(self) -> str:
        """The line ``fit`` ends with."""
        clip, final = self.clip, self.final
        head = (
            f"on your pool, with injected noise ({self.sizes['B']['clean']} held-out clean pairs): "
            f"clip_sim {clip['mean']:.3f}, score {final['mean']:.3f} ({final['gain']:+.3f} ± {final['gain_se']:.3f})"
        )
        if self.passed:
            return f"{head}; score = clip_sim + {self.weight:g} x ({self.term} - clip_sim), on clip_sim's scale"
        best = self.chosen_on_a
        if best["term"] == "clip_sim":
            return f"{head}; no correction did better than clip_sim on half A: score is clip_sim"
        return (
            f"{head}; no correction beats clip_sim by more than {self.margin:g} standard errors on half B "
            f"(best on half A: {best['term']} at weight {best['weight']:g}, {best['gain_b']:+.3f} ± "
            f"{best['gain_se_b']:.3f} on half B): score is clip_sim"
        )

    def table(self) -> str:
        kinds = [k for k in KINDS if k in self.final["kinds"]]
        lines = [
            "| column | term | weight | " + " | ".join(kinds) + " | mean | ± | gain over clip_sim |",
            "|---|---|---|" + "---|" * len(kinds) + "---|---|---|",
        ]
        for row in self.rows:
            cells = " | ".join(f"{row['kinds'][k]:.3f}" for k in kinds)
            lines.append(
                f"| {row['name']} | {row['term']} | {row['weight']:g} | {cells} | {row['mean']:.3f} | "
                f"{row['se']:.3f} | {row['gain']:+.3f} ± {row['gain_se']:.3f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def choose(
    halves: tuple[CheckHalf, CheckHalf], quantiles: dict, config: DisNCLConfig, rng: np.random.Generator
) -> SelfCheck:
    """Pick score's (term, weight) on half A; keep it only where it beats clip_sim on half B by more
    than ``config.selfcheck_margin`` standard errors; report half B."""
    a, b = halves
    terms = CORRECTION_TERMS if config.score_term == "auto" else (config.score_term,)
    weights = WEIGHTS if config.score_weight is None else (config.score_weight,)
    grid = [("clip_sim", 0.0)] + [(t, w) for t in terms if t != "clip_sim" for w in weights]

    def mean_on(half: CheckHalf, term: str, weight: float) -> float:
        return float(np.mean(list(_kind_aurocs(*_scores(half, term, weight, quantiles)).values())))

    on_a = {cfg: mean_on(a, *cfg) for cfg in grid}
    # The best on half A; among equals the smaller weight, clip_sim first.
    best = max(grid, key=lambda cfg: (round(on_a[cfg], 6), -cfg[1]))
    per_term = {t: max(((t, w) for w in weights), key=lambda cfg: (round(on_a[cfg], 6), -cfg[1])) for t in terms}
    fixed = config.score_term != "auto" and config.score_weight is not None

    rounds = _bootstrap_indices(b, rng)
    stats = {cfg: _row_stats(b, cfg, quantiles, rounds) for cfg in {("clip_sim", 0.0), best, *per_term.values()}}
    clip_stats = stats[("clip_sim", 0.0)]
    gain, gain_se = _gain(stats[best], clip_stats)
    passed = best != ("clip_sim", 0.0) and (fixed or gain > config.selfcheck_margin * gain_se)
    final = best if passed else ("clip_sim", 0.0)

    def row(name: str, cfg: tuple[str, float]) -> dict:
        s = stats[cfg]
        g, g_se = _gain(s, clip_stats)
        return {
            "name": name,
            "term": cfg[0],
            "weight": cfg[1],
            "kinds": s["kinds"],
            "mean": s["mean"],
            "se": float(np.std(s["boot"], ddof=1)),
            "gain": g,
            "gain_se": g_se,
            "mean_on_a": on_a[cfg],
        }

    rows = [row("clip_sim", ("clip_sim", 0.0))]
    rows += [row(f"{t} (best weight on half A)", cfg) for t, cfg in per_term.items() if t != "clip_sim"]
    rows.append(row("score (chosen)", final))
    check = SelfCheck(
        term=final[0],
        weight=final[1],
        held_out=0,
        sizes={"A": a.sizes, "B": b.sizes},
        chosen_on_a={
            "term": best[0],
            "weight": best[1],
            "mean_a": on_a[best],
            "clip_a": on_a[("clip_sim", 0.0)],
            "gain_b": gain,
            "gain_se_b": gain_se,
        },
        rows=rows,
        passed=passed,
        margin=config.selfcheck_margin,
    )
    return check


def _bootstrap_indices(half: CheckHalf, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Resamples of the clean pairs and of each kind's noisy pairs, stratified (AUROC's two samples),
    shared by every row so that gains are paired."""
    sizes = half.sizes
    return [{k: rng.integers(0, n, n) for k, n in sizes.items()} for _ in range(BOOTSTRAP_ROUNDS)]


def _row_stats(half: CheckHalf, cfg: tuple[str, float], quantiles: dict, rounds) -> dict:
    clean, noisy = _scores(half, *cfg, quantiles)
    kinds = _kind_aurocs(clean, noisy)
    boot = np.array(
        [np.mean([auroc(clean[r["clean"]], v[r[k]]) for k, v in noisy.items()]) for r in rounds], dtype=np.float64
    )
    return {"kinds": kinds, "mean": float(np.mean(list(kinds.values()))), "boot": boot}


def _gain(stats: dict, clip: dict) -> tuple[float, float]:
    return stats["mean"] - clip["mean"], float(np.std(stats["boot"] - clip["boot"], ddof=1))


def usable(halves: tuple[CheckHalf, CheckHalf]) -> bool:
    """Whether both halves have enough clean pairs and noisy pairs of at least one kind."""
    return all(h.sizes["clean"] >= MIN_HALF_PAIRS and h.noisy for h in halves)


def judged_clean(held: Terms, training_terms: Terms, seed: int) -> np.ndarray:
    """Which held-out pairs the two-component mixture fitted to the training pairs' clip_sim or
    the one fitted to their mii_sim judges clean.

    Either, not both: a pair only one column calls clean is most often a clean pair the other
    gets wrong (a cluttered image the backbone's cosine rates low), and leaving those out
    flatters the weaker column. Measured on the frozen benchmark's pools (pools with clutter new
    to the backbone): requiring both made the check see +0.03 where the true gain of the score it
    chose was +0.07, and choose weights of 0.5; either saw +0.05 to +0.06, chose weight 1, and on
    pools where the backbone knows the clutter still chose clip_sim
    (pipelines/results/frozen_benchmark.md).
    """
    clean = np.zeros(len(held["clip_sim"]), dtype=bool)
    for name in ("clip_sim", "mii_sim"):
        mixture = TwoComponentMixture.fit(training_terms[name], seed=seed)
        clean |= mixture.clean_posterior(held[name]) >= 0.5
    return clean


def run(
    model,
    check: tuple[torch.Tensor, torch.Tensor, Sequence[str]],
    partners: tuple[torch.Tensor, torch.Tensor, Sequence[str]],
    training_terms: Terms,
    quantiles: dict,
    config: DisNCLConfig,
    rng: np.random.Generator,
) -> SelfCheck | None:
    """The self-check on the held-out pairs ``check`` (backbone features and captions), or None when
    too few of them are judged clean to decide anything.

    The clean pairs are those ``judged_clean`` keeps: a slice chosen by one of the two columns
    alone would favour that column.
    """
    f_v, f_t, captions = check
    rows = rng.permutation(np.flatnonzero(judged_clean(model.terms(f_v, f_t), training_terms, config.seed)))
    encoder = model.encoder()

    def encode_text(texts: list[str]) -> torch.Tensor:
        step = config.batch_size
        return torch.cat([encoder.text(model.tokenize(texts[i : i + step])) for i in range(0, len(texts), step)])

    halves = []
    for part, vocabulary in zip(np.array_split(rows, 2), HALF_VOCABULARIES, strict=True):
        idx = torch.from_numpy(np.sort(part))
        halves.append(
            make_half(
                f_v[idx],
                f_t[idx],
                [captions[i] for i in idx.tolist()],
                partners,
                terms=model.terms,
                encode_text=encode_text,
                vocabulary=vocabulary,
                rng=rng,
            )
        )
    if not usable(tuple(halves)):
        logger.info("self-check: only %d held-out pairs judged clean, too few to decide", len(rows))
        return None
    result = choose(tuple(halves), quantiles, config, rng)
    result.held_out = len(captions)
    return result
