"""The rolling-window + sink rule, checked against the offline mask the model is tested with."""

from __future__ import annotations

import pytest

from streamgen.cache.window import (
    frames_evicted_by_commit,
    resident_frames,
    visible_cached_frames,
    worst_case_resident_frames,
)
from streamgen.config import CacheConfig
from streamgen.model.masks import frame_visibility

POLICIES = [CacheConfig(), CacheConfig(window_frames=6, sink_frames=0), CacheConfig(window_frames=6, sink_frames=3),
            CacheConfig(window_frames=7, sink_frames=2), CacheConfig(window_frames=12, sink_frames=3)]


@pytest.mark.parametrize("cfg", POLICIES, ids=str)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_cached_plus_own_frames_equal_the_offline_mask(cfg: CacheConfig, chunk: int) -> None:
    num_frames = 40
    if cfg.recent_frames is not None and cfg.recent_frames < chunk:
        pytest.skip("window smaller than a chunk")
    vis = frame_visibility(num_frames, chunk, cfg.window_frames, cfg.sink_frames)
    for start in range(0, num_frames, chunk):
        end = min(start + chunk, num_frames)
        seen = visible_cached_frames(cfg, start, start, end) + list(range(start, end))
        expected = [j for j in range(num_frames) if vis[start, j]]
        assert seen == expected, (start, end)


def test_resident_frames_exact() -> None:
    cfg = CacheConfig(window_frames=6, sink_frames=2)  # R = 4
    assert resident_frames(cfg, 0) == []
    assert resident_frames(cfg, 1) == [0]
    assert resident_frames(cfg, 6) == [0, 1, 2, 3, 4, 5]
    assert resident_frames(cfg, 9) == [0, 1, 5, 6, 7, 8]
    assert frames_evicted_by_commit(cfg, 6, 9) == [2, 3, 4]
    assert resident_frames(CacheConfig(), 4) == [0, 1, 2, 3]


def test_chunk_sees_fewer_frames_than_are_resident() -> None:
    cfg = CacheConfig(window_frames=6, sink_frames=2)
    # Resident after frame 9: 0,1,5,6,7,8; a 3-frame chunk [9, 12) sees sinks + frames >= 8.
    assert visible_cached_frames(cfg, 9, 9, 12) == [0, 1, 8]


def test_worst_case_frames() -> None:
    cfg = CacheConfig(window_frames=12, sink_frames=3)
    assert worst_case_resident_frames(cfg, 3) == 15
    assert worst_case_resident_frames(cfg, 3, total_frames=10) == 12  # rounded up to whole chunks
    assert worst_case_resident_frames(CacheConfig(), 3, total_frames=20) == 21
    with pytest.raises(ValueError, match="pass total_frames"):
        worst_case_resident_frames(CacheConfig(), 3)
    with pytest.raises(ValueError, match="chunk_frames must be > 0"):
        worst_case_resident_frames(cfg, 0)
    with pytest.raises(ValueError, match="num_committed must be >= 0"):
        resident_frames(cfg, -1)
    with pytest.raises(ValueError, match="0 <= start <= end"):
        visible_cached_frames(cfg, 3, 3, 2)
