"""Frechet distance: zero for identical sets, closed forms for Gaussians, both sqrtm backends agree."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from trainer.eval.frechet import (
    GaussianStats,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    pca_projection,
    trace_sqrt_product_eigh,
)

BACKENDS = ["eigh"] + (["scipy"] if importlib.util.find_spec("scipy") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_sets_give_zero(backend: str) -> None:
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert frechet_distance(x, x, backend).distance == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_shift_with_equal_covariance_is_the_squared_distance(backend: str) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5))
    cov = a @ a.T + np.eye(5)
    mu1, mu2 = np.zeros(5), np.arange(5.0)
    fd = frechet_distance_from_stats(GaussianStats(mu1, cov, 100), GaussianStats(mu2, cov, 100), backend)
    assert fd == pytest.approx(float(mu2 @ mu2), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_covariances_closed_form(backend: str) -> None:
    """For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sigma1_i - sigma2_i)^2."""
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    fd = frechet_distance_from_stats(GaussianStats(mu1, np.diag(s1), 10), GaussianStats(mu2, np.diag(s2), 10), backend)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    assert fd == pytest.approx(expected, rel=1e-9)


def test_sampled_shifted_gaussians_approach_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) * 2.0 + shift
    # N(0, I) vs N(shift, 4 I): |shift|^2 + 4 * (1 - 2)^2
    assert frechet_distance(a, b).distance == pytest.approx(float(shift @ shift) + 4.0, rel=0.03)


def test_eigh_trace_handles_singular_covariances() -> None:
    """Rank-deficient covariances (fewer samples than dims) must not produce NaN or negative traces."""
    x = np.random.default_rng(3).normal(size=(4, 10))
    stats = feature_stats(x)
    assert np.isfinite(trace_sqrt_product_eigh(stats.cov, stats.cov))
    result = frechet_distance(x, x[::-1], min_samples_per_dim=0)
    assert result.distance == pytest.approx(0.0, abs=1e-8) and result.rank_deficient


@pytest.mark.skipif("scipy" not in BACKENDS, reason="scipy is not installed; only the eigh backend exists")
def test_backends_agree_on_random_covariances() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.3
    assert frechet_distance(a, b, "eigh").distance == pytest.approx(frechet_distance(a, b, "scipy").distance,
                                                                     rel=1e-6)


def test_bad_inputs_raise() -> None:
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="unknown sqrtm backend"):
        frechet_distance(x, x, "magic")
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.ones((5, 3)) * np.arange(5)[:, None], np.ones((5, 4)) * np.arange(5)[:, None])
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def test_too_few_samples_for_the_feature_size_raises() -> None:
    """16 clips of 256-d features (the old 110-117 regime) is refused, not reported biased."""
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="needs at least 512 samples per set"):
        frechet_distance(rng.normal(size=(16, 256)), rng.normal(size=(16, 256)))
    with pytest.raises(ValueError, match="got 40 and 7"):
        frechet_distance(rng.normal(size=(40, 4)), rng.normal(size=(7, 4)))
    assert frechet_distance(rng.normal(size=(8, 4)), rng.normal(size=(8, 4))).feature_dim == 4


def test_pca_projection_keeps_the_reference_axes() -> None:
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(64, 10)) * np.array([5.0, 3.0] + [0.1] * 8)
    mean, axes = pca_projection(ref, 2)
    assert axes.shape == (10, 2)
    # The top two components span the two high-variance coordinates.
    assert (axes[:2] ** 2).sum(axis=0) == pytest.approx([1.0, 1.0], abs=0.01)
    with pytest.raises(ValueError, match="need at least 3 reference samples"):
        pca_projection(ref[:2], 2)
