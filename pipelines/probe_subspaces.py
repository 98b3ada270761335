"""What each DisNCL subspace knows about caption clutter, on pools a ``benchmark_frozen.py --workdir W``
run left behind.

    python pipelines/probe_subspaces.py W unseen-scenes-2000-s1-mix-0.4 seen-scenes-2000-s1-mix-0.4

DisNCL's premise is that the MEI heads take up what one modality has and the other lacks, such as
boilerplate phrases, and that the MII subspace is free of it. This checks it: a logistic-regression
probe (5-fold cross-validated AUROC) predicts whether a caption carries one of its pool's clutter
phrases from the backbone's text feature F_T, from the MII output T_S and from the MEI output T_X
of the DisNCL model the benchmark fitted on that pool.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from ncleaner.model import NcleanerModel
from ncleaner.synthetic import CLUTTER_STYLES


def stored(store: Path, name: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(glob.glob(str(store / name / "*.npy")))]).astype(np.float32)


def probe(work: Path, tag: str) -> dict[str, float]:
    store = work / "embeddings" / tag
    f_v, f_t = torch.from_numpy(stored(store, "img_emb")), torch.from_numpy(stored(store, "text_emb"))
    captions = pd.concat(pd.read_parquet(p) for p in sorted(glob.glob(str(store / "metadata" / "*.parquet"))))
    phrases = CLUTTER_STYLES["blobs" if tag.startswith("unseen") else "stripes"]
    has_phrase = np.array([any(p in c for p in phrases) for c in captions["caption"]])
    model = NcleanerModel.load(work / "models" / tag / "disncl")
    with torch.no_grad():
        split = model.heads(f_v, f_t)
    out = {"share with a clutter phrase": float(has_phrase.mean())}
    for name, x in (("F_T (backbone)", f_t), ("T_S (MII)", split.t_s), ("T_X (MEI)", split.t_x)):
        scores = cross_val_score(LogisticRegression(max_iter=2000), x.numpy(), has_phrase, cv=5, scoring="roc_auc")
        out[name] = float(scores.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("pools", nargs="+", help="pool tags (directories under WORKDIR/models)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for tag in args.pools:
        print(tag + ": " + ", ".join(f"{k} {v:.3f}" for k, v in probe(args.workdir, tag).items()), flush=True)


if __name__ == "__main__":
    main()
