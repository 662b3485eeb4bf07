"""Temporal-consistency loss: exact values, zero cases, gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.temporal import frame_differences, temporal_consistency_loss


def test_without_reference_is_mean_squared_frame_difference() -> None:
    x = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 3, 1, 1)  # differences 1, 2
    assert float(temporal_consistency_loss(x)) == pytest.approx(2.5)
    static = torch.randn(2, 4, 1, 3, 3).expand(2, 4, 5, 3, 3)
    assert float(temporal_consistency_loss(static)) == 0.0


def test_with_reference_matches_motion_not_content() -> None:
    ref = torch.randn(2, 4, 5, 3, 3)
    assert float(temporal_consistency_loss(ref.clone(), ref)) == 0.0
    assert float(temporal_consistency_loss(ref + 7.0, ref)) == pytest.approx(0.0, abs=1e-10)  # same motion
    x = ref.clone()
    x[:, :, 2] += 1.0  # one frame jumps: differences 1 -> 2 and 2 -> 3 change by +1 and -1
    expected = 2 * 2 * 4 * 3 * 3 / (2 * 4 * 4 * 3 * 3)  # two diffs of size 1 over 4 diff frames per element
    assert float(temporal_consistency_loss(x, ref)) == pytest.approx(expected, rel=1e-5)


def test_gradients_and_reference_is_detached() -> None:
    x = torch.randn(1, 2, 4, 2, 2, requires_grad=True)
    ref = torch.randn(1, 2, 4, 2, 2, requires_grad=True)
    loss = temporal_consistency_loss(x, ref)
    assert loss.item() > 0
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert ref.grad is None


def test_single_frame_is_zero_with_graph() -> None:
    x = torch.randn(2, 4, 1, 3, 3, requires_grad=True)
    loss = temporal_consistency_loss(x)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0


def test_validation_and_differences() -> None:
    with pytest.raises(ValueError, match="B, C, F, H, W"):
        temporal_consistency_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="reference"):
        temporal_consistency_loss(torch.randn(1, 1, 3, 2, 2), torch.randn(1, 1, 4, 2, 2))
    x = torch.arange(6.0).view(1, 1, 3, 1, 2)
    assert torch.equal(frame_differences(x), torch.full((1, 1, 2, 1, 2), 2.0))
