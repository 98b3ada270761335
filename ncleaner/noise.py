"""Noisy-correspondence injection as the literature does it (NCR, Huang et al., NeurIPS 2021).

A fraction of the pairs has its captions permuted among themselves, so every
caption still occurs exactly once but no longer describes its own image.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .decode import JSON_CAPTION_FIELDS, read_text_fields
from .errors import NcleanerError
from .shards import RawSample, expand_shards, read_shards, shard_names
from .writer import MANIFEST, ShardFile, StagedDir, check_outputs_apart_from_inputs, recorded_files, write_json

TRUTH_FILE = "noise_truth.parquet"


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


@dataclass
class NoiseResult:
    out_dir: Path
    shards: list[Path]
    samples: int
    with_caption: int
    noisy: int
    truth_file: Path


def inject_noise(
    shards: str | Iterable[str],
    out_dir: str | Path,
    *,
    rate: float,
    seed: int = 0,
    mode: str = "permute",
    force: bool = False,
) -> NoiseResult:
    """Copy ``shards`` to ``out_dir`` with the captions of a ``rate`` fraction permuted among themselves.

    One output shard per input shard, same name. For every sample that has a
    caption, the json member records ``ncleaner_noisy`` (and, when noisy,
    ``ncleaner_original_caption``); a noisy sample's ``txt`` member and json
    caption field take the other sample's caption. Every other member is copied
    byte for byte. ``OUT/noise_truth.parquet`` holds the same ground truth
    (key, shard, index, noisy) for ``ncleaner evaluate --truth``.
    """
    if mode != "permute":
        raise NcleanerError(f"--mode {mode}: unknown noise mode (only 'permute')")
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
        if len(eligible) < 2:
            raise NcleanerError(f"{urls[0]}: {len(eligible)} sample(s) with a caption; need at least two to permute")
        perm = caption_permutation(len(eligible), rate, np.random.default_rng(seed))
        source = np.arange(len(captions))
        source[eligible] = eligible[perm]

        out = Path(out_dir)
        names, truth = [], []
        i = 0
        for url, name in zip(urls, shard_names(urls), strict=True):
            with ShardFile(stage.path / f"{name}.tar") as shard:
                for raw in read_shards([url]):
                    noisy = bool(source[i] != i)
                    shard.write_raw(raw, _caption_members(raw, captions[i], captions[source[i]], noisy))
                    truth.append(
                        {"key": raw.key, "shard": str(out / f"{name}.tar"), "index": raw.index, "noisy": noisy}
                    )
                    i += 1
            names.append(f"{name}.tar")
        pd.DataFrame(truth).to_parquet(stage.path / TRUTH_FILE, index=False)
        noisy_count = int((source != np.arange(len(source))).sum())
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
                "files": [*names, TRUTH_FILE],
            },
        )
        stage.commit()
    return NoiseResult(out, [out / n for n in names], len(captions), len(eligible), noisy_count, out / TRUTH_FILE)


def _caption_members(raw: RawSample, own: str | None, new: str | None, noisy: bool) -> dict[str, bytes]:
    """The members that change: the txt and json captions of a noisy sample, and the truth in the json."""
    if own is None:
        return {}  # nothing to permute, nothing to record
    members = raw.members
    json_name = next((n for n in members if n.lower() == "json"), "json")
    try:
        meta = json.loads(members[json_name]) if json_name in members else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        meta = None  # a broken json stays as it was; noise_truth.parquet still has the truth
    changed: dict[str, bytes] = {}
    if noisy:
        txt_name = next((n for n in members if n.lower() == "txt"), None)
        if txt_name is not None:
            changed[txt_name] = new.encode("utf-8")
        if meta is not None:
            for field in JSON_CAPTION_FIELDS:
                if isinstance(meta.get(field), str):
                    meta[field] = new
    if meta is not None:
        meta["ncleaner_noisy"] = noisy
        if noisy:
            meta["ncleaner_original_caption"] = own
        changed[json_name] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return changed
