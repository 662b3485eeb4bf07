"""The rolling-window + sink policy as pure functions of frame indices.

Every cache implementation (paged, contiguous, trainer rollouts) must agree on *which* past
frames a chunk sees and *when* a frame may be dropped; keeping the rule here, free of
tensors and bookkeeping, lets tests state it once and lets the paged manager derive a
session's resident frames from a single integer (its committed frame count).

Rule (absolute latent-frame indices 0, 1, 2, ...). With ``S = sink_frames`` and
``R = window_frames - sink_frames`` (``None`` = unbounded window):

* a chunk covering ``[start, end)`` sees cached frames ``j < start`` with ``j < S`` (pinned
  sinks) or ``j >= end - R``, plus its own frames (bidirectionally);
* after a chunk ending at ``end`` is committed, non-sink frames ``j < end - R`` are evicted,
  so the resident frames are exactly ``{j < end : j < S or j >= end - R}``.

:func:`in_window` is the rule itself; everything else here, the contiguous cache, the offline
attention masks (:mod:`streamgen.model.masks`) and the engine's clean-latent window derive
from it. This module must never import torch at run time or hold state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from streamgen.config import CacheConfig

if TYPE_CHECKING:
    import torch

Frames = TypeVar("Frames", int, "torch.Tensor")


def in_window(cfg: CacheConfig, frame: Frames, end: Frames) -> Frames | bool:
    """The window rule: whether past frame ``frame`` lies in the window of a chunk ending at ``end``.

    True for a sink (``frame < S``) or a recent frame (``frame >= end - R``); always true with an
    unbounded window. The same test says what a chunk ``[start, end)`` sees (``frame < start``)
    and what survives the commit of a chunk ending at ``end`` (``frame < end``). Works
    elementwise on integer tensors (``|``, not ``or``), which is how the offline masks use it.
    """
    recent = cfg.recent_frames
    if recent is None:
        return True
    return (frame < cfg.sink_frames) | (frame >= end - recent)


def _check_span(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"frame span [{start}, {end}) must satisfy 0 <= start <= end")


def is_resident(cfg: CacheConfig, frame: int, num_committed: int) -> bool:
    """Whether ``frame`` is still stored after ``num_committed`` frames were committed."""
    return 0 <= frame < num_committed and bool(in_window(cfg, frame, num_committed))


def resident_frames(cfg: CacheConfig, num_committed: int) -> list[int]:
    """Ascending frame indices stored once ``num_committed`` frames were committed.

    Because eviction happens at every commit, the resident set depends only on the count:
    sinks ``[0, min(S, n))`` plus the most recent ``R`` frames (:func:`in_window` at ``end = n``,
    in closed form so a long stream costs O(window), not O(length)).
    """
    if num_committed < 0:
        raise ValueError(f"num_committed must be >= 0, got {num_committed}")
    recent = cfg.recent_frames
    if recent is None:
        return list(range(num_committed))
    num_sinks = min(cfg.sink_frames, num_committed)
    lo = max(num_sinks, num_committed - recent)
    return list(range(num_sinks)) + list(range(lo, num_committed))


def visible_cached_frames(cfg: CacheConfig, num_committed: int, start: int, end: int) -> list[int]:
    """Ascending cached frames (``j < start``) a chunk ``[start, end)`` attends to.

    ``start`` may be below ``num_committed`` only for a chunk that rewrites stored frames
    (e.g. a re-cache); frames at or after ``start`` are then the chunk's own, not cached ones.
    """
    _check_span(start, end)
    return [j for j in resident_frames(cfg, num_committed) if j < start and in_window(cfg, j, end)]


def frames_evicted_by_commit(cfg: CacheConfig, num_committed_before: int, end: int) -> list[int]:
    """Frames that leave the cache when a chunk ending at ``end`` is committed."""
    _check_span(num_committed_before, end)
    after = set(resident_frames(cfg, end))
    return [j for j in resident_frames(cfg, num_committed_before) if j not in after]


def worst_case_resident_frames(cfg: CacheConfig, chunk_frames: int, total_frames: int | None = None) -> int:
    """Most frames a session ever stores at once, counting a chunk being generated.

    During a forward the chunk's ``chunk_frames`` frames are stored next to the ``S + R``
    frames kept by the last commit (the oldest ``chunk_frames`` of those are invisible but
    only leave at the next commit). With an unbounded window the answer is the session's
    total length, which the caller must then supply.
    """
    if chunk_frames <= 0:
        raise ValueError(f"chunk_frames must be > 0, got {chunk_frames}")
    if total_frames is not None and total_frames <= 0:
        raise ValueError(f"total_frames must be > 0, got {total_frames}")
    # Generation runs in whole chunks, so a session of 10 frames in chunks of 3 writes 12.
    padded_total = None if total_frames is None else -(-total_frames // chunk_frames) * chunk_frames
    recent = cfg.recent_frames
    if recent is None:
        if padded_total is None:
            raise ValueError("window_frames=None keeps every frame, so the worst case is the session length: "
                             "pass total_frames")
        return padded_total
    bound = cfg.sink_frames + recent + chunk_frames
    return bound if total_frames is None else min(bound, padded_total)
