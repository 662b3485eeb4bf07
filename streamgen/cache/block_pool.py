"""Preallocated paged K/V memory: block ids, refcounts and a free stack (vLLM v1 ``BlockPool``).

The pool owns two tensors, ``k_cache`` and ``v_cache``, each
``[num_layers, num_blocks, block_size_tokens, num_heads, head_dim]``, allocated once from a
block count or a byte budget so that serving never allocates K/V memory on the hot path.
Everything else here is integer bookkeeping: which block ids are free, how many holders
each live block has, and how many bytes that is.

Block 0 is the *null block*: never handed out, never freed, kept zero. Block tables are
padded with it, so a kernel that reads a padded slot reads finite zeros, never another
session's data (and ``0 * NaN`` from uninitialised memory can never leak into a softmax).

This module knows nothing of sessions, frames or windows (see :mod:`streamgen.cache.paged`)
and never runs attention.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

NULL_BLOCK_ID = 0


class PoolExhaustedError(RuntimeError):
    """More blocks were requested than are free. Admission control exists so this never fires."""


class BlockStateError(RuntimeError):
    """A block was freed twice or used after being freed: always a bookkeeping bug upstream."""


@dataclass(frozen=True)
class KVPageSpec:
    """Shape and dtype of one page of K/V, for every layer at once.

    One page (block) holds ``block_size_tokens`` tokens of K *and* V for all ``num_layers``
    layers, so a session owns the same block ids in every layer and one block table serves
    the whole forward (vLLM's "one KV cache group" case).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    block_size_tokens: int
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "block_size_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVPageSpec.{name} must be a positive int, got {value!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"KVPageSpec.dtype must be a floating dtype, got {self.dtype}")

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token across all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.block_size_tokens * self.bytes_per_token


class BlockPool:
    """Fixed set of K/V pages with O(1) allocate/free and per-block reference counts.

    Why a stack: every operation we need is "take any free block" and "give a block back".
    A Python list used as a LIFO stack does both in O(1) (``pop()``/``append()`` at the end)
    with no per-node objects. vLLM needs a doubly linked list instead of ``deque`` because
    its prefix cache must pull a *cached* block out of the *middle* of the free queue on a
    hit (``deque.remove`` is O(n)) while keeping LRU order for eviction. Our freed pages hold
    evicted frames that are never looked up again, so nothing is ever removed from the
    middle, and LIFO has a bonus: the most recently freed page, still warm in cache, is
    reused first. ``is_free`` is answered by the refcount array, not by searching the stack.

    Hand-out order is deterministic (tests assert exact ids): a fresh pool hands out
    ``1, 2, 3, ...``; blocks returned by one :meth:`free` call come back by the next
    :meth:`allocate` in the order they were passed.
    """

    def __init__(self, spec: KVPageSpec, num_blocks: int, device: torch.device | str = "cpu") -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks must be an int >= 2 (the null block + one usable block), got {num_blocks!r}")
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, num_blocks, spec.block_size_tokens, spec.num_heads, spec.head_dim)
        # zeros, not empty: the null block must read as finite zeros, and fresh pages must not
        # carry NaN bit patterns into a padded kernel read.
        self.k_cache = torch.zeros(shape, dtype=spec.dtype, device=device)  # [L, N, P, H, D]
        self.v_cache = torch.zeros(shape, dtype=spec.dtype, device=device)  # [L, N, P, H, D]
        self._ref_counts: list[int] = [0] * num_blocks
        # Top of the stack is the end of the list: pop() yields 1 first on a fresh pool.
        self._free_stack: list[int] = list(range(num_blocks - 1, NULL_BLOCK_ID, -1))

    @classmethod
    def from_memory_budget(cls, spec: KVPageSpec, memory_budget_bytes: int,
                           device: torch.device | str = "cpu") -> BlockPool:
        """Largest pool (null block included) whose K and V tensors fit in ``memory_budget_bytes``."""
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        num_blocks = memory_budget_bytes // spec.bytes_per_block
        if num_blocks < 2:
            raise ValueError(f"memory_budget_bytes={memory_budget_bytes} is smaller than 2 blocks of "
                             f"{spec.bytes_per_block} bytes (the null block + one usable block): "
                             f"need at least {2 * spec.bytes_per_block} bytes")
        return cls(spec, num_blocks, device)

    # ------------------------------------------------------------------ allocation

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out ``num_blocks`` free blocks, each with refcount 1.

        Raises :class:`PoolExhaustedError` (and changes nothing) if fewer are free.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free_stack):
            raise PoolExhaustedError(f"pool exhausted: {num_blocks} blocks requested, "
                                     f"{len(self._free_stack)} of {self.num_usable_blocks} free")
        block_ids = [self._free_stack.pop() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one holder to each live block (share a page between sessions)."""
        block_ids = list(block_ids)
        self.check_live(block_ids)
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> list[int]:
        """Drop one holder from each block; blocks reaching refcount 0 return to the free stack.

        Atomic: a double free anywhere in ``block_ids`` raises :class:`BlockStateError`
        before any count changes. Returns the ids that actually became free.
        """
        drops = Counter(block_ids)
        for block_id, count in drops.items():
            self._check_id(block_id)
            if self._ref_counts[block_id] < count:
                raise BlockStateError(f"double free of block {block_id}: refcount "
                                      f"{self._ref_counts[block_id]}, {count} release(s) requested")
        freed: list[int] = []
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                freed.append(block_id)
        # Reversed so that the next allocate() pops them in the order they were given.
        self._free_stack.extend(reversed(freed))
        return freed

    # ------------------------------------------------------------------ queries

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def is_free(self, block_id: int) -> bool:
        self._check_id(block_id)
        return self._ref_counts[block_id] == 0

    def check_live(self, block_ids: Iterable[int]) -> None:
        """Raise unless every id names a handed-out block (catches use-after-free)."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise BlockStateError(f"use of freed block {block_id}")

    def _check_id(self, block_id: int) -> None:
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} out of range [0, {self.num_blocks})")
        if block_id == NULL_BLOCK_ID:
            raise ValueError("block 0 is the null block: it is never handed out, shared or freed")

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` pools of one layer, each ``[num_blocks, block_size_tokens, H, D]`` (views)."""
        if not 0 <= layer_idx < self.spec.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range [0, {self.spec.num_layers})")
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def copy_block(self, src_block_id: int, dst_block_id: int) -> None:
        """Copy one page's K/V in every layer (copy-on-share of a partially filled page)."""
        self.check_live([src_block_id, dst_block_id])
        self.k_cache[:, dst_block_id].copy_(self.k_cache[:, src_block_id])
        self.v_cache[:, dst_block_id].copy_(self.v_cache[:, src_block_id])

    # ------------------------------------------------------------------ accounting

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_stack)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free_stack)

    @property
    def bytes_per_block(self) -> int:
        return self.spec.bytes_per_block

    @property
    def total_bytes(self) -> int:
        """Bytes of the K and V tensors, null block included (what the budget paid for)."""
        return self.num_blocks * self.spec.bytes_per_block

    @property
    def used_bytes(self) -> int:
        return self.num_used_blocks * self.spec.bytes_per_block

    @property
    def free_bytes(self) -> int:
        return self.num_free_blocks * self.spec.bytes_per_block

    @property
    def usage(self) -> float:
        """Fraction of usable blocks handed out, in [0, 1]."""
        return self.num_used_blocks / self.num_usable_blocks
