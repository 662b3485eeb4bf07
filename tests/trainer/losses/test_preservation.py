"""Background- and identity-preservation losses: exact values, masks, gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.preservation import background_preservation_loss, identity_preservation_loss


def test_background_loss_ignores_the_product() -> None:
    ref = torch.randn(2, 4, 3, 4, 4)
    mask = torch.ones(2, 1, 3, 4, 4)
    mask[..., 1:3, 1:3] = 0.0  # the product sits in the middle
    x = ref.clone()
    x[..., 1:3, 1:3] += 5.0  # the product may change freely
    assert float(background_preservation_loss(x, ref, mask)) == 0.0
    x[..., 0, 0] += 2.0  # one background column per (B, C, F) moves by 2
    num_background = 2 * 4 * 3 * (16 - 4)
    expected = 2 * 4 * 3 * 4.0 / num_background
    assert float(background_preservation_loss(x, ref, mask)) == pytest.approx(expected)


def test_background_loss_broadcasts_masks_and_handles_empty() -> None:
    x, ref = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    full = background_preservation_loss(x, ref, torch.ones(1, 1, 1, 1, 1))
    torch.testing.assert_close(full, (x - ref).square().mean())
    assert float(background_preservation_loss(x, ref, torch.zeros(2, 1, 3, 4, 4))) == 0.0
    with pytest.raises(ValueError, match="reference"):
        background_preservation_loss(x, ref[:, :, :2], torch.ones(1))
    with pytest.raises(RuntimeError):
        background_preservation_loss(x, ref, torch.ones(2, 1, 5, 4, 4))  # not broadcastable


def test_background_gradient_only_on_background() -> None:
    x = torch.randn(1, 2, 2, 3, 3, requires_grad=True)
    ref = torch.zeros(1, 2, 2, 3, 3)
    mask = torch.ones(1, 1, 2, 3, 3)
    mask[..., 1, 1] = 0.0
    background_preservation_loss(x, ref, mask).backward()
    assert x.grad is not None
    assert float(x.grad[..., 1, 1].abs().sum()) == 0.0
    assert float(x.grad[..., 0, 0].abs().min()) > 0.0


def test_identity_loss_values() -> None:
    ref = torch.randn(3, 16)
    assert float(identity_preservation_loss(ref.clone(), ref)) == pytest.approx(0.0, abs=1e-6)
    assert float(identity_preservation_loss(4.0 * ref, ref)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(identity_preservation_loss(-ref, ref)) == pytest.approx(2.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(identity_preservation_loss(a, b)) == pytest.approx(1.0)


def test_identity_loss_pools_frames_and_tokens() -> None:
    per_frame = torch.randn(2, 5, 8)  # later frames' features
    first = per_frame.mean(1)  # a reference equal to their mean
    assert float(identity_preservation_loss(per_frame, first)) == pytest.approx(0.0, abs=1e-6)
    assert float(identity_preservation_loss(torch.randn(2, 3, 4, 8), torch.randn(2, 8))) > 0.0
    with pytest.raises(ValueError, match="differ"):
        identity_preservation_loss(torch.randn(2, 5, 8), torch.randn(2, 4))


def test_identity_loss_gradients() -> None:
    feats = torch.randn(2, 4, 8, requires_grad=True)
    ref = torch.randn(2, 8, requires_grad=True)
    loss = identity_preservation_loss(feats, ref)
    assert loss.item() > 0
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert ref.grad is None  # the reference is a target
