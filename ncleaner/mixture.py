"""Two-component Gaussian mixtures over a per-pair statistic (the NCR-style clean/noisy split).

Fitted with scikit-learn; the fitted parameters are plain numbers so that a
model directory can store them as JSON and compute posteriors without pickle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.mixture import GaussianMixture

MIN_VALUES = 8


@dataclass
class TwoComponentMixture:
    """p(v) = sum_k pi_k N(v; mu_k, var_k); ``clean`` indexes the component with the larger mean."""

    weights: list[float]
    means: list[float]
    variances: list[float]
    clean: int

    @classmethod
    def fit(cls, values: np.ndarray, seed: int = 0) -> TwoComponentMixture:
        """Fit by EM (higher values = cleaner). Too few or constant values give a degenerate
        mixture whose posterior is 1 everywhere, since there is nothing to split."""
        values = np.asarray(values, dtype=np.float64).reshape(-1, 1)
        values = values[np.isfinite(values[:, 0])]
        if len(values) < MIN_VALUES or np.ptp(values) < 1e-9:
            mean = float(values.mean()) if len(values) else 0.0
            return cls(weights=[1.0, 0.0], means=[mean, mean], variances=[1.0, 1.0], clean=0)
        gmm = GaussianMixture(
            n_components=2, covariance_type="full", max_iter=200, tol=1e-4, reg_covar=1e-6, random_state=seed
        ).fit(values)
        means = gmm.means_[:, 0].tolist()
        return cls(
            weights=gmm.weights_.tolist(),
            means=means,
            variances=gmm.covariances_[:, 0, 0].tolist(),
            clean=int(np.argmax(means)),
        )

    def clean_posterior(self, values: np.ndarray) -> np.ndarray:
        """p(clean | v) for each value, computed in log space for stability."""
        v = np.asarray(values, dtype=np.float64)[..., None]
        w, mu, var = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.means, self.variances))
        with np.errstate(divide="ignore"):
            log_joint = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (v - mu) ** 2 / var
        log_norm = np.logaddexp(log_joint[..., 0], log_joint[..., 1])
        return np.exp(log_joint[..., self.clean] - log_norm)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TwoComponentMixture:
        return cls(**d)
