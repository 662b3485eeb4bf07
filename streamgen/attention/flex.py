"""PyTorch ``flex_attention`` backend (``torch.nn.attention.flex_attention``).

Measured here (torch 2.13 CPU, 2 cores): flex runs on CPU both eagerly and under
``torch.compile``. Eagerly it is an unfused reference that materialises the score matrix
(~16x slower than SDPA at 192 x 768 tokens) and PyTorch warns once about that; compiled
it generates a fused CPU kernel but each new shape costs ~11 s of compilation. So on a
CPU the default is eager (correct, cheap to start, used by the parity tests) and
``compile=True`` is an explicit choice for long-running servers with stable shapes.

Paged K/V, two paths (:meth:`FlexBackend.paged_layout` says which one a call takes):

* **direct** (the default on CUDA, compiled through Triton): the whole pool of one layer is
  the key sequence (``[1, H, num_blocks * page, D]``, a view, no copy) and a ``BlockMask``
  built from the block table lists, per sequence, only the KV blocks of its own pages --
  fully visible ones as *full* blocks, pages with dead tokens as *partial* blocks whose
  ``mask_mod`` reads the cache's ``kv_valid`` mask through a physical-page -> table-column
  map. The fused kernel then touches only the visible pages: O(visible context), not O(pool).
  Needs the page size to be a multiple of the KV block (128 tokens).
* **gather**: the visible tokens are gathered into dense K/V and flex runs over those. On a
  CPU this is the only sensible path: eager flex ignores block sparsity and would score every
  pool token. ``paged="direct"`` forces the direct path anyway (tests check its mask logic
  on CPU against SDPA on a small pool).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from streamgen.attention import BackendUnavailableError
from streamgen.attention.paged_common import HostLengths, check_paged_inputs, gather_visible

KV_BLOCK_TOKENS = 128   # flex's default sparse block size; a page must be a whole number of them
Q_BLOCK_TOKENS = 128
PAGED_MODES = ("auto", "direct", "gather")


class FlexBackend:
    """Attention through ``flex_attention``; masks become a ``BlockMask`` built from a ``mask_mod``."""

    name = "flex"

    def __init__(self, compile: bool = False, paged: str = "auto") -> None:
        try:
            from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
        except ImportError as exc:  # torch < 2.5
            raise BackendUnavailableError(f"flex_attention is not available in torch {torch.__version__}: "
                                          f"{exc}") from exc
        if paged not in PAGED_MODES:
            raise ValueError(f"unknown flex paged mode {paged!r}; valid: {', '.join(PAGED_MODES)}")
        self.compiled = compile
        self.paged = paged
        self._block_mask_cls = BlockMask
        self._create_block_mask = create_block_mask
        # Compiled lazily here (never at import) and per instance, so no global state changes.
        self._flex: Callable[..., Any] = torch.compile(flex_attention) if compile else flex_attention
        # The last paged BlockMask and the tensors it was built from: every layer of a forward passes
        # the same plan tensors (never modified in place), so the mask is built once per forward, not per layer. Holding
        # the tensors keeps their ids from being reused while the entry lives.
        self._last_mask: tuple[tuple[Any, ...], Any] | None = None

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

    # ------------------------------------------------------------------ paged

    def paged_layout(self, block_size_tokens: int, *, masked: bool, device: torch.device) -> str:
        if self.paged == "gather":
            return "gather (flex created with paged='gather')"
        if block_size_tokens % KV_BLOCK_TOKENS:
            return (f"gather (page of {block_size_tokens} tokens is not a multiple of "
                    f"flex's {KV_BLOCK_TOKENS}-token block)")
        if self.paged == "direct":
            return "direct"
        if torch.device(device).type != "cuda":
            return "gather (eager flex on a CPU would score every pool token)"
        if not self.compiled:
            return "gather (flex is not compiled: eager flex would score every pool token)"
        return "direct"

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        kv_valid: torch.Tensor | None = None, *,
                        lengths: HostLengths | None = None) -> torch.Tensor:
        if self.paged_layout(k_pool.shape[1], masked=kv_valid is not None, device=q.device) == "direct":
            check_paged_inputs(q, k_pool, v_pool, block_table, seq_lens, kv_valid, read_lengths=False)
            return self._paged_direct(q, k_pool, v_pool, block_table, seq_lens, kv_valid)
        lens = check_paged_inputs(q, k_pool, v_pool, block_table, seq_lens, kv_valid, lengths=lengths)
        k, v, counts = gather_visible(k_pool, v_pool, block_table, lens, kv_valid, lengths)  # [B, max_n, H, D]
        if all(n == counts[0] for n in counts):
            return self.attention(q, k[:, :counts[0]], v[:, :counts[0]])
        return torch.cat([self.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
                          for b, n in enumerate(counts)], dim=0)

    def paged_block_mask(self, block_table: torch.Tensor, seq_lens: torch.Tensor, kv_valid: torch.Tensor | None,
                         num_blocks: int, page: int, q_len: int) -> Any:
        """``BlockMask`` over ``[B, Lq] x [num_blocks * page]`` keys: row ``b`` sees its visible tokens only.

        Built with tensor ops only (no host sync): per table column, the page's KV blocks are
        full (every token visible), partial (some) or absent (none). ``mask_mod`` is exact on its
        own (eager flex evaluates it everywhere); the block lists only let the fused kernel skip.
        """
        device = block_table.device
        batch, width = block_table.shape
        sub = page // KV_BLOCK_TOKENS                               # KV blocks per page
        if kv_valid is None:
            kv_valid = torch.arange(width * page, device=device)[None, :] < seq_lens[:, None].long()
        kv_valid = kv_valid.to(device)
        counts = kv_valid.view(batch, width * sub, KV_BLOCK_TOKENS).sum(-1)     # [B, W * sub]
        full = counts == KV_BLOCK_TOKENS
        partial = (counts > 0) & ~full
        block_ids = (block_table.long()[:, :, None] * sub
                     + torch.arange(sub, device=device)).reshape(batch, width * sub)  # [B, W * sub]
        num_q_blocks = -(-q_len // Q_BLOCK_TOKENS)
        num_kv_blocks = num_blocks * sub

        def listing(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # BlockMask wants, per row, a permutation of *all* KV blocks of the key sequence (the
            # pool) whose first ``num`` entries are the listed ones.
            keep_all = torch.zeros(batch, num_kv_blocks, dtype=torch.bool, device=device)
            keep_all.scatter_(1, block_ids, keep)  # block 0 only pads tables and is never kept
            indices = torch.argsort((~keep_all).to(torch.int8), dim=1, stable=True).to(torch.int32)
            num = keep_all.sum(1).to(torch.int32)
            return (num[:, None, None].expand(batch, 1, num_q_blocks).contiguous(),
                    indices[:, None, None, :].expand(batch, 1, num_q_blocks, num_kv_blocks).contiguous())

        kv_num, kv_indices = listing(partial)
        full_num, full_indices = listing(full)
        # Physical page -> table column of row b (-1: not this row's page). Block 0 pads tables.
        col_of_page = torch.full((batch, num_blocks), -1, dtype=torch.long, device=device)
        cols = torch.arange(width, device=device).expand(batch, width)
        col_of_page.scatter_(1, block_table.long(), cols)
        col_of_page[:, 0] = -1

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            col = col_of_page[b, kv_idx // page]
            return (col >= 0) & kv_valid[b, col.clamp(min=0) * page + kv_idx % page]

        return self._block_mask_cls.from_kv_blocks(kv_num, kv_indices, full_num, full_indices,
                                                   BLOCK_SIZE=(Q_BLOCK_TOKENS, KV_BLOCK_TOKENS), mask_mod=mask_mod,
                                                   seq_lengths=(q_len, num_blocks * page), compute_q_blocks=False)

    def _paged_direct(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, kv_valid: torch.Tensor | None) -> torch.Tensor:
        """The pool as one key sequence shared by the batch, narrowed per row by the block mask."""
        batch, q_len, heads, head_dim = q.shape
        num_blocks, page = k_pool.shape[:2]
        key = (block_table, seq_lens, kv_valid, num_blocks, page, q_len)
        last = self._last_mask
        if last is not None and all(a is b if isinstance(a, torch.Tensor) or a is None else a == b
                                    for a, b in zip(last[0], key, strict=True)):
            block_mask = last[1]
        else:
            block_mask = self.paged_block_mask(block_table, seq_lens, kv_valid, num_blocks, page, q_len)
            self._last_mask = (key, block_mask)
        k = k_pool.view(1, num_blocks * page, heads, head_dim).transpose(1, 2)  # [1, H, N * P, D], no copy
        v = v_pool.view(1, num_blocks * page, heads, head_dim).transpose(1, 2)
        out = self._flex(q.transpose(1, 2), k, v, block_mask=block_mask)     # [B, H, Lq, D]
        return out.transpose(1, 2)


def create(compile: bool | None = None, paged: str = "auto") -> FlexBackend:
    """``compile=None``: compile through Triton when CUDA is available (the fused paged path), else eager."""
    return FlexBackend(compile=torch.cuda.is_available() if compile is None else compile, paged=paged)
