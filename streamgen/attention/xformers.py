"""xformers memory-efficient attention backend (CUDA only), with a native paged path.

Written against xformers' documented API:

* dense: ``xformers.ops.memory_efficient_attention(q, k, v, attn_bias=...)`` with
  ``[B, M, H, K]`` tensors (our ``[B, L, H, D]`` layout as is);
* paged: ``fmha.attn_bias.PagedBlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_seqlen,
  block_tables, page_size)`` with queries packed as ``[1, sum(Lq), H, D]`` and the pool seen
  as ``[1, num_blocks * page, H, D]``; ``memory_efficient_attention_forward`` reads pages
  through the block table, no copy;
* split (a masked call under the rolling window): ``memory_efficient_attention_partial`` with the
  same paged mask over each row's fully visible pages returns the output and its log-sum-exp
  (float32, packed ``[1, H, sum(Lq)]`` for this varlen mask), merged with the few partially visible
  pages, gathered and attended densely (:class:`~streamgen.attention.paged_common.PagedSplit`).

The paged kernel (Triton split-K) needs ``page % 64 == 0`` and reads the first
``kv_seqlen[b]`` tokens of a row's pages. Latent frames rarely have a multiple of 64 tokens
(Wan 1.3B: 1560), so the cache's page size is chosen in tokens (256 for Wan 1.3B). For other
page sizes this backend gathers the visible tokens and uses ``BlockDiagonalPaddedKeysMask`` on
them; :meth:`paged_layout` says which path a call takes, so the choice is inspectable rather than
silent.

``create()`` raises :class:`BackendUnavailableError` when the package or CUDA is missing;
the package is never imported at module import time.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from streamgen.attention import BackendUnavailableError
from streamgen.attention.paged_common import (
    HostLengths,
    PagedSplit,
    check_paged_inputs,
    gather_visible,
    prefix_kernel_layout,
    with_tail,
)

PAGE_MULTIPLE = 64  # Triton split-K paged kernel constraint (tokens per page)


class XFormersBackend:
    """Memory-efficient attention from xformers; see the module docstring for constraints."""

    name = "xformers"

    def __init__(self, xops: ModuleType, attn_bias: ModuleType) -> None:
        self._xops = xops
        self._attn_bias = attn_bias

    @staticmethod
    def paged_layout(block_size_tokens: int, *, masked: bool = False, device: torch.device | None = None) -> str:
        """``"direct"`` or ``"split"`` if the kernel reads pages in place, else ``"gather (why)"``."""
        return prefix_kernel_layout(block_size_tokens, PAGE_MULTIPLE, masked=masked, splits=True)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        bias: Any = None
        if mask is not None:
            batch, q_len, heads, _ = q.shape
            kv_len = k.shape[1]
            # xformers wants an additive bias whose last dim is 8-aligned in memory: allocate
            # padded, then slice (the documented workaround).
            padded = -(-kv_len // 8) * 8
            bias = torch.zeros(batch, heads, q_len, padded, dtype=q.dtype, device=q.device)[..., :kv_len]
            bias.masked_fill_(~mask.expand(batch, 1, q_len, kv_len), float("-inf"))
        return self._xops.memory_efficient_attention(q, k, v, attn_bias=bias)

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        kv_valid: torch.Tensor | None = None, *,
                        lengths: HostLengths | None = None) -> torch.Tensor:
        lens = check_paged_inputs(q, k_pool, v_pool, block_table, seq_lens, kv_valid, lengths=lengths)
        batch, q_len, heads, head_dim = q.shape
        num_blocks, page = k_pool.shape[:2]
        q_packed = q.reshape(1, batch * q_len, heads, head_dim)  # [1, B * Lq, H, D]
        # "split" needs the cache's PagedSplit (paged_attention_split); here a masked call gathers.
        if self.paged_layout(page, masked=kv_valid is not None) == "direct":
            bias = self._attn_bias.PagedBlockDiagonalPaddedKeysMask.from_seqlens(
                q_seqlen=[q_len] * batch, kv_seqlen=lens, block_tables=block_table, page_size=page)
            k = k_pool.view(1, num_blocks * page, heads, head_dim)
            v = v_pool.view(1, num_blocks * page, heads, head_dim)
        else:
            # [B, n, H, D]
            k_dense, v_dense, counts = gather_visible(k_pool, v_pool, block_table, lens, kv_valid, lengths)
            padding = k_dense.shape[1]
            bias = self._attn_bias.BlockDiagonalPaddedKeysMask.from_seqlens(
                q_seqlen=[q_len] * batch, kv_padding=padding, kv_seqlen=counts)
            k = k_dense.reshape(1, batch * padding, heads, head_dim)
            v = v_dense.reshape(1, batch * padding, heads, head_dim)
        out = self._xops.memory_efficient_attention_forward(q_packed, k, v, attn_bias=bias)
        return out.view(batch, q_len, heads, head_dim)

    def paged_attention_split(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                              block_table: torch.Tensor, split: PagedSplit) -> torch.Tensor:
        """A masked call as the cache cut it: each row's fully visible pages (the first
        ``split.head_lengths[b]`` tokens of ``block_table``) read in place by the paged kernel as a
        partial attention, the partially visible ``split.tail_table`` pages gathered
        (``split.tail_valid``), merged by log-sum-exp. Equals :meth:`paged_attention` with the call's
        ``kv_valid``."""
        num_blocks, page = k_pool.shape[:2]
        if page % PAGE_MULTIPLE:
            raise ValueError(f"a split paged call needs pages of a multiple of {PAGE_MULTIPLE} tokens, got {page}")
        batch, q_len, heads, head_dim = q.shape
        bias = self._attn_bias.PagedBlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[q_len] * batch, kv_seqlen=list(split.head_lengths), block_tables=block_table, page_size=page)
        head, head_lse = self._xops.memory_efficient_attention_partial(
            q.reshape(1, batch * q_len, heads, head_dim), k_pool.view(1, num_blocks * page, heads, head_dim),
            v_pool.view(1, num_blocks * page, heads, head_dim), attn_bias=bias)
        return with_tail(q, k_pool, v_pool, split, head.view(batch, q_len, heads, head_dim),
                         packed_lse_rows(head_lse, batch, q_len))


def packed_lse_rows(lse: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
    """xformers' log-sum-exp for a varlen (packed) mask, ``[1, H, M]`` with ``M >= batch * q_len``
    (some kernels pad ``M``), as ``[B, H, Lq]``. Any other layout is an error, not a guess."""
    if lse.dim() != 3 or lse.shape[0] != 1 or lse.shape[2] < batch * q_len:
        raise ValueError(f"xformers returned a log-sum-exp of shape {tuple(lse.shape)}; expected the packed "
                         f"[1, H, >= {batch * q_len}] layout of a varlen mask")
    heads = lse.shape[1]
    return lse[:, :, :batch * q_len].reshape(heads, batch, q_len).transpose(0, 1)


def create() -> XFormersBackend:
    """Build the backend, or raise :class:`BackendUnavailableError` naming what is missing."""
    try:
        import xformers.ops as xops
        from xformers.ops.fmha import attn_bias
    except ImportError as exc:
        raise BackendUnavailableError(
            f"attention backend 'xformers' needs the 'xformers' package, which cannot be imported ({exc}); "
            "install it on a CUDA machine with a matching torch build") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("attention backend 'xformers' needs a CUDA device; "
                                      "torch.cuda.is_available() is False")
    return XFormersBackend(xops, attn_bias)
