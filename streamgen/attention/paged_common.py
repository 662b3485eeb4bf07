"""Shared checks and page gathers for backends' ``paged_attention`` entry points.

A backend without a paged kernel (SDPA, flex on CPU) turns a block table back into dense
K/V here; a backend with one (flash, xformers, flex on CUDA) uses the same input checks, so
every backend rejects a malformed block table with the same ``ValueError`` instead of reading
garbage. This module never decides *which* tokens a sequence sees: that is the cache's job,
handed over as ``seq_lens`` and, when a window edge leaves dead tokens inside a page, a
``kv_valid`` mask over the row's token positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostLengths:
    """``seq_lens`` (and ``kv_valid``'s per-row counts) as Python ints, known to the caller before the
    forward (the KV manager builds them with the plan), so a gathering backend never reads them back
    from the device: on CUDA that read is a host sync in every layer."""

    seq_lens: tuple[int, ...]
    valid_counts: tuple[int, ...] | None = None  # None: no kv_valid (the visible keys are the prefix)


def prefix_kernel_layout(block_size_tokens: int, page_multiple: int, *, masked: bool,
                         splits: bool = False) -> str:
    """``"direct"``, ``"split"`` or ``"gather (why)"`` for a paged kernel that reads the first ``seq_len``
    tokens of each row's pages (flash-attn, xformers) and needs pages of a multiple of ``page_multiple``
    tokens. ``splits``: the backend can serve a masked call as a prefix read in place plus a few
    gathered partial pages (:class:`PagedSplit`)."""
    if block_size_tokens % page_multiple:
        return f"gather (page of {block_size_tokens} tokens is not a multiple of {page_multiple})"
    if masked:
        if splits:
            return "split"
        return "gather (dead tokens inside a page: the kernel reads only a prefix of each row's pages)"
    return "direct"


def check_paged_inputs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor,
                       kv_valid: torch.Tensor | None = None, *, read_lengths: bool = True,
                       lengths: HostLengths | None = None) -> list[int]:
    """Validate the paged-attention arguments; return ``seq_lens`` as Python ints (from ``lengths``
    when given, without reading the tensor).

    ``q: [B, Lq, H, D]``, ``k_pool, v_pool: [num_blocks, page, H, D]``,
    ``block_table: int32 [B, max_blocks]``, ``seq_lens: int32 [B]``,
    ``kv_valid: bool [B, max_blocks * page]`` or ``None``. ``read_lengths=False`` checks shapes and
    dtypes only and returns ``[]``: reading ``seq_lens`` would make a GPU kernel path wait for the
    device once per layer.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Lq, H, D], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [num_blocks, page, H, D], got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q dtype {q.dtype} does not match pool dtypes {k_pool.dtype}/{v_pool.dtype}")
    if k_pool.shape[2:] != q.shape[2:]:
        raise ValueError(f"q heads/head_dim {tuple(q.shape[2:])} do not match the pool's {tuple(k_pool.shape[2:])}")
    batch = q.shape[0]
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be int32 [B={batch}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens must be int32 [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    capacity = block_table.shape[1] * k_pool.shape[1]
    if kv_valid is not None and (kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (batch, capacity)):
        raise ValueError(f"kv_valid must be bool [B={batch}, max_blocks * page = {capacity}], got "
                         f"{kv_valid.dtype} {tuple(kv_valid.shape)}")
    if not read_lengths:
        return []
    if lengths is not None and len(lengths.seq_lens) != batch:
        raise ValueError(f"lengths has {len(lengths.seq_lens)} rows for a batch of {batch}")
    lens = list(lengths.seq_lens) if lengths is not None else [int(n) for n in seq_lens.tolist()]
    for b, n in enumerate(lens):
        if not 0 < n <= capacity:
            raise ValueError(f"seq_lens[{b}]={n} must lie in [1, max_blocks * page = {capacity}]")
    return lens


def gather_padded(k_pool: torch.Tensor, v_pool: torch.Tensor,
                  block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of every table row laid out contiguously: two ``[B, max_blocks * page, H, D]`` tensors.

    Padding entries (the null block) gather zeros; callers cut each row to its ``seq_len``.
    """
    batch, max_blocks = block_table.shape
    _, page, heads, head_dim = k_pool.shape
    flat_ids = block_table.reshape(-1)  # [B * max_blocks]
    k = k_pool.index_select(0, flat_ids).view(batch, max_blocks * page, heads, head_dim)
    v = v_pool.index_select(0, flat_ids).view(batch, max_blocks * page, heads, head_dim)
    return k, v


def gather_visible(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, lens: list[int],
                   kv_valid: torch.Tensor | None, lengths: HostLengths | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each row's visible keys packed to the front: ``k, v: [B, max_n, H, D]`` and the counts ``n_b``.

    Without ``kv_valid`` the visible keys are the first ``lens[b]`` (no copy beyond the page
    gather); with it, the positions it marks, in row order, moved to the front by a stable sort of the
    mask and a gather: no boolean indexing, whose output size the host would have to wait for (a device
    sync in every layer on CUDA). Positions past a row's count hold other (dead or padding) tokens, which
    callers must exclude (by length or a key mask). The counts come from ``lengths`` (the plan's host
    copy); without it they are read from ``kv_valid`` (a device read).
    """
    k, v = gather_padded(k_pool, v_pool, block_table)  # [B, max_blocks * page, H, D]
    if kv_valid is None:
        return k[:, :max(lens)], v[:, :max(lens)], lens
    counts = (list(lengths.valid_counts) if lengths is not None and lengths.valid_counts is not None
              else [int(n) for n in kv_valid.sum(dim=1).tolist()])
    width = max(counts)
    order = torch.argsort((~kv_valid).to(torch.uint8), dim=1, stable=True)[:, :width]  # visible first, in order
    index = order[:, :, None, None].expand(-1, -1, *k.shape[2:])
    return k.gather(1, index), v.gather(1, index), counts


def valid_counts(kv_valid: torch.Tensor | None, seq_lens: torch.Tensor) -> torch.Tensor:
    """int32 ``[B]`` visible keys per row, computed where the tensors live (no host round trip)."""
    return seq_lens.to(torch.int32) if kv_valid is None else kv_valid.sum(dim=1, dtype=torch.int32)


def key_padding_mask(seq_lens: list[int], max_len: int, device: torch.device) -> torch.Tensor:
    """Bool ``[B, 1, 1, max_len]``: True where key position < the row's length."""
    lens = torch.tensor(seq_lens, device=device)
    return (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]


@dataclass(frozen=True)
class PagedSplit:
    """A masked paged call cut in two, for kernels that read only a prefix of each row's pages.

    The cache lists a row's fully visible pages first (see ``PagedKVCacheManager._plan``): the
    *head* is the first ``head_lens[b]`` tokens of the row's block table, read in place by the
    kernel; the *tail* is the row's few partially visible pages (the last sink page, the window's
    oldest page, the chunk's last page: at most three), gathered. The two partial attentions are
    merged by their log-sum-exp (:func:`merge_partial`), which equals attention over their union.
    Built once per forward by the cache, used by every layer.
    """

    head_lens: torch.Tensor    # int32 [B]: full pages x page tokens (> 0 for every row)
    head_lengths: tuple[int, ...]  # the same as Python ints (xformers builds its mask from host lengths)
    tail_table: torch.Tensor   # int32 [B, T]: the row's partially visible pages, padded with the null block
    tail_valid: torch.Tensor   # bool [B, T * page]: visible positions of the tail pages
    tail_counts: torch.Tensor  # int32 [B]: visible tail tokens per row, on the device (no copy per layer)
    tail_lengths: HostLengths  # the tail rows' width and visible counts (0 for a row without partial pages)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       counts: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``q: [B, Lq, H, D]`` over the first ``counts[b]`` keys of ``k, v: [B, n, H, D]``
    (``counts``: a list, or a ``[B]`` tensor on ``q``'s device, which needs no host-to-device copy).

    Returns ``out: float32 [B, Lq, H, D]`` and ``lse: float32 [B, H, Lq]`` (the log-sum-exp of the
    scaled scores; ``-inf`` with ``out`` 0 for a row with no keys). Meant for a handful of pages.
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, H, Lq, n]
    present = torch.arange(k.shape[1], device=q.device)[None, :] < torch.as_tensor(counts, device=q.device)[:, None]
    scores = scores.masked_fill(~present[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # 0 where masked
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()), lse


def with_tail(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, split: PagedSplit,
              head: torch.Tensor, head_lse: torch.Tensor) -> torch.Tensor:
    """A split call's result: the kernel's attention over the head pages (``head [B, Lq, H, D]``, its
    log-sum-exp ``[B, H, Lq]``) merged with dense attention over the gathered partial tail pages."""
    lengths = split.tail_lengths
    if lengths.valid_counts is not None and not any(lengths.valid_counts):
        return head.to(q.dtype)  # no row has a partial page
    k, v, _ = gather_visible(k_pool, v_pool, split.tail_table, list(lengths.seq_lens), split.tail_valid, lengths)
    tail, tail_lse = attention_with_lse(q, k, v, split.tail_counts)
    return merge_partial(head, head_lse, tail, tail_lse).to(q.dtype)


def merge_partial(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's output ``[B, Lq, H, D]`` and
    log-sum-exp ``[B, H, Lq]`` (``lse_a`` finite; ``lse_b`` may be ``-inf``: an empty set). float32."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    w_a = torch.exp(lse_a.float() - lse).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    w_b = torch.exp(lse_b.float() - lse).transpose(1, 2)[..., None]
    return out_a.float() * w_a + out_b.float() * w_b
