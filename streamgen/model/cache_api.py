"""The typed contract between the transformer and any self-attention KV cache.

The model never imports a cache implementation: it receives an object satisfying
:class:`SelfAttentionCache` for one forward call and hands it, per layer, the chunk's
RoPE'd queries, keys and values. The cache decides which past tokens are visible
(rolling window, sinks), whether the new keys are stored, and which attention backend
computes the result. Eviction never happens inside ``attend``; it happens when the
cache's owner commits a chunk, outside the forward.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SelfAttentionCache(Protocol):
    """One forward's view of the past keys/values of each batch element (session)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the current chunk over visible past tokens plus the chunk itself.

        Args:
            layer_idx: transformer block index.
            q, k, v: ``[B, L, H, D]`` for the chunk's ``L`` tokens, keys already RoPE'd at
                their absolute frame positions (so cached keys never need rewriting).

        Returns:
            ``[B, L, H, D]`` attention output. Inside the chunk attention is bidirectional.
        """
        ...
