"""Frechet distance between two sets of video features (FVD-like, on our classifier's features).

``FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` (Heusel et al. 2017, Eq. 6;
FVD, Unterthiner et al. 2018, uses the same formula on I3D features). Ours uses the
penultimate features of :class:`trainer.eval.classifier.AttributeClassifier`, trained on our
rendered domain, so distances are comparable only between runs that used the same
classifier checkpoint.

The matrix square root has two backends, chosen explicitly:

* ``"eigh"`` (default): ``tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i)`` with ``lambda_i`` the
  eigenvalues of the symmetric PSD matrix ``S_1^{1/2} S_2 S_1^{1/2}`` (similar to
  ``S_1 S_2``). Symmetric eigendecompositions are stable, and tiny negative eigenvalues from
  round-off are clipped to 0; no complex parts to discard.
* ``"scipy"``: ``scipy.linalg.sqrtm(S_1 @ S_2)`` as in the reference FID/FVD code, with the
  usual diagonal jitter when the product is singular and the imaginary part dropped.

Fewer samples than feature dimensions make the covariances rank-deficient and the distance
is dominated by its small-sample bias (16 clips of 256-d features put every model, the
teacher included, at 110-117). So :func:`frechet_distance` refuses fewer than
``min_samples_per_dim`` (default 2) samples per feature dimension on either side, and
:func:`pca_projection` offers the lower-dimensional feature to use instead: the reference
set's top principal components. For small sets prefer KID (:mod:`trainer.eval.stats`),
which is unbiased at any size. This module never loads a model or reads videos.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SQRTM_BACKENDS: tuple[str, ...] = ("eigh", "scipy")


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``[D]`` and covariance ``[D, D]`` of ``num_samples`` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    num_samples: int

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        if self.mean.ndim != 1 or self.cov.shape != (d, d):
            raise ValueError(f"GaussianStats needs mean [D] and cov [D, D], got {self.mean.shape}, {self.cov.shape}")


def feature_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of features ``[N, D]`` (float64; N >= 2)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {x.shape}")
    return GaussianStats(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)), int(x.shape[0]))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product_eigh(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr (S_1 S_2)^{1/2}`` via the eigenvalues of ``S_1^{1/2} S_2 S_1^{1/2}``."""
    root = _psd_sqrt(cov1)
    middle = root @ cov2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def trace_sqrt_product_scipy(cov1: np.ndarray, cov2: np.ndarray, eps: float = 1e-6) -> float:
    """``tr (S_1 S_2)^{1/2}`` with ``scipy.linalg.sqrtm`` (the reference FID implementation)."""
    try:
        from scipy import linalg
    except ImportError as exc:
        raise ValueError("sqrtm backend 'scipy' needs scipy, which is not installed; use 'eigh'") from exc
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * eps
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.trace(covmean))


_TRACE_SQRT: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "eigh": trace_sqrt_product_eigh,
    "scipy": trace_sqrt_product_scipy,
}


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats, backend: str = "eigh") -> float:
    """Frechet distance between two Gaussians (see the module docstring for the formula)."""
    if backend not in _TRACE_SQRT:
        raise ValueError(f"unknown sqrtm backend {backend!r}; valid: {list(SQRTM_BACKENDS)}")
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    diff = a.mean - b.mean
    trace = float(np.trace(a.cov) + np.trace(b.cov)) - 2.0 * _TRACE_SQRT[backend](a.cov, b.cov)
    # Round-off can push an exact 0 slightly negative.
    return max(0.0, float(diff @ diff) + trace)


@dataclass(frozen=True)
class FrechetResult:
    distance: float
    num_a: int
    num_b: int
    feature_dim: int

    @property
    def rank_deficient(self) -> bool:
        """Fewer samples than dimensions on either side: the value is biased upwards."""
        return min(self.num_a, self.num_b) <= self.feature_dim


MIN_SAMPLES_PER_DIM = 2.0


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, backend: str = "eigh",
                     min_samples_per_dim: float = MIN_SAMPLES_PER_DIM) -> FrechetResult:
    """Frechet distance between feature sets ``[N_a, D]`` and ``[N_b, D]``.

    Raises ``ValueError`` when either set has fewer than ``min_samples_per_dim * D`` samples
    (pass 0 only to study the biased regime itself).
    """
    if backend not in _TRACE_SQRT:
        raise ValueError(f"unknown sqrtm backend {backend!r}; valid: {list(SQRTM_BACKENDS)}")
    a, b = feature_stats(features_a), feature_stats(features_b)
    dim = int(a.mean.shape[0])
    if b.mean.shape[0] != dim:
        raise ValueError(f"feature dimensions differ: {dim} vs {b.mean.shape[0]}")
    need = math.ceil(min_samples_per_dim * dim)
    if min(a.num_samples, b.num_samples) < need:
        raise ValueError(f"Frechet distance of {dim}-d features needs at least {need} samples per set "
                         f"({min_samples_per_dim:g} per dimension), got {a.num_samples} and {b.num_samples}: "
                         f"project to fewer dimensions (pca_projection) or use KID")
    distance = frechet_distance_from_stats(a, b, backend)
    if not math.isfinite(distance):
        raise ValueError("Frechet distance is not finite; the features contain NaN or inf")
    return FrechetResult(distance, a.num_samples, b.num_samples, int(a.mean.shape[0]))


def pca_projection(reference: np.ndarray, num_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], components [D, k])`` of the reference features' top ``k = num_dims`` principal axes.

    Project any set with ``(x - mean) @ components``; fitting on the reference alone keeps the
    axes the same for every model compared against it.
    """
    x = np.asarray(reference, dtype=np.float64)
    if x.ndim != 2 or not 1 <= num_dims <= x.shape[1]:
        raise ValueError(f"need reference features [N, D] and 1 <= num_dims <= D, got {x.shape} and {num_dims}")
    if x.shape[0] < num_dims + 1:
        raise ValueError(f"{num_dims} principal components need at least {num_dims + 1} reference samples, "
                         f"got {x.shape[0]}")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:num_dims].T
