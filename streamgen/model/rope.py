"""3-D rotary position embedding over (frame, row, column), as in Wan2.1.

Positions are absolute integers computed on the fly, so there is no maximum length: a
stream may run for hours and frame 10**6 gets its exact angle. Keys are rotated *before*
they are cached, so a rolling cache never has to rewrite a key when it evicts frames.
The head dimension splits like Wan's: ``h = w = 2 * (head_dim // 6)``, ``t = head_dim - h - w``;
each axis uses its own frequency ladder ``theta ** (-2i / axis_dim)``; channel pairs are
interleaved ``(0, 1), (2, 3), ...`` (diffusers' ``repeat_interleave_real=True``).
"""

from __future__ import annotations

import math

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (frame, height, width) axes; each is even."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, axis_dim: int, theta: float) -> torch.Tensor:
    """``positions: [...]`` -> angles ``[..., axis_dim // 2]`` in float64."""
    exponent = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device)[: axis_dim // 2] / axis_dim
    inv_freq = 1.0 / (theta**exponent)
    return positions.to(torch.float64)[..., None] * inv_freq


def rope_freqs(frame_positions: torch.Tensor, grid_h: int, grid_w: int, head_dim: int,
               theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations for tokens laid out frame-major ``(f, h, w)``.

    Args:
        frame_positions: ``[B, F]`` absolute latent-frame index of each frame (int).
    Returns:
        ``[B, F * grid_h * grid_w, 1, head_dim // 2]`` complex64: ``exp(i * angle)`` per channel pair.
    """
    if frame_positions.ndim != 2:
        raise ValueError(f"frame_positions must be [B, F], got shape {tuple(frame_positions.shape)}")
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    batch, num_frames = frame_positions.shape
    device = frame_positions.device
    ang_t = _axis_angles(frame_positions, t_dim, theta)  # [B, F, t/2]
    ang_h = _axis_angles(torch.arange(grid_h, device=device), h_dim, theta)  # [gh, h/2]
    ang_w = _axis_angles(torch.arange(grid_w, device=device), w_dim, theta)  # [gw, w/2]
    angles = torch.cat(
        [
            ang_t[:, :, None, None, :].expand(batch, num_frames, grid_h, grid_w, -1),
            ang_h[None, None, :, None, :].expand(batch, num_frames, grid_h, grid_w, -1),
            ang_w[None, None, None, :, :].expand(batch, num_frames, grid_h, grid_w, -1),
        ],
        dim=-1,
    )  # [B, F, gh, gw, D/2]
    angles = angles.reshape(batch, num_frames * grid_h * grid_w, 1, head_dim // 2)
    # Reduce the (float64) angle before the float32 cast so huge positions keep their precision.
    return torch.polar(torch.ones_like(angles, dtype=torch.float32), torch.remainder(angles, 2 * math.pi).float())


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` of ``x: [B, L, H, D]`` by ``freqs``.

    One complex multiply per pair (in float32): several times faster on CPU than the
    equivalent cos/sin arithmetic on split halves.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, L, H, D/2]
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)
