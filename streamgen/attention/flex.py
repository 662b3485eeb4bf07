"""PyTorch ``flex_attention`` backend (``torch.nn.attention.flex_attention``).

Measured here (torch 2.13 CPU, 2 cores): flex runs on CPU both eagerly and under
``torch.compile``. Eagerly it is an unfused reference that materialises the score matrix
(~16x slower than SDPA at 192 x 768 tokens) and PyTorch warns once about that; compiled
it generates a fused CPU kernel but each new shape costs ~11 s of compilation. So the
default is eager (correct, cheap to start, used by the parity tests) and ``compile=True``
is an explicit choice for long-running servers with stable shapes.

Paged K/V are gathered before the call rather than pointing flex at the whole pool with a
page-table ``BlockMask``: eager flex would then materialise scores over *every* pool token,
making each call O(pool) instead of O(visible context).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from streamgen.attention import BackendUnavailableError
from streamgen.attention.paged_common import check_paged_inputs, gather_padded


class FlexBackend:
    """Attention through ``flex_attention``; masks become a ``BlockMask`` built from a ``mask_mod``."""

    name = "flex"

    def __init__(self, compile: bool = False) -> None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:  # torch < 2.5
            raise BackendUnavailableError(f"flex_attention is not available in torch {torch.__version__}: "
                                          f"{exc}") from exc
        self.compiled = compile
        self._create_block_mask = create_block_mask
        # Compiled lazily here (never at import) and per instance, so no global state changes.
        self._flex: Callable[..., Any] = torch.compile(flex_attention) if compile else flex_attention

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as :meth:`SDPABackend.attention`: ``[B, L, H, D]`` in and out."""
        batch, q_len = q.shape[0], q.shape[1]
        kv_len = k.shape[1]
        block_mask = None
        if mask is not None:
            mask4 = mask.expand(batch, 1, q_len, kv_len) if mask.dim() == 2 else mask  # [B, 1, Lq, Lk]
            if mask4.shape != (batch, 1, q_len, kv_len):
                raise ValueError(f"mask must be [Lq, Lk] or [B, 1, Lq, Lk] = [{batch}, 1, {q_len}, {kv_len}], "
                                 f"got {tuple(mask.shape)}")

            def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
                return mask4[b, 0, q_idx, kv_idx]

            block_mask = self._create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len,
                                                 device=q.device)
        # [B, L, H, D] -> [B, H, L, D] for flex, and back.
        out = self._flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Gather pages (see module docstring for why), then one flex call per distinct length."""
        lens = check_paged_inputs(q, k_pool, v_pool, block_table, seq_lens)
        k, v = gather_padded(k_pool, v_pool, block_table)  # [B, max_blocks * page, H, D]
        if all(n == lens[0] for n in lens):
            return self.attention(q, k[:, :lens[0]], v[:, :lens[0]])
        return torch.cat([self.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
                          for b, n in enumerate(lens)], dim=0)


def create(compile: bool = False) -> FlexBackend:
    return FlexBackend(compile=compile)
