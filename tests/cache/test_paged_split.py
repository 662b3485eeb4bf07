"""Flash's split paged path: a masked call (a rolling window with sinks over 256-token pages that cut
frames) read as in-place fully visible pages + gathered partial pages, merged by log-sum-exp, equals
SDPA over the same pages.

flash-attn needs CUDA, so the kernel is a stand-in written from ``flash_attn_with_kvcache``'s
documented contract: ``k_cache``/``v_cache`` ``[num_blocks, page, H, D]`` read through
``block_table`` (or ``[B, S, H, D]`` without one), the first ``cache_seqlens[b]`` tokens of a row,
softmax scale ``D ** -0.5``, and with ``return_softmax_lse=True`` also the log-sum-exp
``[B, H, Lq]`` of the scaled scores. Everything else (the cache's split, the tail gather, the merge)
is the code that runs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from streamgen.attention.flash import FlashBackend
from streamgen.attention.paged_common import attention_with_lse, merge_partial

from .eviction_run import manager, run_against_sdpa


def _kvcache_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                       cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None, causal: bool = False,
                       return_softmax_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    assert not causal
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        if block_table is not None:
            k = k_cache[block_table[b].long()].reshape(-1, *k_cache.shape[2:])[:n]
            v = v_cache[block_table[b].long()].reshape(-1, *v_cache.shape[2:])[:n]
        else:
            k, v = k_cache[b, :n], v_cache[b, :n]
        out, lse = attention_with_lse(q[b:b + 1], k[None], v[None], [n])
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs).to(q.dtype)
    return (out, torch.cat(lses)) if return_softmax_lse else out


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_merge_of_two_partial_attentions_is_attention_over_their_union() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    k2, v2 = torch.randn(2, 7, 3, 8, generator=g), torch.randn(2, 7, 3, 8, generator=g)
    a, lse_a = attention_with_lse(q, k, v, [5, 5])
    b, lse_b = attention_with_lse(q, k2, v2, [7, 0])  # the second row has no keys in the second set
    merged = merge_partial(a, lse_a, b, lse_b)
    full = _dense_reference(q[:1], torch.cat([k, k2], 1)[:1], torch.cat([v, v2], 1)[:1])
    torch.testing.assert_close(merged[:1], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[1:], _dense_reference(q[1:], k[1:], v[1:]), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse_b[1]).all()


def test_flash_split_path_equals_sdpa_on_the_same_pages_through_eviction() -> None:
    flash = manager(FlashBackend(_dense_reference, _kvcache_reference))
    paths = run_against_sdpa(flash, seed=1)
    checked = paths.count("split")
    assert checked >= 4  # the window evicted and the split path ran (the rest had no dead tokens)
    usage = flash.usage()
    assert usage.paged_split_calls == 2 * checked and usage.paged_gathered_calls == 0


def test_split_needs_fitting_pages() -> None:
    backend = FlashBackend(_dense_reference, _kvcache_reference)
    assert backend.paged_layout(256, masked=True) == "split" and backend.paged_layout(256) == "direct"
    q = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    pool = torch.zeros(4, 64, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 256 tokens"):
        backend.paged_attention_split(q, pool, pool, torch.zeros(1, 1, dtype=torch.int32), None)  # type: ignore[arg-type]
