"""Video grids as PNG files, for looking at reconstructions and samples (never used in training math)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[3, N, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8."""
    x = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def save_video_grid(videos: Sequence[torch.Tensor], labels: Sequence[str], path: str | Path,
                    frame_ids: Sequence[int], label_height: int = 14) -> Path:
    """One row per video (``[3, N, H, W]`` in [-1, 1]): the frames ``frame_ids``, its label above the row."""
    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} labels")
    _, _, h, w = videos[0].shape
    row_h = h + label_height
    canvas = Image.new("RGB", (w * len(frame_ids), row_h * len(videos)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (video, label) in enumerate(zip(videos, labels, strict=True)):
        frames = to_uint8(video)
        draw.text((2, r * row_h + 1), label, fill="black")
        for c, f in enumerate(frame_ids):
            canvas.paste(Image.fromarray(frames[min(f, frames.shape[0] - 1)]), (c * w, r * row_h + label_height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
