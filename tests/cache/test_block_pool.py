"""BlockPool: exact block ids, refcounts, byte accounting and every misuse raising (vLLM-style)."""

from __future__ import annotations

import pytest
import torch

from streamgen.cache.block_pool import NULL_BLOCK_ID, BlockPool, BlockStateError, KVPageSpec, PoolExhaustedError

SPEC = KVPageSpec(num_layers=2, num_heads=1, head_dim=4, block_size_tokens=3)  # fp32
BYTES_PER_BLOCK = 2 * 2 * 3 * 1 * 4 * 4  # K+V x layers x tokens x heads x head_dim x 4 bytes = 192


def test_spec_bytes_are_exact() -> None:
    assert SPEC.bytes_per_token == 2 * 2 * 1 * 4 * 4
    assert SPEC.bytes_per_block == BYTES_PER_BLOCK
    assert KVPageSpec(1, 1, 2, 1, dtype=torch.bfloat16).bytes_per_block == 2 * 2 * 2


def test_pool_tensors_have_the_paged_layout() -> None:
    pool = BlockPool(SPEC, num_blocks=5)
    assert pool.k_cache.shape == (2, 5, 3, 1, 4) and pool.v_cache.shape == (2, 5, 3, 1, 4)
    k, v = pool.layer(1)
    assert k.shape == (5, 3, 1, 4) and k.data_ptr() == pool.k_cache[1].data_ptr()
    assert torch.count_nonzero(pool.k_cache[:, NULL_BLOCK_ID]) == 0


def test_scripted_allocation_sequence_gives_exact_ids() -> None:
    pool = BlockPool(SPEC, num_blocks=8)  # ids 1..7 usable
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(2) == [4, 5]
    assert pool.free([2, 4]) == [2, 4]
    # Blocks freed by one call come back in the order they were given, before untouched ones.
    assert pool.allocate(3) == [2, 4, 6]
    pool.incref([3])                      # 3 now shared by two holders
    assert pool.free([3, 1]) == [1]       # 3 survives with one holder
    assert pool.ref_count(3) == 1 and pool.is_free(1)
    assert pool.allocate(2) == [1, 7]
    assert pool.num_free_blocks == 0
    with pytest.raises(PoolExhaustedError, match="1 blocks requested, 0 of 7 free"):
        pool.allocate(1)
    assert pool.free([3, 5, 7]) == [3, 5, 7]
    assert pool.allocate(1) == [3]


def test_never_hands_out_the_null_block_or_a_live_block_twice() -> None:
    pool = BlockPool(SPEC, num_blocks=6)
    seen: set[int] = set()
    for _ in range(3):
        ids = pool.allocate(5)
        assert NULL_BLOCK_ID not in ids and not seen & set(ids)
        pool.free(ids)
    assert sorted(pool.allocate(5)) == [1, 2, 3, 4, 5]


def test_double_free_and_use_after_free_raise_without_side_effects() -> None:
    pool = BlockPool(SPEC, num_blocks=4)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(BlockStateError, match=f"double free of block {a}"):
        pool.free([b, a])
    assert pool.ref_count(b) == 1  # atomic: b was not released by the failed call
    with pytest.raises(BlockStateError, match=f"double free of block {b}"):
        pool.free([b, b])
    with pytest.raises(BlockStateError, match=f"use of freed block {a}"):
        pool.incref([a])
    with pytest.raises(BlockStateError, match=f"use of freed block {a}"):
        pool.copy_block(b, a)


@pytest.mark.parametrize("bad", [0, -1, 99])
def test_null_and_out_of_range_ids_raise_value_error(bad: int) -> None:
    pool = BlockPool(SPEC, num_blocks=4)
    with pytest.raises(ValueError, match="null block" if bad == 0 else "out of range"):
        pool.free([bad])
    with pytest.raises(ValueError):
        pool.incref([bad])


def test_byte_accounting_is_exact() -> None:
    pool = BlockPool(SPEC, num_blocks=10)
    assert pool.total_bytes == 10 * BYTES_PER_BLOCK
    assert pool.total_bytes == pool.k_cache.nbytes + pool.v_cache.nbytes
    ids = pool.allocate(4)
    pool.incref(ids[:2])  # sharing does not consume memory
    assert pool.used_bytes == 4 * BYTES_PER_BLOCK and pool.free_bytes == 5 * BYTES_PER_BLOCK
    assert pool.used_bytes + pool.free_bytes + BYTES_PER_BLOCK == pool.total_bytes  # + the null block
    assert pool.usage == pytest.approx(4 / 9)
    pool.free(ids)
    pool.free(ids[:2])
    assert pool.used_bytes == 0 and pool.num_free_blocks == 9


def test_memory_budget_sizing() -> None:
    pool = BlockPool.from_memory_budget(SPEC, 5 * BYTES_PER_BLOCK + BYTES_PER_BLOCK - 1)
    assert pool.num_blocks == 5 and pool.total_bytes <= 6 * BYTES_PER_BLOCK - 1
    with pytest.raises(ValueError, match=f"smaller than 2 blocks of {BYTES_PER_BLOCK} bytes"):
        BlockPool.from_memory_budget(SPEC, 2 * BYTES_PER_BLOCK - 1)
    with pytest.raises(ValueError, match="memory_budget_bytes must be >= 0"):
        BlockPool.from_memory_budget(SPEC, -1)


@pytest.mark.parametrize("field,value", [("block_size_tokens", 0), ("num_heads", 0), ("head_dim", -2),
                                         ("num_layers", 0)])
def test_bad_spec_raises_naming_the_field(field: str, value: int) -> None:
    kwargs = dict(num_layers=1, num_heads=1, head_dim=2, block_size_tokens=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"KVPageSpec.{field} must be a positive int"):
        KVPageSpec(**kwargs)


def test_bad_pool_arguments_raise() -> None:
    with pytest.raises(ValueError, match="floating dtype"):
        KVPageSpec(1, 1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_blocks must be an int >= 2"):
        BlockPool(SPEC, num_blocks=1)
    pool = BlockPool(SPEC, num_blocks=3)
    with pytest.raises(ValueError, match="num_blocks must be >= 0"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match="layer_idx 2 out of range"):
        pool.layer(2)


def test_copy_block_copies_every_layer() -> None:
    pool = BlockPool(SPEC, num_blocks=4)
    a, b = pool.allocate(2)
    pool.k_cache[:, a] = torch.randn(2, 3, 1, 4)
    pool.v_cache[:, a] = torch.randn(2, 3, 1, 4)
    pool.copy_block(a, b)
    assert torch.equal(pool.k_cache[:, b], pool.k_cache[:, a])
    assert torch.equal(pool.v_cache[:, b], pool.v_cache[:, a])
