"""Temporal-consistency loss on latent (or pixel) videos ``[B, C, F, H, W]``.

Frame-to-frame differences ``d_f = x_{f+1} - x_f`` carry a video's motion. Two uses:

* with a ``reference`` (e.g. the teacher's video for the same noise, or ground truth), match
  the differences: ``mean((d(x) - d(reference))^2)``. The loss leaves content free and only ties
  the *motion* to the reference's, so it does not fight the distribution-matching gradient;
* without one, penalise the mean squared frame difference ``mean(d(x)^2)``: a flicker/jitter
  prior. It also rewards frozen video, so keep its weight small.
"""

from __future__ import annotations

import torch


def frame_differences(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, H, W] -> [B, C, F - 1, H, W]``: ``x[:, :, f + 1] - x[:, :, f]`` in float32."""
    x = x.float()
    return x[:, :, 1:] - x[:, :, :-1]


def temporal_consistency_loss(x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Temporal consistency of ``x`` (``[B, C, F, H, W]``); scalar float32.

    With ``reference`` (same shape, detached here): ``mean((d(x) - d(reference))^2)``.
    Without: ``mean(d(x)^2)``. A single frame has no differences: the loss is then an exact zero
    that stays attached to the graph (so a training step over one-frame chunks still runs).
    """
    if x.ndim != 5:
        raise ValueError(f"x must be [B, C, F, H, W], got {tuple(x.shape)}")
    if reference is not None and reference.shape != x.shape:
        raise ValueError(f"reference {tuple(reference.shape)} must match x {tuple(x.shape)}")
    if x.shape[2] < 2:
        return x.float().sum() * 0.0
    diff = frame_differences(x)
    if reference is not None:
        diff = diff - frame_differences(reference.detach())
    return diff.square().mean()
