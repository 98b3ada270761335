"""Noisy-correspondence injection as the literature does it (NCR, Huang et al., NeurIPS 2021).

A fraction of the pairs has its captions permuted among themselves, so every
caption still occurs exactly once but no longer describes its own image.
"""

from __future__ import annotations

import numpy as np


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
