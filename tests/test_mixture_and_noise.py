"""The clean/noisy mixture split and the caption-permutation noise."""

from __future__ import annotations

import numpy as np
import pytest

from ncleaner.mixture import TwoComponentMixture
from ncleaner.noise import caption_permutation


def test_mixture_separates_two_modes_and_round_trips():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.8, 0.05, 800), rng.normal(0.2, 0.05, 200)])
    mix = TwoComponentMixture.fit(values)
    post = mix.clean_posterior(values)
    assert (post[:800] > 0.99).mean() > 0.98 and (post[800:] < 0.01).mean() > 0.98
    grid = np.linspace(0.0, 1.0, 50)
    assert np.all(np.diff(mix.clean_posterior(grid)[10:40]) >= 0)  # more similar = cleaner, between the modes
    again = TwoComponentMixture.from_dict(mix.to_dict())
    assert np.allclose(again.clean_posterior(values), post)


def test_mixture_of_constant_values_calls_everything_clean():
    assert np.all(TwoComponentMixture.fit(np.full(100, 0.5)).clean_posterior(np.array([0.1, 0.5, 0.9])) == 1.0)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.6, 1.0])
def test_caption_permutation_is_a_derangement_of_the_chosen_fraction(rate):
    perm = caption_permutation(100, rate, np.random.default_rng(1))
    assert sorted(perm) == list(range(100))  # every caption used exactly once
    assert (perm != np.arange(100)).sum() == round(rate * 100)


def test_caption_permutation_rejects_bad_rates():
    with pytest.raises(ValueError):
        caption_permutation(10, 1.5, np.random.default_rng(0))
