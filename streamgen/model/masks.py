"""Attention masks for the offline (full-sequence) reference of chunked generation.

Streaming generation with a KV cache must equal one forward over the whole sequence under
the mask built here; tests hold the two against each other. The rule is the caches' own
(:func:`streamgen.cache.window.in_window`): a query frame in the chunk ending at frame ``end``
sees key frame ``j`` iff ``j < end`` and ``j`` is in the window ending at ``end``.
"""

from __future__ import annotations

import torch

from streamgen.cache.window import in_window
from streamgen.config import CacheConfig


def chunk_ends(num_frames: int, chunk_sizes: list[int] | int) -> torch.Tensor:
    """``[num_frames]`` long: the exclusive end frame of the chunk holding each frame.

    ``chunk_sizes`` is either a fixed chunk length (the last chunk may be shorter) or an
    explicit list that must cover exactly ``num_frames`` frames.
    """
    if isinstance(chunk_sizes, int):
        if chunk_sizes <= 0:
            raise ValueError(f"chunk size must be > 0, got {chunk_sizes}")
        sizes = [min(chunk_sizes, num_frames - s) for s in range(0, num_frames, chunk_sizes)]
    else:
        sizes = list(chunk_sizes)
        if any(s <= 0 for s in sizes) or sum(sizes) != num_frames:
            raise ValueError(f"chunk sizes {sizes} must be positive and sum to {num_frames}")
    ends = []
    end = 0
    for size in sizes:
        end += size
        ends.extend([end] * size)
    return torch.tensor(ends, dtype=torch.long)


def frame_visibility(
    num_frames: int,
    chunk_sizes: list[int] | int,
    window_frames: int | None = None,
    sink_frames: int = 0,
) -> torch.Tensor:
    """Bool ``[F, F]``: query frame ``i`` may attend to key frame ``j``."""
    ends = chunk_ends(num_frames, chunk_sizes)[:, None]  # [F, 1]
    j = torch.arange(num_frames)[None, :]  # [1, F]
    return (j < ends) & in_window(CacheConfig(window_frames, sink_frames), j, ends)


def block_causal_mask(
    num_frames: int,
    tokens_per_frame: int,
    chunk_sizes: list[int] | int,
    window_frames: int | None = None,
    sink_frames: int = 0,
) -> torch.Tensor:
    """Token-level bool mask ``[F * T, F * T]`` (True = may attend) for frame-major tokens."""
    vis = frame_visibility(num_frames, chunk_sizes, window_frames, sink_frames)
    return vis.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
