"""xformers' paged paths (direct, split under the rolling window, gather) equal SDPA on the same pages.

xformers needs CUDA, so the kernels are stand-ins written from its documented contract (module
``xformers.ops.fmha``): queries packed as ``[1, sum(Lq), H, D]``; a
``PagedBlockDiagonalPaddedKeysMask`` reads row ``b``'s first ``kv_seqlen[b]`` tokens of the pool
``[1, num_blocks * page, H, D]`` through ``block_tables[b]``; a ``BlockDiagonalPaddedKeysMask``
reads row ``b``'s first ``kv_seqlen[b]`` keys of its ``kv_padding``-long slot; scale ``D ** -0.5``;
``memory_efficient_attention_partial`` also returns the float32 log-sum-exp in the packed
``[1, H, sum(Lq)]`` layout of a varlen mask. Everything else (the cache's split, the tail gather, the
merge, the layout read-back) is the code that runs on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from streamgen.attention.paged_common import attention_with_lse
from streamgen.attention.xformers import XFormersBackend, packed_lse_rows

from .eviction_run import manager, run_against_sdpa


@dataclass
class _PagedMask:
    q_seqlen: list[int]
    kv_seqlen: list[int]
    block_tables: torch.Tensor
    page_size: int

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int], block_tables: torch.Tensor,
                     page_size: int) -> _PagedMask:
        return cls(list(q_seqlen), list(kv_seqlen), block_tables, page_size)

    def rows(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pages_k = k[0].view(-1, self.page_size, *k.shape[2:])
        pages_v = v[0].view(-1, self.page_size, *v.shape[2:])
        out = []
        for b, n in enumerate(self.kv_seqlen):
            ids = self.block_tables[b].long()
            out.append((pages_k[ids].flatten(0, 1)[:n], pages_v[ids].flatten(0, 1)[:n]))
        return out


@dataclass
class _PaddedMask:
    q_seqlen: list[int]
    kv_padding: int
    kv_seqlen: list[int]

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_padding: int, kv_seqlen: list[int]) -> _PaddedMask:
        return cls(list(q_seqlen), kv_padding, list(kv_seqlen))

    def rows(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pad = self.kv_padding
        return [(k[0, b * pad:b * pad + n], v[0, b * pad:b * pad + n]) for b, n in enumerate(self.kv_seqlen)]


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: _PagedMask | _PaddedMask
             ) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses, start = [], [], 0
    for n_q, (k_row, v_row) in zip(attn_bias.q_seqlen, attn_bias.rows(k, v), strict=True):
        out, lse = attention_with_lse(q[:, start:start + n_q], k_row[None], v_row[None], [k_row.shape[0]])
        outs.append(out)
        lses.append(lse)  # [1, H, n_q]
        start += n_q
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)  # [1, M, H, D] float32, [1, H, M]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: _PagedMask | _PaddedMask
             ) -> torch.Tensor:
    return _partial(q, k, v, attn_bias)[0].to(q.dtype)


def _stand_in() -> XFormersBackend:
    xops = SimpleNamespace(memory_efficient_attention_forward=_forward, memory_efficient_attention_partial=_partial)
    bias = SimpleNamespace(PagedBlockDiagonalPaddedKeysMask=_PagedMask, BlockDiagonalPaddedKeysMask=_PaddedMask)
    return XFormersBackend(xops, bias)  # type: ignore[arg-type]


@pytest.mark.parametrize("page, expected", [(256, {"direct", "split"}), (100, {"gather"})])
def test_xformers_paged_paths_equal_sdpa_on_the_same_pages_through_eviction(page: int, expected: set[str]) -> None:
    xf = manager(_stand_in(), page)
    seen = [path.split(" ")[0] for path in run_against_sdpa(xf, seed=2, page=page)]
    assert set(seen) == expected, seen
    usage = xf.usage()
    if page == 256:
        assert seen.count("split") >= 4  # the window evicted and the split path ran
        assert usage.paged_split_calls == 2 * seen.count("split") and usage.paged_gathered_calls == 0
    else:
        assert usage.paged_gathered_calls == 2 * len(seen) and usage.paged_split_calls == 0


def test_packed_lse_is_read_back_per_row_or_refused() -> None:
    lse = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 12)  # H = 2, B = 3, Lq = 4
    rows = packed_lse_rows(lse, 3, 4)
    assert rows.shape == (3, 2, 4)
    assert rows[1, 0].tolist() == [4.0, 5.0, 6.0, 7.0] and rows[2, 1].tolist() == [20.0, 21.0, 22.0, 23.0]
    padded = torch.cat([lse, torch.full((1, 2, 4), float("nan"))], dim=2)  # a kernel that pads M
    torch.testing.assert_close(packed_lse_rows(padded, 3, 4), rows)
    with pytest.raises(ValueError, match="packed"):
        packed_lse_rows(torch.zeros(3, 2, 4), 3, 4)  # [B, H, Lq] is not what a varlen mask returns


def test_xformers_split_needs_fitting_pages() -> None:
    backend = _stand_in()
    assert backend.paged_layout(256, masked=True) == "split" and backend.paged_layout(256) == "direct"
    q = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    pool = torch.zeros(4, 96, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64 tokens"):
        backend.paged_attention_split(q, pool, pool, torch.zeros(1, 1, dtype=torch.int32), None)  # type: ignore[arg-type]
