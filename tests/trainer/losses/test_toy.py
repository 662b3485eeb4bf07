"""DMD's 2-D toy (DMD Figure 3): exact mixture scores, ODE pairs, mode seeking vs. regression.

The three DMD runs take a few seconds together on one core (250 generator updates each).
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses.toy import GaussianMixture2D, ToyConfig, ToyResult, mode_coverage, ode_pairs, train_toy

NEAR, FAR = 1, 0  # indices of the (+2, 0) mode, beside which the generator starts, and of (-2, 0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("s", [0.05, 0.3, 0.6, 0.95])
def test_x0_prediction_is_tweedie_of_the_exact_density(s: float) -> None:
    # E[x_0 | x_t] = (x_t + s^2 grad log p_s(x_t)) / (1 - s) for x_t = (1 - s) x_0 + s e.
    mixture = GaussianMixture2D()
    x_t = (torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_(True)
    (score,) = torch.autograd.grad(mixture.log_density(x_t, s).sum(), x_t)
    tweedie = (x_t.detach() + s**2 * score) / (1 - s)
    # float32; dividing by 1 - s amplifies rounding near s = 1
    torch.testing.assert_close(mixture.x0_prediction(x_t.detach(), s), tweedie, rtol=1e-4, atol=2e-5 / (1 - s))


def test_velocity_limits() -> None:
    mixture = GaussianMixture2D(weights=(0.25, 0.75))
    x = torch.randn(16, 2)
    torch.testing.assert_close(mixture.velocity(x, 0.0), -x)  # E[e - x_0 | x_0] = -x_0
    mean = 0.25 * torch.tensor([-2.0, 0.0]) + 0.75 * torch.tensor([2.0, 0.0])
    torch.testing.assert_close(mixture.velocity(x, 1.0), x - mean)  # x_1 = e is independent of x_0


def test_ode_pairs_push_noise_onto_the_mixture() -> None:
    mixture = GaussianMixture2D()
    gen = torch.Generator().manual_seed(0)
    x = ode_pairs(mixture, torch.randn(4000, 2, generator=gen))
    coverage, distance = mode_coverage(x, mixture.mean_tensor())
    assert min(coverage) > 0.45
    assert distance == pytest.approx(0.3 * math.sqrt(math.pi / 2), abs=0.02)  # mean |N(0, 0.3^2 I)| in 2-D
    # The map is the ODE's: the sign of z's first coordinate picks the mode.
    z = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    assert ode_pairs(mixture, z)[:, 0].sign().tolist() == [-1.0, 1.0]


def test_toy_config_validates() -> None:
    with pytest.raises(ValueError, match="score_max_t"):
        ToyConfig(score_max_t=2000.0)
    with pytest.raises(ValueError, match="batch"):
        ToyConfig(batch=0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture2D(weights=(1.0,))


def _report(name: str, r: ToyResult) -> str:
    return (f"{name}: nearest-mode {[round(c, 3) for c in r.coverage]}, "
            f"within 3 std {[round(c, 3) for c in r.on_mode]}, "
            f"mean distance {r.initial_mean_distance:.3f} -> {r.mean_distance:.3f}, {r.seconds:.1f} s")


def test_dmd_seeks_the_nearer_mode_and_regression_recovers_both() -> None:
    """DMD Figure 3. Score timesteps in [20, 350]: the distribution-matching signal is local."""
    dmd = train_toy(ToyConfig(score_max_t=350.0))  # 200 generator updates
    print(_report("DMD", dmd))
    # Moves onto the target: the blob (mean (1.6, 1.0), std 0.5) lands on the (+2, 0) mode with its spread.
    assert dmd.initial_mean_distance > 1.1
    assert dmd.mean_distance < 0.45  # the target's own is 0.3 * sqrt(pi / 2) = 0.376
    torch.testing.assert_close(dmd.final.mean(0), torch.tensor([2.0, 0.0]), atol=0.15, rtol=0)
    assert ((dmd.final.std(0) > 0.22) & (dmd.final.std(0) < 0.4)).all()  # target std 0.3: matched, not a point
    assert dmd.on_mode[NEAR] > 0.9
    # ... but only onto the nearer mode, all along the run.
    assert all(coverage[NEAR] > 0.99 for _, coverage, _ in dmd.history)
    assert dmd.on_mode[FAR] == 0.0

    with_regression = train_toy(ToyConfig(score_max_t=350.0, regression=True, num_steps=400))
    print(_report("DMD + regression", with_regression))
    assert min(with_regression.coverage) > 0.35
    assert min(with_regression.on_mode) > 0.25  # real mass on each mode, not a smear between them
    assert with_regression.mean_distance < 0.85


def test_dmd_full_timestep_range_covers_both_modes_in_2d() -> None:
    """With t up to 980 the high-noise levels see the far mode: here DMD alone covers both (see toy.py)."""
    full = train_toy(ToyConfig(num_steps=400))
    print(_report("DMD, t in [20, 980]", full))
    assert min(full.coverage) > 0.35
    assert min(full.on_mode) > 0.25
    assert full.mean_distance < 0.85
