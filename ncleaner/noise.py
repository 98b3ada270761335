"""Noisy-correspondence injection: the literature's permutation and the noise real pools have.

``permute`` is what NCR (Huang et al., NeurIPS 2021) and its successors do: a
fraction of the pairs has its captions permuted among themselves, so every
caption still occurs exactly once but no longer describes its own image. The
other modes make the noise crawled pools are full of (docs/design.md section
9.1): ``hard`` near misses (another sample's caption that says nearly the
same), ``partial`` captions with one fact changed, ``boilerplate`` alt-text that
describes nothing, and ``mix``, equal shares of all four.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .errors import NcleanerError
from .noise_text import boilerplate_caption, caption_facts, fact_tokens, normalise, partial_edit
from .shards import JSON_CAPTION_FIELDS, RawSample, expand_shards, read_shards, read_text_fields, shard_names
from .writer import MANIFEST, ShardFile, StagedDir, check_outputs_apart_from_inputs, recorded_files, write_json

TRUTH_FILE = "noise_truth.parquet"
NOISE_KINDS = ("permute", "hard", "partial", "boilerplate")
NOISE_MODES = (*NOISE_KINDS, "mix")
# Why a chosen sample stays clean (counted per kind in the manifest's not_changed).
NOT_CHANGED_REASONS = {
    "partial": "no colour, count, object or position word to change",
    "hard": "no other caption states other facts",
}
# Dense similarity cells computed at once when choosing hard partners (32 MB of float64).
_BLOCK_CELLS = 1 << 22


def caption_permutation(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``perm`` such that sample ``i`` takes caption ``perm[i]``.

    ``round(rate * n)`` samples are chosen at random and their captions are
    rotated by a random derangement, so each chosen sample ends up with another
    chosen sample's caption (never its own); the others keep theirs.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    perm = np.arange(n)
    k = int(round(rate * n))
    if k == 0:
        return perm
    if k == 1:
        # One sample cannot swap with itself; two is the smallest real swap.
        k = 2
    if k > n:
        raise ValueError(f"cannot permute captions among {k} of {n} samples")
    chosen = rng.choice(n, size=k, replace=False)
    # Shuffling the chosen set and shifting by one is a uniform cyclic derangement:
    # no fixed points, and every chosen sample receives a different caption.
    rng.shuffle(chosen)
    perm[chosen] = np.roll(chosen, 1)
    return perm


def hard_partners(captions: Sequence[str], rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each of ``rows``, the index of the most similar caption that states other facts (-1: none).

    Similarity is computed from the captions alone: the mean of the TF-IDF
    cosine of their words (so rare shared words count more than "a" and "the")
    and the cosine of their sets of colours, counts and objects (synonyms
    merged, so a pool's filler phrases do not outweigh what the captions say).
    A candidate with the same facts as the row (``caption_facts``; for captions
    stating none, the same words) is a rewording, not a near miss, and is
    excluded, as is the row itself. Ties are broken at random.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.preprocessing import normalize

    n = len(captions)

    def features(vectorizer) -> sparse.csr_matrix:
        try:
            return normalize(vectorizer.fit_transform(captions).astype(np.float64))
        except ValueError:  # no caption has a word (or a fact) at all: that half contributes nothing
            return sparse.csr_matrix((n, 1), dtype=np.float64)

    words = features(TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", lowercase=True))
    facts = features(CountVectorizer(analyzer=fact_tokens, binary=True))
    ids: dict[tuple, int] = {}
    same = [("facts", f) if (f := caption_facts(c)) else ("words", normalise(c)) for c in captions]
    keys = np.array([ids.setdefault(key, len(ids)) for key in same])
    out = np.full(len(rows), -1, dtype=np.int64)
    block = max(1, _BLOCK_CELLS // n)
    for start in range(0, len(rows), block):
        r = rows[start : start + block]
        sim = 0.5 * (words[r] @ words.T).toarray() + 0.5 * (facts[r] @ facts.T).toarray()
        sim += rng.random(sim.shape) * 1e-9
        sim[keys[r][:, None] == keys[None, :]] = -np.inf
        best = sim.argmax(axis=1)
        found = np.isfinite(sim[np.arange(len(r)), best])
        out[start : start + len(r)] = np.where(found, best, -1)
    return out


def plan_noise(
    captions: Sequence[str], mode: str, rate: float, rng: np.random.Generator
) -> tuple[list[str], list[str | None], dict[str, int]]:
    """The new caption and the noise kind (None: clean) of each of ``captions``, and per kind the
    number of chosen samples it could not change (they stay clean).

    ``permute`` is ``caption_permutation`` as before. The other modes choose
    ``round(rate * n)`` samples at random; ``mix`` deals them, in random order,
    permute, hard, partial, boilerplate in turn (equal shares, the first kinds one
    more when the count does not divide by four).
    """
    n = len(captions)
    new, kinds = list(captions), [None] * n
    if mode == "permute":
        perm = caption_permutation(n, rate, rng)
        for i in np.flatnonzero(perm != np.arange(n)):
            new[i], kinds[i] = captions[perm[i]], "permute"
        return new, kinds, {}
    chosen = rng.choice(n, size=int(round(rate * n)), replace=False)
    dealt = np.array(
        [NOISE_KINDS[i % len(NOISE_KINDS)] if mode == "mix" else mode for i in range(len(chosen))], dtype=object
    )
    share = {kind: chosen[dealt == kind] for kind in NOISE_KINDS}
    not_changed: Counter[str] = Counter()

    def set_noise(i: int, caption: str | None, kind: str) -> None:
        if caption is None:
            not_changed[kind] += 1
        else:
            new[i], kinds[i] = caption, kind

    rows = share["permute"]
    if len(rows) >= 2:
        # A cyclic shift of the (randomly ordered) chosen samples: a derangement, as caption_permutation.
        for i, j in zip(rows, np.roll(rows, 1), strict=True):
            set_noise(i, captions[j], "permute")
    elif len(rows) == 1:  # one sample cannot swap with itself: it takes a random other sample's caption
        i = int(rows[0])
        j = int(rng.integers(n - 1))
        set_noise(i, captions[j + (j >= i)], "permute")
    rows = share["hard"]
    if len(rows):
        for i, j in zip(rows, hard_partners(captions, rows, rng), strict=True):
            set_noise(i, captions[j] if j >= 0 else None, "hard")
    for i in share["partial"]:
        set_noise(i, partial_edit(captions[i], rng), "partial")
    for i in share["boilerplate"]:
        own = normalise(captions[i])
        # Redrawn while it equals the sample's own caption (a pool's caption may be "stock photo").
        while normalise(caption := boilerplate_caption(rng)) == own:
            pass
        set_noise(i, caption, "boilerplate")
    return new, kinds, dict(not_changed)


@dataclass
class NoiseResult:
    out_dir: Path
    shards: list[Path]
    samples: int
    with_caption: int
    noisy: int
    truth_file: Path
    kinds: dict[str, int] = field(default_factory=dict)  # noisy samples per kind
    not_changed: dict[str, int] = field(default_factory=dict)  # chosen but left clean, per kind


def inject_noise(
    shards: str | Iterable[str],
    out_dir: str | Path,
    *,
    rate: float,
    seed: int = 0,
    mode: str = "permute",
    force: bool = False,
) -> NoiseResult:
    """Copy ``shards`` to ``out_dir`` with the captions of a ``rate`` fraction of the samples made noisy.

    ``mode`` is one of ``NOISE_MODES`` (``plan_noise``; docs/design.md section
    9.1). One output shard per input shard, same name. For every sample that has
    a caption, the json member records ``ncleaner_noisy`` (and, when noisy,
    ``ncleaner_original_caption`` and ``ncleaner_noise_kind``); a noisy sample's
    ``txt`` member and json caption field take the new caption. Every other
    member is copied byte for byte. ``OUT/noise_truth.parquet`` holds the same
    ground truth (key, shard, index, noisy, kind) for ``ncleaner evaluate --truth``.
    """
    if mode not in NOISE_MODES:
        raise NcleanerError(f"--mode {mode}: unknown noise mode (one of {', '.join(NOISE_MODES)})")
    if not 0.0 <= rate <= 1.0:
        raise NcleanerError(f"--rate {rate}: must be in [0, 1]")
    urls = expand_shards(shards)
    check_outputs_apart_from_inputs([out_dir], urls)
    stage = StagedDir(out_dir, force=force, owned=lambda d: recorded_files(d, "inject-noise"))
    with stage:
        # A caption that is not UTF-8 text is not a caption to hand to another image.
        fields = (read_text_fields(raw) for raw in read_shards(urls))
        captions = [caption if status != schema.BAD_CAPTION else None for caption, _, _, status in fields]
        eligible = np.flatnonzero([c is not None for c in captions])
        # Modes that hand one sample's caption to another need a second caption to take.
        need = 1 if mode in ("partial", "boilerplate") else 2
        if len(eligible) < need:
            raise NcleanerError(
                f"{urls[0]}: {len(eligible)} sample(s) with a caption; "
                f"need at least {'one' if need == 1 else 'two'} for --mode {mode}"
            )
        planned, planned_kinds, not_changed = plan_noise(
            [captions[i] for i in eligible], mode, rate, np.random.default_rng(seed)
        )
        new_captions, kinds = list(captions), [None] * len(captions)
        for i, caption, kind in zip(eligible, planned, planned_kinds, strict=True):
            new_captions[i], kinds[i] = caption, kind

        out = Path(out_dir)
        names, truth = [], []
        i = 0
        for url, name in zip(urls, shard_names(urls), strict=True):
            with ShardFile(stage.path / f"{name}.tar") as shard:
                for raw in read_shards([url]):
                    shard.write_raw(raw, _caption_members(raw, captions[i], new_captions[i], kinds[i]))
                    truth.append(
                        {
                            "key": raw.key,
                            "shard": str(out / f"{name}.tar"),
                            "index": raw.index,
                            "noisy": kinds[i] is not None,
                            "kind": kinds[i],
                        }
                    )
                    i += 1
            names.append(f"{name}.tar")
        table = pd.DataFrame(truth, columns=["key", "shard", "index", "noisy", "kind"])
        table["kind"] = table["kind"].astype("string")  # a string column even when every pair is clean
        table.to_parquet(stage.path / TRUTH_FILE, index=False)
        counts = Counter(k for k in kinds if k is not None)
        by_kind = {k: counts[k] for k in NOISE_KINDS if counts[k]}
        noisy_count = sum(by_kind.values())
        write_json(
            stage.path / MANIFEST,
            {
                "command": "inject-noise",
                "input_shards": urls,
                "rate": rate,
                "seed": seed,
                "mode": mode,
                "samples": len(captions),
                "noisy": noisy_count,
                "kinds": by_kind,
                "not_changed": not_changed,
                "files": [*names, TRUTH_FILE],
            },
        )
        stage.commit()
    return NoiseResult(
        out, [out / n for n in names], len(captions), len(eligible), noisy_count, out / TRUTH_FILE, by_kind, not_changed
    )


def _caption_members(raw: RawSample, own: str | None, new: str | None, kind: str | None) -> dict[str, bytes]:
    """The members that change: the txt and json captions of a noisy sample, and the truth in the json."""
    if own is None:
        return {}  # no caption to change, nothing to record
    members = raw.members
    json_name = next((n for n in members if n.lower() == "json"), "json")
    try:
        meta = json.loads(members[json_name]) if json_name in members else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        meta = None  # a broken json stays as it was; noise_truth.parquet still has the truth
    changed: dict[str, bytes] = {}
    noisy = kind is not None
    if noisy:
        txt_name = next((n for n in members if n.lower() == "txt"), None)
        if txt_name is not None:
            changed[txt_name] = new.encode("utf-8")
        if meta is not None:
            for name in JSON_CAPTION_FIELDS:
                if isinstance(meta.get(name), str):
                    meta[name] = new
    if meta is not None:
        meta["ncleaner_noisy"] = noisy
        if noisy:
            meta["ncleaner_original_caption"] = own
            meta["ncleaner_noise_kind"] = kind
        changed[json_name] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return changed
