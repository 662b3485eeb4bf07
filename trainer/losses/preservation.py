"""Product-video preservation losses (the issue's PVTT option).

A product stream must keep the scene around the product steady and keep the product itself
recognisable. Two pure losses, both against a detached reference:

* :func:`background_preservation_loss`: masked MSE between a video and a reference video over
  background positions (the renderer gives exact per-frame product masks; ``1 - mask`` is the
  background, downsampled to latent resolution by the caller when ``x`` is latent);
* :func:`identity_preservation_loss`: ``1 - cos`` between pooled features of the product (e.g. the
  attribute classifier's features of later frames vs the first frame's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def background_preservation_loss(x: torch.Tensor, reference: torch.Tensor,
                                 background_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over background positions.

    Args:
        x: ``[B, C, F, H, W]`` generated video or latents (with graph).
        reference: same shape; the target (detached here).
        background_mask: ``[B, 1, F, H, W]`` or anything broadcastable to ``x``; 1 = background,
            0 = product (soft values weight positions).
    Returns:
        scalar float32 ``sum(m (x - ref)^2) / sum(m)`` with ``m`` broadcast to ``x``'s shape
        (so the loss is a per-element mean over the background); 0 when the mask is empty.
    """
    if reference.shape != x.shape:
        raise ValueError(f"reference {tuple(reference.shape)} must match x {tuple(x.shape)}")
    mask = background_mask.float().expand_as(x)  # raises if not broadcastable
    sq = (x.float() - reference.detach().float()).square()
    return (sq * mask).sum() / mask.sum().clamp_min(1.0)


def identity_preservation_loss(features: torch.Tensor, reference_features: torch.Tensor, *,
                               eps: float = 1e-8) -> torch.Tensor:
    """``1 - cos(pool(features), pool(reference_features))``, averaged over the batch.

    Args:
        features: ``[B, D]`` or ``[B, ..., D]`` (e.g. ``[B, F, D]`` per-frame or ``[B, N, D]`` per-token),
            mean-pooled over every dim between batch and the last.
        reference_features: ``[B, D]`` or ``[B, ..., D]``, pooled the same way (detached here).
        eps: cosine-similarity denominator floor.
    Returns:
        scalar float32 in ``[0, 2]``; 0 when the pooled features point the same way.
    """
    pooled, ref = _pool(features), _pool(reference_features.detach())
    if pooled.shape != ref.shape:
        raise ValueError(f"pooled features {tuple(pooled.shape)} and reference {tuple(ref.shape)} differ")
    return (1.0 - F.cosine_similarity(pooled, ref, dim=-1, eps=eps)).mean()


def _pool(features: torch.Tensor) -> torch.Tensor:
    """``[B, ..., D] -> [B, D]`` float32 mean over the middle dims."""
    if features.ndim < 2:
        raise ValueError(f"features must be [B, D] or [B, ..., D], got {tuple(features.shape)}")
    return features.float().flatten(1, -2).mean(dim=1) if features.ndim > 2 else features.float()
