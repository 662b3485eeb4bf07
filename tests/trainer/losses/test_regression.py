"""DMD regression loss: latent MSE, the LPIPS path's plumbing, and build_lpips's refusals.

The real LPIPS network needs the optional ``lpips`` package and an importable torchvision; the
tests that build it skip with :func:`lpips_unavailable_reason` when either is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.losses.regression import (
    LPIPS_BACKBONE_FILES,
    build_lpips,
    lpips_backbone_path,
    lpips_unavailable_reason,
    regression_loss,
)

REPO = Path(__file__).resolve().parents[3]


class _FrameMSE(nn.Module):
    """Stand-in for LPIPS: per-image MSE ``[M, 1, 1, 1]``; records the shapes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(a.shape))
        return (a - b).square().mean(dim=(1, 2, 3), keepdim=True)


def _decode(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, 4, F, h, w]`` -> a video ``[B, 3, 2F, 2h, 2w]`` in [-1, 1] (differentiable)."""
    rgb = torch.tanh(latents[:, :3])
    return F.interpolate(rgb, scale_factor=(2, 2, 2))


def test_latent_mse_values_and_gradient() -> None:
    teacher = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
    assert regression_loss(teacher.detach().clone(), teacher).item() == 0.0
    student = torch.zeros(2, 4, 3, 4, 4, requires_grad=True)
    loss = regression_loss(student, teacher)
    torch.testing.assert_close(loss, teacher.detach().square().mean())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher's output is a target
    # decode alone changes nothing: without an LPIPS network the loss is the latent MSE.
    torch.testing.assert_close(regression_loss(student, teacher, decode=_decode), loss)


def test_lpips_path_flattens_decoded_frames() -> None:
    lpips = _FrameMSE()
    teacher = torch.randn(2, 4, 3, 4, 4)
    assert regression_loss(teacher.clone(), teacher, decode=_decode, lpips=lpips).item() == 0.0
    student = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
    loss = regression_loss(student, teacher, decode=_decode, lpips=lpips)
    assert lpips.shapes[-1] == (2 * 6, 3, 8, 8)  # B * N frames of 3 x H x W
    expected = (_decode(student) - _decode(teacher)).square().mean()  # equal-size frames: mean of means
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_lpips_needs_decode_and_matching_shapes() -> None:
    x = torch.randn(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="decode"):
        regression_loss(x, x, lpips=_FrameMSE())
    with pytest.raises(ValueError, match="shapes differ"):
        regression_loss(x, x[:, :, :1])
    with pytest.raises(ValueError, match="decode must return"):
        regression_loss(x, x, decode=lambda z: z, lpips=_FrameMSE())  # latents are not RGB videos


def test_build_lpips_rejects_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="alex"):
        build_lpips(net="resnet")


def test_pretrained_backbone_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing may be downloaded
    for net, filename in LPIPS_BACKBONE_FILES.items():
        path = lpips_backbone_path(net)
        assert path == tmp_path / "hub" / "checkpoints" / filename
        with pytest.raises(RuntimeError, match="missing") as err:
            build_lpips(pretrained=True, net=net)
        assert str(path) in str(err.value) and "pnet_rand=True" in str(err.value)


def test_unavailable_lpips_raises_the_reason() -> None:
    reason = lpips_unavailable_reason()
    if reason is None:
        pytest.skip("lpips and torchvision import here; test_real_lpips covers this environment")
    with pytest.raises(RuntimeError) as err:
        build_lpips(pretrained=True, pnet_rand=True)
    assert str(err.value) == reason


def test_real_lpips_random_backbone() -> None:
    reason = lpips_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lpips = build_lpips(pretrained=True, pnet_rand=True)
    assert not any(p.requires_grad for p in lpips.parameters())
    teacher = torch.randn(1, 4, 2, 16, 16)
    assert regression_loss(teacher.clone(), teacher, decode=_decode, lpips=lpips).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(1, 4, 2, 16, 16, requires_grad=True)
    loss = regression_loss(student, teacher, decode=_decode, lpips=lpips)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_loss_modules_do_not_import_lpips() -> None:
    code = ("import sys, trainer.losses.dmd, trainer.losses.gan, trainer.losses.regression, "
            "trainer.losses.temporal, trainer.losses.preservation, trainer.losses.toy; "
            "bad = sorted(m for m in ('lpips', 'torchvision', 'matplotlib') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
