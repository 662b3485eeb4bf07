"""Statistics that hold at the set sizes a CPU can afford: bootstrap intervals, KID, orderings.

* :func:`bootstrap` / :func:`bootstrap_mean`: percentile intervals over clips resampled with
  replacement (Efron & Tibshirani 1993, Ch. 13), seeded, so a report is reproducible.
* :func:`kid`: Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"):
  an unbiased estimate of MMD^2 under the cubic polynomial kernel ``k(x, y) = (x . y / D + 1)^3``.
  Unlike the Frechet distance it has no small-sample bias, so sets of 16-64 clips can be
  compared; it can be slightly negative when the sets match. Our sets are *paired* (generated
  clip ``i`` and reference clip ``i`` share a caption), so equal-sized sets use the paired
  U-statistic of Gretton et al. 2012 (JMLR, Eq. 3): ``sum_{i != j} h(z_i, z_j) / (n (n - 1))``
  with ``h = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)``. It leaves out the
  same-caption cross terms ``k(x_i, y_i)``, which the usual estimator includes and which make
  it biased low for a model that follows its captions (and negative, -2 (mean k(x, x) - mean
  k(x, x')) / n, for a set against itself, where the paired form gives exactly 0). Sets of
  different sizes use the usual unpaired estimate (Binkowski et al., Eq. 2). The interval
  resamples pairs (or each set) with replacement and leaves out pairs of positions that are the
  same original clip, which would otherwise put ``k(x, x)`` into the within-set terms.
* :func:`order`: an ordering claim ("A is better than B") only where the two intervals do not
  overlap; otherwise ``"not separable"``. Overlapping 95 % intervals can still hide a real
  difference, so "not separable" means "this evaluation cannot tell", never "equal".

Pure numpy; this module never reads files or runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
MIN_KID_SAMPLES = 8  # per set: below this the bootstrap interval of KID is not worth reporting
NOT_SEPARABLE = "not separable"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap percentile interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    num_samples: int
    level: float = DEFAULT_LEVEL

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.num_samples, "level": self.level}

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        v, lo, hi = self.value * scale, self.low * scale, self.high * scale
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha))


def bootstrap(statistic: Callable[[np.ndarray], float], num_samples: int, num_resamples: int = DEFAULT_RESAMPLES,
              level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """Percentile interval of ``statistic(indices)`` over resamples of ``range(num_samples)`` with replacement."""
    if num_samples < 1:
        raise ValueError("bootstrap needs at least one sample")
    if num_resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need num_resamples >= 1 and 0 < level < 1, got {num_resamples}, {level}")
    rng = np.random.default_rng(seed)
    point = float(statistic(np.arange(num_samples)))
    draws = np.array([statistic(rng.integers(0, num_samples, num_samples)) for _ in range(num_resamples)],
                     dtype=np.float64)
    low, high = _percentiles(draws, level)
    return Interval(point, low, high, num_samples, level)


def bootstrap_mean(values: np.ndarray | list[float], num_resamples: int = DEFAULT_RESAMPLES,
                   level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """Mean of the finite ``values`` with its bootstrap interval (NaN entries are left out)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    # Resampling a mean is a weighted sum: draw all resamples at once.
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, len(x), (num_resamples, len(x)))].mean(axis=1)
    low, high = _percentiles(draws, level)
    return Interval(float(x.mean()), low, high, len(x), level)


# ---------------------------------------------------------------------------------------------
# KID.


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    """``(x . y / D + coef)^degree`` for ``x [N, D]``, ``y [M, D]`` -> ``[N, M]`` (KID's kernel)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def _mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    """Unbiased MMD^2 of the samples ``ix`` of X and ``iy`` of Y (pairs of one original sample left out)."""
    same_x = ix[:, None] == ix[None, :]
    same_y = iy[:, None] == iy[None, :]
    if same_x.all() or same_y.all():
        return math.nan
    within_x = kxx[np.ix_(ix, ix)][~same_x].mean()
    within_y = kyy[np.ix_(iy, iy)][~same_y].mean()
    return float(within_x + within_y - 2.0 * kxy[np.ix_(ix, iy)].mean())


def _mmd2_paired(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, idx: np.ndarray) -> float:
    """Paired unbiased MMD^2 (Gretton et al. 2012, Eq. 3) of the pairs ``idx``; same-original pairs left out."""
    distinct = idx[:, None] != idx[None, :]
    if not distinct.any():
        return math.nan
    cross = kxy[np.ix_(idx, idx)]
    h = kxx[np.ix_(idx, idx)] + kyy[np.ix_(idx, idx)] - cross - cross.T
    return float(h[distinct].mean())


def kid(features_a: np.ndarray, features_b: np.ndarray, num_resamples: int = DEFAULT_RESAMPLES,
        level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """KID (unbiased MMD^2, cubic polynomial kernel) of ``[N_a, D]`` vs ``[N_b, D]`` with a bootstrap interval.

    Equal sizes: row ``i`` of both sets is a pair (the paired estimate, see the module docstring).
    Raises ``ValueError`` with fewer than :data:`MIN_KID_SAMPLES` samples in either set.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs features [N_a, D] and [N_b, D], got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < MIN_KID_SAMPLES:
        raise ValueError(f"KID needs at least {MIN_KID_SAMPLES} samples per set for an interval, "
                         f"got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("KID features contain NaN or inf")
    kxx, kyy, kxy = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    na, nb = len(a), len(b)
    rng = np.random.default_rng(seed)
    if na == nb:
        point = _mmd2_paired(kxx, kyy, kxy, np.arange(na))
        draws = np.array([_mmd2_paired(kxx, kyy, kxy, rng.integers(0, na, na)) for _ in range(num_resamples)])
    else:
        point = _mmd2(kxx, kyy, kxy, np.arange(na), np.arange(nb))
        draws = np.array([_mmd2(kxx, kyy, kxy, rng.integers(0, na, na), rng.integers(0, nb, nb))
                          for _ in range(num_resamples)])
    low, high = _percentiles(draws, level)
    return Interval(point, low, high, min(na, nb), level)


# ---------------------------------------------------------------------------------------------
# Orderings.


def order(name_a: str, a: Interval, name_b: str, b: Interval, higher_is_better: bool) -> str:
    """``"A better than B"`` when the intervals separate in A's favour, the reverse, or ``"not separable"``."""
    if not all(math.isfinite(v) for v in (a.low, a.high, b.low, b.high)):
        return NOT_SEPARABLE
    a_above = a.low > b.high
    b_above = b.low > a.high
    if not (a_above or b_above):
        return NOT_SEPARABLE
    a_wins = a_above == higher_is_better
    return f"{name_a} better than {name_b}" if a_wins else f"{name_b} better than {name_a}"
