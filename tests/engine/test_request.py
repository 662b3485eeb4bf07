"""GenerationRequest validation and the seed -> generator mapping (documented in the proto)."""

from __future__ import annotations

import pytest

from streamgen.engine.request import GenerationRequest, generator_seed


def test_seed_accepts_the_whole_uint64_range_only() -> None:
    for seed in (0, 2**63, 2**64 - 1):
        GenerationRequest("a mug", seed=seed).validate(100, None)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            GenerationRequest("a mug", seed=seed).validate(100, None)


def test_generator_seed_keeps_32_bit_seeds_and_mixes_larger_ones() -> None:
    assert [generator_seed(s) for s in (0, 5, 2**32 - 1)] == [0, 5, 2**32 - 1]  # unchanged videos
    # SplitMix64's finaliser, low 32 bits: pinned, since a change would change every such video.
    assert [generator_seed(s) for s in (2**32, 2**63 - 1, 2**64 - 1)] == [2743206200, 771989159, 459615264]
    large = [generator_seed(2**32 * k + 5) for k in range(1, 1000)]
    assert all(0 <= g < 2**32 for g in large) and len(set(large)) == len(large)
