"""DMD pure functions: exact values, the surrogate loss's gradient, score timesteps and CFG."""

from __future__ import annotations

import pytest
import torch

from streamgen.model.sampler import velocity_target
from trainer.losses.dmd import cfg_combine, critic_flow_loss, dmd_gradient, dmd_loss, sample_score_timesteps


def test_dmd_gradient_exact_values() -> None:
    # Two samples [B=2, C=1, F=1, H=1, W=2]; normaliser = per-sample mean|x - real|.
    x = torch.tensor([1.0, 3.0, 0.0, 0.0]).view(2, 1, 1, 1, 2)
    real = torch.tensor([0.0, 1.0, 2.0, -2.0]).view(2, 1, 1, 1, 2)
    fake = torch.tensor([3.0, 1.0, 1.0, 0.0]).view(2, 1, 1, 1, 2)
    grad = dmd_gradient(x, real, fake)
    # sample 0: |x - real| = [1, 2] -> mean 1.5; fake - real = [3, 0]
    # sample 1: |x - real| = [2, 2] -> mean 2.0; fake - real = [-1, 2]
    expected = torch.tensor([2.0, 0.0, -0.5, 1.0]).view(2, 1, 1, 1, 2)
    assert grad.dtype == torch.float32
    assert torch.equal(grad, expected)


def test_dmd_gradient_is_detached_float32_and_guarded() -> None:
    x = torch.randn(2, 3, 2, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    grad = dmd_gradient(x, x.detach().float(), torch.ones(2, 3, 2, 2, 2))  # normaliser 0 -> floored by eps
    assert grad.dtype == torch.float32 and not grad.requires_grad
    assert torch.isfinite(grad).all()
    nan_fake = torch.full((2, 3, 2, 2, 2), float("nan"))
    assert torch.equal(dmd_gradient(torch.ones(2, 3, 2, 2, 2), torch.zeros(2, 3, 2, 2, 2), nan_fake),
                       torch.zeros(2, 3, 2, 2, 2))


def test_dmd_loss_gradient_is_grad_over_numel() -> None:
    x = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    grad = torch.randn(2, 4, 3, 2, 2)
    loss = dmd_loss(x, grad)
    loss.backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss, 0.5 * grad.square().mean())


def test_dmd_loss_moves_x_against_grad() -> None:
    # One SGD step on the surrogate is x <- x - lr * grad / numel: towards real when fake != real.
    x = torch.zeros(1, 1, 1, 1, 4, requires_grad=True)
    real, fake = torch.ones(1, 1, 1, 1, 4), torch.zeros(1, 1, 1, 1, 4)
    dmd_loss(x, dmd_gradient(x, real, fake)).backward()
    assert x.grad is not None and (x.grad < 0).all()  # descending moves x up, towards real = 1


def test_score_timesteps_range_and_determinism() -> None:
    t = sample_score_timesteps(10_000, torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and t.dtype == torch.float32
    assert float(t.min()) >= 20.0 and float(t.max()) <= 980.0
    assert float(t.min()) == 20.0 and float(t.max()) == 980.0  # both clamps are hit with 10k draws
    again = sample_score_timesteps(10_000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_score_timesteps_shift() -> None:
    gen = torch.Generator().manual_seed(1)
    unshifted = sample_score_timesteps(20_000, gen, shift=1.0, min_t=0.0, max_t=1000.0)
    assert float(unshifted.median()) == pytest.approx(500.0, abs=15.0)
    # shift 5 maps the median u = 0.5 to 1000 * 5 * 0.5 / (1 + 4 * 0.5) = 833.3
    shifted = sample_score_timesteps(20_000, torch.Generator().manual_seed(1), shift=5.0, min_t=0.0, max_t=1000.0)
    assert float(shifted.median()) == pytest.approx(2500.0 / 3.0, abs=10.0)
    # Same draws: the warp is monotone and exact.
    u = unshifted.double() / 1000
    torch.testing.assert_close(shifted.double(), 1000 * 5 * u / (1 + 4 * u), rtol=1e-5, atol=1e-3)


def test_score_timesteps_rejects_bad_range() -> None:
    with pytest.raises(ValueError, match="min_t"):
        sample_score_timesteps(4, torch.Generator(), min_t=500.0, max_t=100.0)


def test_cfg_combine() -> None:
    cond, uncond = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    assert torch.equal(cfg_combine(cond, uncond, 4.0), torch.tensor([9.0, 1.0]))
    # Self-Forcing's cond + 3 (cond - uncond) is scale 4 here.
    assert torch.equal(cfg_combine(cond, uncond, 4.0), cond + 3.0 * (cond - uncond))


def test_critic_flow_loss_zero_at_exact_velocity() -> None:
    x0, noise = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    exact = velocity_target(x0, noise)
    assert float(critic_flow_loss(exact, x0, noise)) == 0.0
    v = torch.zeros_like(exact, requires_grad=True)
    loss = critic_flow_loss(v, x0, noise)
    torch.testing.assert_close(loss, exact.square().mean())
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # x0 is a detached generator sample: no gradient reaches it.
    x0_leaf = x0.clone().requires_grad_(True)
    critic_flow_loss(torch.zeros_like(exact, requires_grad=True), x0_leaf, noise).backward()
    assert x0_leaf.grad is None
