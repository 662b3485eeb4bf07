"""DMD's regression loss on teacher ODE pairs (Yin et al. 2024, arXiv 2311.18828, section 3.3).

DMD pairs noise ``z`` with the teacher's deterministic ODE output ``y = teacher_ode(z)`` and
regresses the generator on them, ``L_reg = d(G(z), y)``, next to the distribution-matching
gradient. The pairs pin the generator's large-scale mapping from noise to modes, which keeps
reverse-KL distribution matching from collapsing onto the nearest mode (the toy in
:mod:`trainer.losses.toy` shows it). DMD uses LPIPS on decoded images for ``d``; latent MSE is the
fallback when no LPIPS network is handed in.

LPIPS comes from the optional :mod:`lpips` package (extra ``lpips``), which imports torchvision.
It is imported only inside :func:`build_lpips`, never at module import. :func:`build_lpips`
refuses, with a message naming the missing piece, before anything could reach the network:
pretrained ImageNet backbone weights must already be in the torch hub cache.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Backbones lpips offers, and the file torchvision's ImageNet weights are cached as
#: (``<torch.hub.get_dir()>/checkpoints/<file>``; torchvision 0.28's weight URLs).
LPIPS_BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
#: Version of lpips' calibrated linear heads (``lpips/weights/v0.1/<net>.pth``, shipped in the package).
LPIPS_VERSION = "0.1"


def regression_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor, *,
                    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    lpips: nn.Module | None = None) -> torch.Tensor:
    """Distance between the student's output and the teacher's ODE output for the same noise.

    Args:
        student_x0: ``[B, C, F, H, W]`` student latents (with graph).
        teacher_x0: ``[B, C, F, H, W]`` teacher ODE latents (the target; detached here).
        decode: latents ``[B, C, F, H, W]`` -> video ``[B, 3, N, H', W']`` in ``[-1, 1]`` (the VAE decoder,
            differentiable). Used only with ``lpips``.
        lpips: an LPIPS network from :func:`build_lpips` (``(a, b) -> [M, 1, 1, 1]`` on images
            ``[M, 3, H', W']`` in ``[-1, 1]``).
    Returns:
        scalar float32: LPIPS averaged over all decoded frames (frames flattened into the batch)
        when ``lpips`` is given, else the latent MSE. ``decode`` without ``lpips`` is ignored.
    """
    if student_x0.shape != teacher_x0.shape:
        raise ValueError(f"student {tuple(student_x0.shape)} and teacher {tuple(teacher_x0.shape)} shapes differ")
    target = teacher_x0.detach()
    if lpips is None:
        return F.mse_loss(student_x0.float(), target.float())
    if decode is None:
        raise ValueError("LPIPS compares decoded frames: pass decode= together with lpips=")
    video = decode(student_x0)
    with torch.no_grad():
        target_video = decode(target)
    if video.ndim != 5 or video.shape[1] != 3 or video.shape != target_video.shape:
        raise ValueError(f"decode must return [B, 3, N, H, W] videos, got {tuple(video.shape)}")
    return lpips(_frames(video).float(), _frames(target_video).float()).float().mean()


def _frames(video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, N, H, W] -> [B * N, 3, H, W]`` (frames into the batch, batch-major)."""
    return video.transpose(1, 2).flatten(0, 1)


def lpips_unavailable_reason() -> str | None:
    """Why :func:`build_lpips` cannot work in this environment, or ``None`` if it can.

    The ``lpips`` package imports torchvision, and a torchvision build must match the torch build:
    the torchvision 0.28 wheels on PyPI link CUDA torch libraries and fail to import beside
    torch 2.13.0+cpu, so the CPU install carries neither (see README, "Extras").
    """
    if importlib.util.find_spec("lpips") is None:
        return ("LPIPS needs the optional `lpips` package, which is not installed; install the `lpips` extra "
                "in an environment where torchvision 0.28 imports beside torch 2.13")
    if importlib.util.find_spec("torchvision") is None:
        return "LPIPS needs torchvision (a dependency of the `lpips` package), which is not installed"
    try:
        importlib.import_module("torchvision")
    except Exception as err:  # a CUDA-built torchvision beside a CPU torch fails with RuntimeError/OSError
        return (f"LPIPS needs torchvision, which is installed but does not import beside torch "
                f"{torch.__version__} ({type(err).__name__}: {err}); install a torchvision built for this torch")
    try:
        importlib.import_module("lpips")
    except Exception as err:
        return f"the `lpips` package does not import ({type(err).__name__}: {err})"
    return None


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision keeps (and would download) the ImageNet weights of the LPIPS backbone ``net``."""
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; valid: {sorted(LPIPS_BACKBONE_FILES)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def build_lpips(*, pretrained: bool = True, net: str = "alex", pnet_rand: bool | None = None) -> nn.Module:
    """A frozen LPIPS network (Zhang et al. 2018) from the optional :mod:`lpips` package, in eval mode.

    Args:
        pretrained: load lpips' calibrated linear heads (shipped in the package).
        net: backbone, one of ``alex``, ``vgg``, ``squeeze``.
        pnet_rand: random backbone instead of torchvision's ImageNet weights; ``None`` means
            ``not pretrained``. Tests use ``pretrained=True, pnet_rand=True`` (no download needed).
    Raises:
        ValueError: unknown ``net``.
        RuntimeError: the pretrained backbone weights are not in the torch hub cache (this never
            downloads: the file path is named so it can be put there), or ``lpips``/torchvision
            cannot be imported here (the message is :func:`lpips_unavailable_reason`).
    """
    backbone = lpips_backbone_path(net)
    random_backbone = (not pretrained) if pnet_rand is None else pnet_rand
    if not random_backbone and not backbone.is_file():
        raise RuntimeError(f"LPIPS with a pretrained {net} backbone needs torchvision's ImageNet weights at "
                           f"{backbone}, which is missing (nothing is downloaded); copy the file there, or "
                           f"pass pnet_rand=True for a random backbone")
    reason = lpips_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    lpips_mod = importlib.import_module("lpips")
    if pretrained:
        heads = Path(lpips_mod.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"
        if not heads.is_file():
            raise RuntimeError(f"LPIPS linear-head weights missing at {heads}; reinstall the `lpips` package")
    model: nn.Module = lpips_mod.LPIPS(pretrained=pretrained, net=net, version=LPIPS_VERSION,
                                       pnet_rand=random_backbone, verbose=False)
    return model.eval().requires_grad_(False)
