"""Property test: 100 random programs of exactly 100 operations = 10,000 operations on the paged cache,
with whole-frame pages or token-granular ones that cut frames anywhere.

Every committed frame is written with a unique tag value. After every operation the harness
checks that each stored frame still reads its own tag (so no page was ever handed to two
owners or overwritten by another session's scratch writes), that pool refcounts equal the
number of sessions holding each block (no leak, no double free) and that reservations add
up. At the end every session is freed and the pool must be empty again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgen.attention import get_backend
from streamgen.cache.block_pool import BlockPool, KVPageSpec
from streamgen.cache.paged import PagedKVCacheManager
from streamgen.cache.window import resident_frames
from streamgen.config import CacheConfig

NUM_NAMES = 6
SCRATCH = -1.0
UNBOUNDED = 10**9

# (kind, *args); committing forwards are listed twice so that sessions grow long enough to evict.
OPS = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, NUM_NAMES - 1), st.one_of(st.none(), st.integers(1, 12))),
    st.tuples(st.just("forward"), st.integers(1, 2**NUM_NAMES - 1), st.booleans(), st.booleans()),
    st.tuples(st.just("forward"), st.integers(1, 2**NUM_NAMES - 1), st.just(True), st.just(False)),
    st.tuples(st.just("forward"), st.integers(1, 2**NUM_NAMES - 1), st.just(True), st.just(False)),
    st.tuples(st.just("free"), st.integers(0, NUM_NAMES - 1)),
    st.tuples(st.just("share"), st.integers(0, NUM_NAMES - 1), st.integers(0, NUM_NAMES - 1), st.integers(1, 12)),
)


@st.composite
def setups(draw: st.DrawFn) -> tuple[CacheConfig, int, int, int, int]:
    """(policy, chunk frames, pool blocks, tokens per frame, tokens per page): whole-frame pages
    (``block_size_frames``) or token-granular ones that cut frames anywhere."""
    window = draw(st.sampled_from([None, 3, 5, 8]))
    sink = draw(st.integers(0, 2)) if window is not None else 0
    if window is not None and window <= sink:
        window = sink + 1
    tokens_per_frame = draw(st.integers(1, 3))
    if draw(st.booleans()):
        bsf = draw(st.integers(1, 3))
        page = bsf * tokens_per_frame
    else:
        bsf, page = 1, draw(st.integers(1, 5))
    cfg = CacheConfig(window_frames=window, sink_frames=sink, block_size_frames=bsf)
    return cfg, draw(st.integers(1, 3)), draw(st.integers(8, 40)), tokens_per_frame, page


@dataclass
class Harness:
    """Drives a manager with ops and keeps the expected K value of every stored frame."""

    m: PagedKVCacheManager
    chunk: int
    limit: dict[str, int] = field(default_factory=dict)               # frames a session may reach
    tags: dict[str, dict[int, float]] = field(default_factory=dict)   # expected K of stored frames
    next_tag: float = 1.0

    def apply(self, op: tuple) -> None:
        getattr(self, op[0])(*op[1:])

    def admit(self, idx: int, total: int | None) -> None:
        name = f"s{idx}"
        if name in self.limit:
            return
        if total is None and self.m.cache_config.window_frames is None:
            total = 12
        worst = self.m.worst_case_frames(self.chunk, total_frames=total)
        available = self.m.num_available_blocks
        result = self.m.admit(name, worst)
        assert result.admitted == (self.m.blocks_for_frames(worst) <= available)
        if not result:
            assert result.reason.startswith("pool exhausted") and self.m.num_available_blocks == available
            return
        self.limit[name] = UNBOUNDED if total is None else -(-total // self.chunk) * self.chunk
        self.tags[name] = {}

    def forward(self, mask: int, commit: bool, fail: bool) -> None:
        ready = [s for s in sorted(self.limit) if self.m.num_committed_frames(s) + self.chunk <= self.limit[s]]
        sids = [s for i, s in enumerate(ready) if mask >> i & 1] or ready[:1]
        if not sids:
            return
        view = self.m.begin_forward(sids, self.chunk, commit=commit)
        tpf = self.m.tokens_per_frame
        values = torch.full((len(sids), self.chunk * tpf, 1, 1), SCRATCH)  # H = D = 1; a frame's tokens share a tag
        if commit:
            for b in range(len(sids)):
                for f in range(self.chunk):
                    values[b, f * tpf:(f + 1) * tpf] = self.next_tag
                    self.next_tag += 1
        view.attend(0, values, values, values)
        if fail:
            view.abort()
            return
        view.finish()
        if commit:
            for b, sid in enumerate(sids):
                start = self.m.num_committed_frames(sid) - self.chunk
                self.tags[sid].update({start + f: float(values[b, f * tpf]) for f in range(self.chunk)})
                resident = set(self.m.resident_frames(sid))  # the commit evicted the rest
                self.tags[sid] = {j: t for j, t in self.tags[sid].items() if j in resident}

    def free(self, idx: int) -> None:
        if not self.limit:
            return
        sid = sorted(self.limit)[idx % len(self.limit)]
        self.m.free(sid)
        del self.limit[sid], self.tags[sid]

    def share(self, dst_idx: int, src_idx: int, num_frames: int) -> None:
        fresh = [s for s in sorted(self.limit) if self.m.num_committed_frames(s) == 0]
        sources = [s for s in sorted(self.limit) if self.m.num_committed_frames(s) > 0]
        if not fresh or not sources:
            return
        dst, src = fresh[dst_idx % len(fresh)], sources[src_idx % len(sources)]
        n = min(num_frames, self.m.num_committed_frames(src), self.limit[dst])
        try:
            self.m.share_prefix(src, dst, n)
        except ValueError as exc:  # prefix evicted, or bigger than dst's reservation: refused, nothing changed
            assert "evicted" in str(exc) or "more than the" in str(exc), exc
            assert self.m.block_ids(dst) == []
            return
        self.tags[dst] = {j: self.tags[src][j] for j in resident_frames(self.m.cache_config, n)}

    def check(self) -> None:
        pool = self.m.pool
        k_flat = pool.k_cache[0].view(-1)  # one scalar per token
        holders: dict[int, int] = {}
        for sid, tags in self.tags.items():
            assert sorted(tags) == self.m.resident_frames(sid)
            for frame, tag in tags.items():
                block_id, offset = self.m.frame_location(sid, frame)
                assert float(k_flat[block_id * self.m.block_size_tokens + offset]) == tag, (sid, frame)
                assert k_flat[self.m.frame_slots(sid, frame)].eq(tag).all(), (sid, frame)
            ids = self.m.block_ids(sid)
            assert len(ids) == len(set(ids)), "a session holds a block twice"
            for block_id in ids:
                holders[block_id] = holders.get(block_id, 0) + 1
        for block_id in range(1, pool.num_blocks):
            assert pool.ref_count(block_id) == holders.get(block_id, 0), block_id
        assert pool.num_used_blocks == len(holders)
        usage = self.m.usage()
        assert usage.num_reserved_blocks <= pool.num_usable_blocks
        assert usage.live_token_bytes <= usage.used_bytes


@settings(max_examples=100, deadline=None)
@given(setup=setups(), ops=st.lists(OPS, min_size=100, max_size=100))
def test_random_programs_never_leak_or_double_hand_out(setup: tuple[CacheConfig, int, int, int, int],
                                                       ops: list[tuple]) -> None:
    cfg, chunk, num_blocks, tokens_per_frame, page = setup
    spec = KVPageSpec(num_layers=1, num_heads=1, head_dim=1, block_size_tokens=page)
    harness = Harness(PagedKVCacheManager(BlockPool(spec, num_blocks), cfg, tokens_per_frame, get_backend("sdpa")),
                      chunk)
    for op in ops:
        harness.apply(op)
        harness.check()
    for sid in list(harness.limit):
        harness.free(sorted(harness.limit).index(sid))
    usage = harness.m.usage()
    assert usage.used_bytes == 0 and usage.num_reserved_blocks == 0 and usage.num_sessions == 0
    assert harness.m.pool.num_free_blocks == harness.m.pool.num_usable_blocks
