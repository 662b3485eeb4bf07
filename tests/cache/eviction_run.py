"""A paged backend against SDPA on the same pages through window eviction: the run the split-path tests share.

300-token frames on pages of ``page`` tokens (256: as Wan 1.3B's 1560 on 256, frames straddle pages); a
window of 5 frames with 1 sink evicts from the 6th frame on, leaving dead tokens inside pages. Two
sessions, the second joining two chunks late, so a batch mixes rows at different window positions.
"""

from __future__ import annotations

import torch

from streamgen.attention import get_backend
from streamgen.cache.block_pool import BlockPool, KVPageSpec
from streamgen.cache.paged import PagedKVCacheManager
from streamgen.config import CacheConfig


def manager(backend: object, page: int = 256, num_blocks: int = 96) -> PagedKVCacheManager:
    spec = KVPageSpec(num_layers=2, num_heads=2, head_dim=8, block_size_tokens=page, dtype=torch.bfloat16)
    return PagedKVCacheManager(BlockPool(spec, num_blocks), CacheConfig(window_frames=5, sink_frames=1), 300,
                               backend)  # type: ignore[arg-type]


def run_against_sdpa(candidate: PagedKVCacheManager, seed: int, steps: int = 9,
                     page: int = 256) -> list[str]:
    """Attend through ``candidate`` and through an SDPA manager alike for ``steps`` chunks, asserting equal
    outputs (bf16 tolerance); returns the paged path ``candidate`` took at each step."""
    sdpa = manager(get_backend("sdpa"), page)
    for m in (candidate, sdpa):
        assert m.admit("a", 7) and m.admit("b", 7)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for step in range(steps):
        ids = ["a", "b"] if step >= 2 else ["a"]
        commit = step % 2 == 1 or step >= 4
        x = [torch.randn(len(ids), 600, 2, 8, generator=g).to(torch.bfloat16) for _ in range(2 * 3)]
        outs = []
        for m in (candidate, sdpa):
            with torch.no_grad(), m.begin_forward(ids, 2, commit=commit) as view:
                outs.append([view.attend(layer, *x[3 * layer:3 * layer + 3]) for layer in range(2)])
                if m is candidate:
                    paths.append(view.paged_path)
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert sdpa.usage().paged_split_calls == 0
    return paths
