"""The pool, the memory plan and the pipeline count a stream's KV pages alike, for the wan-1.3b preset's
256-token pages (frames of 1560 tokens span pages) and for the whole-frame pages of the small presets."""

from __future__ import annotations

import pytest
import torch

from streamgen.attention import get_backend
from streamgen.cache.paged import PagedKVCacheManager, pages_for_frames
from streamgen.config import CacheConfig, get_preset
from streamgen.memory_plan import plan


@pytest.mark.parametrize("name", ["wan-1.3b", "default"])
def test_pool_and_memory_plan_reserve_the_same_pages(name: str) -> None:
    preset = get_preset(name)
    kv = PagedKVCacheManager.from_preset(preset, get_backend("sdpa"), num_blocks=2, dtype=torch.bfloat16,
                                         device="meta")  # sizes only: nothing is allocated
    page = preset.cache.page_tokens(preset.tokens_per_frame)
    assert kv.block_size_tokens == page == (256 if name == "wan-1.3b" else preset.tokens_per_frame)
    worst = kv.worst_case_frames(preset.sampler.chunk_frames)
    pages = kv.blocks_for_frames(worst)
    memory = plan(preset, dtype=torch.bfloat16)
    assert memory.kv_page_tokens == page and memory.reserved_frames == worst
    assert memory.kv_bytes_per_stream == pages * page * kv.pool.spec.bytes_per_token
    if name == "wan-1.3b":  # 15 frames x 1560 tokens over 256-token pages: 94 pages, 2.5 % above whole frames
        assert pages == 94 and pages * page > worst * preset.tokens_per_frame
        assert pages * page / (worst * preset.tokens_per_frame) < 1.03


def test_page_size_is_given_in_tokens_or_frames_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        CacheConfig(window_frames=12, sink_frames=3, block_size_frames=2, block_size_tokens=256)
    with pytest.raises(ValueError, match="block_size_tokens must be > 0"):
        CacheConfig(block_size_tokens=0)
    assert CacheConfig(block_size_frames=2).page_tokens(64) == 128
    assert pages_for_frames(CacheConfig(window_frames=12, sink_frames=3), 64, 64, 15) == 15
