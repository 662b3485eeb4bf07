"""FlashAttention-2 backend (CUDA, fp16/bf16), with a native paged path.

Written against ``flash_attn``'s documented API:

* dense: ``flash_attn_func(q, k, v)`` with ``(batch, seqlen, nheads, headdim)`` tensors;
* paged: ``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=..., block_table=...)``
  with ``k_cache``/``v_cache`` ``(num_blocks, page_block_size, nheads_k, headdim)``,
  ``block_table`` int32 ``(batch, max_num_blocks_per_seq)``, ``cache_seqlens`` int32
  ``(batch,)``; ``causal=False`` because a chunk attends bidirectionally to everything visible.

The paged kernel needs ``page_block_size % 256 == 0`` (choose the cache's page size in
tokens accordingly: 256 for Wan 1.3B, whose 1560-token frames are a multiple of neither 256
nor 64) and reads the first ``cache_seqlens[b]`` tokens of a row's pages. When the cache passes a
``kv_valid`` mask (a window edge or an evicted frame left dead tokens inside a page: Wan 1.3B's
rolling window with sinks, in steady state), the cache also cuts the call in two
(:class:`~streamgen.attention.paged_common.PagedSplit`): the row's fully visible pages, listed
first, are read in place by the paged kernel (``return_softmax_lse=True``), the at most three
partially visible pages are gathered and attended densely, and the two are merged by their
log-sum-exp (:meth:`paged_attention_split`). Only when the page size does not fit, or a row has no
fully visible page, are all visible tokens gathered into ``(batch, max_len, H, D)`` for the *same*
kernel without a block table. :meth:`paged_layout` reports which path applies.

``create()`` raises :class:`BackendUnavailableError` when the package or CUDA is missing;
the package is never imported at module import time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from streamgen.attention import BackendUnavailableError
from streamgen.attention.paged_common import (
    HostLengths,
    PagedSplit,
    check_paged_inputs,
    gather_visible,
    prefix_kernel_layout,
    valid_counts,
    with_tail,
)

PAGE_MULTIPLE = 256  # flash_attn_with_kvcache: page_block_size must be a multiple of 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


class FlashBackend:
    """FlashAttention-2; see the module docstring for constraints."""

    name = "flash"

    def __init__(self, flash_attn_func: Callable[..., Any], flash_attn_with_kvcache: Callable[..., Any]) -> None:
        self._flash_attn_func = flash_attn_func
        self._flash_attn_with_kvcache = flash_attn_with_kvcache

    @staticmethod
    def paged_layout(block_size_tokens: int, *, masked: bool = False, device: torch.device | None = None) -> str:
        """``"direct"`` if the kernel reads pages in place, else ``"gather (why)"``."""
        return prefix_kernel_layout(block_size_tokens, PAGE_MULTIPLE, masked=masked, splits=True)

    @staticmethod
    def _check(q: torch.Tensor) -> None:
        if q.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"flash attention supports fp16/bf16 only, got {q.dtype}")
        if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
            raise ValueError(f"flash attention needs head_dim <= {MAX_HEAD_DIM} and divisible by 8, "
                             f"got {q.shape[-1]}")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(q)
        if mask is not None:
            raise ValueError("flash attention takes no arbitrary boolean mask; use the sdpa or flex backend "
                             "for masked dense attention")
        return self._flash_attn_func(q, k, v, causal=False)

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        kv_valid: torch.Tensor | None = None, *,
                        lengths: HostLengths | None = None) -> torch.Tensor:
        lens = check_paged_inputs(q, k_pool, v_pool, block_table, seq_lens, kv_valid, lengths=lengths)
        self._check(q)
        # "split" needs the cache's PagedSplit (paged_attention_split); here a masked call gathers.
        if self.paged_layout(k_pool.shape[1], masked=kv_valid is not None) == "direct":
            return self._flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seq_lens,
                                                 block_table=block_table, causal=False)
        k, v, _ = gather_visible(k_pool, v_pool, block_table, lens, kv_valid, lengths)  # [B, max_n, H, D]
        cache_seqlens = valid_counts(kv_valid, seq_lens)
        return self._flash_attn_with_kvcache(q, k.contiguous(), v.contiguous(), cache_seqlens=cache_seqlens,
                                             causal=False)

    def paged_attention_split(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                              block_table: torch.Tensor, split: PagedSplit) -> torch.Tensor:
        """A masked call as the cache cut it: the row's fully visible pages (the first
        ``split.head_lens[b]`` tokens of ``block_table``) read in place by the paged kernel, the
        partially visible ``split.tail_table`` pages gathered (``split.tail_valid``), merged by
        log-sum-exp. Equals :meth:`paged_attention` with the call's ``kv_valid``."""
        self._check(q)
        if k_pool.shape[1] % PAGE_MULTIPLE:
            raise ValueError(f"a split paged call needs pages of a multiple of {PAGE_MULTIPLE} tokens, "
                             f"got {k_pool.shape[1]}")
        head, head_lse = self._flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=split.head_lens,
                                                       block_table=block_table, causal=False,
                                                       return_softmax_lse=True)
        return with_tail(q, k_pool, v_pool, split, head, head_lse)


def create() -> FlashBackend:
    """Build the backend, or raise :class:`BackendUnavailableError` naming what is missing."""
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except ImportError as exc:
        raise BackendUnavailableError(
            f"attention backend 'flash' needs the 'flash_attn' package, which cannot be imported ({exc}); "
            "install flash-attn on a CUDA machine with a matching torch build") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("attention backend 'flash' needs a CUDA device; "
                                      "torch.cuda.is_available() is False")
    return FlashBackend(flash_attn_func, flash_attn_with_kvcache)
