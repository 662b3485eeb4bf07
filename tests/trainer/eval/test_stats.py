"""Bootstrap intervals, KID and the "not separable" rule on constructed features."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.eval.stats import NOT_SEPARABLE, Interval, bootstrap, bootstrap_mean, kid, order


def test_bootstrap_mean_interval_covers_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 16))
    large = bootstrap_mean(rng.normal(1.0, 1.0, 400))
    assert small.low < small.value < small.high and large.low < large.value < large.high
    assert large.high - large.low < (small.high - small.low) / 2
    assert large.contains(1.0)


def test_bootstrap_mean_skips_nan_and_is_nan_when_empty() -> None:
    assert bootstrap_mean([1.0, np.nan, 3.0]).value == pytest.approx(2.0)
    assert bootstrap_mean([np.nan]).num_samples == 0 and np.isnan(bootstrap_mean([]).value)


def test_bootstrap_of_a_statistic_is_seeded() -> None:
    x = np.random.default_rng(1).normal(size=30)
    a = bootstrap(lambda i: float(np.median(x[i])), len(x), seed=3)
    b = bootstrap(lambda i: float(np.median(x[i])), len(x), seed=3)
    assert a == b and a.value == pytest.approx(float(np.median(x)))


def test_kid_of_a_set_against_itself_is_about_zero() -> None:
    x = np.random.default_rng(2).normal(size=(64, 32))
    shifted = x + 0.5
    same = kid(x, x)
    different = kid(x, shifted)
    # The paired estimate of a set against itself is exactly 0 (the unpaired one would be -0.2 here).
    assert same.value == pytest.approx(0.0, abs=1e-9) and same.contains(0.0)
    assert different.low > 0


def test_unpaired_kid_of_unequal_sets() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(80, 16))
    assert kid(rng.normal(size=(40, 16)), ref).contains(0.0)
    assert kid(rng.normal(size=(40, 16)) + 0.5, ref).low > 0


def test_kid_separates_two_distributions_and_not_two_samples_of_one() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(64, 32))
    twin = rng.normal(size=(64, 32))  # same distribution, other samples
    other = rng.normal(size=(64, 32)) * 1.3 + 0.3
    k_twin, k_other = kid(twin, ref), kid(other, ref)
    assert k_twin.contains(0.0)
    assert k_other.value > 0 and k_other.low > 0
    assert order("twin", k_twin, "other", k_other, higher_is_better=False) == "twin better than other"


def test_kid_with_too_few_samples_raises() -> None:
    x = np.zeros((7, 4))
    with pytest.raises(ValueError, match="at least 8 samples"):
        kid(x, np.zeros((20, 4)))
    with pytest.raises(ValueError, match=r"\[N_a, D\]"):
        kid(np.zeros((10, 4)), np.zeros((10, 5)))


def test_order_claims_only_separated_intervals() -> None:
    a = Interval(0.80, 0.75, 0.85, 64)
    b = Interval(0.60, 0.55, 0.65, 64)
    c = Interval(0.70, 0.62, 0.78, 64)  # overlaps both
    assert order("A", a, "B", b, higher_is_better=True) == "A better than B"
    assert order("A", a, "B", b, higher_is_better=False) == "B better than A"
    assert order("A", a, "C", c, higher_is_better=True) == NOT_SEPARABLE
    assert order("B", b, "C", c, higher_is_better=True) == NOT_SEPARABLE
    assert order("A", a, "N", Interval(float("nan"), float("nan"), float("nan"), 0), True) == NOT_SEPARABLE
