"""Contiguous rolling KV cache: the simple reference the paged cache must match.

One tensor per layer holds the keys/values of the cached frames of ``B`` sequences that
advance in lockstep (same frame positions). The policy is :class:`~streamgen.config.CacheConfig`'s
and the rule is :mod:`streamgen.cache.window`'s (the one the paged cache follows): the first
``sink_frames`` frames stay pinned, and after each commit only the most recent
``window_frames - sink_frames`` frames are kept. A chunk covering ``[start, end)`` sees the
cached frames in the window ending at ``end``, plus itself.

It favours obviousness over speed (eviction is a ``torch.cat``); serving uses the paged
cache. It never decides *when* to commit: its owner (sampler, engine, trainer) does.
"""

from __future__ import annotations

import torch

from streamgen.attention import AttentionBackend
from streamgen.cache.window import in_window, is_resident
from streamgen.config import CacheConfig


class ContiguousCacheView:
    """One forward's view of a :class:`ContiguousKVCache` (implements ``SelfAttentionCache``).

    It records the chunk's keys/values per layer; :meth:`ContiguousKVCache.commit` stores them.
    """

    def __init__(self, cache: ContiguousKVCache, start_frame: int, num_frames: int) -> None:
        self.cache = cache
        self.start_frame = start_frame
        self.num_frames = num_frames
        self.new_keys: dict[int, torch.Tensor] = {}
        self.new_values: dict[int, torch.Tensor] = {}
        self._visible = cache.visible_token_index(start_frame + num_frames)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        expected = self.num_frames * self.cache.tokens_per_frame
        if k.shape[1] != expected:
            raise ValueError(f"view covers {self.num_frames} frames ({expected} tokens) but got {k.shape[1]} tokens")
        self.new_keys[layer_idx] = k
        self.new_values[layer_idx] = v
        past_k, past_v = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if past_k is not None:
            if self._visible is not None:
                past_k, past_v = past_k[:, self._visible], past_v[:, self._visible]
            k = torch.cat([past_k.to(k.dtype), k], dim=1)  # [B, L_past + L, H, D]
            v = torch.cat([past_v.to(v.dtype), v], dim=1)
        return self.cache.backend.attention(q, k, v, None)


class ContiguousKVCache:
    """Reference rolling KV cache for ``batch_size`` sequences moving in lockstep."""

    def __init__(self, num_layers: int, tokens_per_frame: int, policy: CacheConfig,
                 backend: AttentionBackend) -> None:
        if num_layers <= 0 or tokens_per_frame <= 0:
            raise ValueError(f"num_layers and tokens_per_frame must be > 0, got {num_layers}, {tokens_per_frame}")
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.policy = policy
        self.backend = backend
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [B, frames*T, H, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.frame_ids: list[int] = []  # absolute indices of cached frames, ascending
        self.next_frame = 0

    @property
    def num_cached_frames(self) -> int:
        return len(self.frame_ids)

    def visible_frame_ids(self, end_frame: int) -> list[int]:
        """Cached frames visible to a chunk ending (exclusive) at ``end_frame``."""
        return [j for j in self.frame_ids if in_window(self.policy, j, end_frame)]

    def visible_token_index(self, end_frame: int) -> torch.Tensor | None:
        """Token positions of the visible frames, or ``None`` when every cached frame is visible."""
        visible = set(self.visible_frame_ids(end_frame))
        if len(visible) == len(self.frame_ids):
            return None
        rows = [i for i, j in enumerate(self.frame_ids) if j in visible]
        t = self.tokens_per_frame
        return torch.tensor([r * t + o for r in rows for o in range(t)], dtype=torch.long)

    def view(self, start_frame: int, num_frames: int) -> ContiguousCacheView:
        if start_frame < self.next_frame:
            raise ValueError(f"chunk starts at frame {start_frame}, but frames up to {self.next_frame - 1} "
                             "are already cached; clear() first to rewrite them")
        if num_frames <= 0:
            raise ValueError(f"num_frames must be > 0, got {num_frames}")
        return ContiguousCacheView(self, start_frame, num_frames)

    def commit(self, view: ContiguousCacheView) -> None:
        """Store the view's keys/values, then evict frames that no later chunk can see."""
        if view.cache is not self:
            raise ValueError("view belongs to another cache")
        if len(view.new_keys) != self.num_layers:
            raise ValueError(f"view saw {len(view.new_keys)} of {self.num_layers} layers; run the forward first")
        if view.start_frame < self.next_frame:
            raise ValueError(f"frames from {view.start_frame} were committed already")
        for i in range(self.num_layers):
            k, v = view.new_keys[i].detach(), view.new_values[i].detach()
            old_k, old_v = self.keys[i], self.values[i]
            self.keys[i] = k if old_k is None else torch.cat([old_k, k], dim=1)
            self.values[i] = v if old_v is None else torch.cat([old_v, v], dim=1)
        self.frame_ids.extend(range(view.start_frame, view.start_frame + view.num_frames))
        self.next_frame = view.start_frame + view.num_frames
        self._evict()

    def _evict(self) -> None:
        drop = {j for j in self.frame_ids if not is_resident(self.policy, j, self.next_frame)}
        if not drop:
            return
        keep_rows = [i for i, j in enumerate(self.frame_ids) if j not in drop]
        t = self.tokens_per_frame
        index = torch.tensor([r * t + o for r in keep_rows for o in range(t)], dtype=torch.long)
        for i in range(self.num_layers):
            self.keys[i] = self.keys[i][:, index]  # type: ignore[index]
            self.values[i] = self.values[i][:, index]  # type: ignore[index]
        self.frame_ids = [j for j in self.frame_ids if j not in drop]

    def clear(self) -> None:
        """Forget everything (e.g. before re-caching under a new prompt)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.frame_ids = []
        self.next_frame = 0
