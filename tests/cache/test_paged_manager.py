"""PagedKVCacheManager: exact block ids through admissions, evictions, frees and shares; views;
attention equal to a brute-force per-frame reference in both layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamgen.attention import get_backend
from streamgen.cache.block_pool import BlockPool, KVPageSpec
from streamgen.cache.paged import PagedKVCacheManager
from streamgen.cache.window import visible_cached_frames
from streamgen.config import CacheConfig, get_preset

TOKENS_PER_FRAME = 2


def make_manager(cfg: CacheConfig, num_blocks: int = 16, num_layers: int = 1, num_heads: int = 1,
                 head_dim: int = 2, block_size_tokens: int | None = None) -> PagedKVCacheManager:
    page = block_size_tokens or cfg.block_size_frames * TOKENS_PER_FRAME
    spec = KVPageSpec(num_layers, num_heads, head_dim, page)
    return PagedKVCacheManager(BlockPool(spec, num_blocks), cfg, TOKENS_PER_FRAME, get_backend("sdpa"))


def run_forward(m: PagedKVCacheManager, session_ids: list[str], num_frames: int, commit: bool) -> None:
    spec = m.pool.spec
    with m.begin_forward(session_ids, num_frames, commit=commit) as view:
        for layer in range(spec.num_layers):
            x = torch.randn(len(session_ids), num_frames * TOKENS_PER_FRAME, spec.num_heads, spec.head_dim)
            view.attend(layer, x, x, x)


def test_scripted_sessions_give_exact_block_ids() -> None:
    m = make_manager(CacheConfig(window_frames=4, sink_frames=1))  # R = 3; 15 usable blocks
    assert m.worst_case_frames(2) == 6 and m.blocks_for_frames(6) == 6
    assert m.admit("a", 6) and m.admit("b", 6)
    refused = m.admit("c", 6)
    assert not refused and refused.blocks_needed == 6 and refused.blocks_available == 3
    assert refused.reason.startswith("pool exhausted")

    run_forward(m, ["a"], 2, commit=False)            # denoising step: scratch pages 1, 2 come and go
    assert m.block_ids("a") == [] and m.pool.num_used_blocks == 0
    run_forward(m, ["a"], 2, commit=True)             # frames 0, 1
    assert m.block_ids("a") == [1, 2]
    run_forward(m, ["a", "b"], 2, commit=True)        # a: frames 2, 3; b: frames 0, 1
    assert m.block_ids("a") == [1, 2, 3, 4] and m.block_ids("b") == [5, 6]
    run_forward(m, ["a"], 2, commit=True)             # a: frames 4, 5 -> evicts frames 1, 2 (blocks 2, 3)
    assert m.resident_frames("a") == [0, 3, 4, 5] and m.block_ids("a") == [1, 4, 7, 8]
    assert m.pool.is_free(2) and m.pool.is_free(3)
    run_forward(m, ["b", "a"], 2, commit=True)        # b reuses 2, 3 (LIFO); a gets 9, 10, evicts blocks 4, 7
    assert m.block_ids("b") == [5, 6, 2, 3] and m.block_ids("a") == [1, 8, 9, 10]
    assert m.resident_frames("a") == [0, 5, 6, 7]

    assert m.free("b") == 4
    assert m.admit("c", 6)
    m.share_prefix("a", "c", 1)                       # c shares a's pinned sink frame (block 1)
    assert m.block_ids("c") == [1] and m.pool.ref_count(1) == 2
    run_forward(m, ["c"], 2, commit=True)
    assert m.block_ids("c") == [1, 5, 6]
    assert m.block_tables(["a", "c"]).tolist() == [[1, 8, 9, 10], [1, 5, 6, 0]]
    assert m.block_tables(["a"]).dtype == torch.int32

    usage = m.usage()
    assert usage.num_used_blocks == 6 and usage.num_reserved_blocks == 12
    assert usage.live_token_bytes == usage.used_bytes  # the shared block is counted once
    assert m.session_bytes("a") == 4 * m.pool.bytes_per_block and m.session_bytes("c") == 3 * m.pool.bytes_per_block
    m.free("a")
    assert m.pool.ref_count(1) == 1                   # c still holds the shared sink page
    m.free("c")
    assert m.usage().used_bytes == 0 and m.usage().num_reserved_blocks == 0 and m.pool.num_free_blocks == 15


def test_multi_frame_pages_free_only_when_every_frame_is_evicted() -> None:
    m = make_manager(CacheConfig(window_frames=5, sink_frames=1, block_size_frames=2))  # R = 4
    assert m.admit("a", m.worst_case_frames(3))
    run_forward(m, ["a"], 3, commit=True)   # frames 0-2 -> pages 0 (0, 1), 1 (2, -)
    assert m.block_ids("a") == [1, 2]
    run_forward(m, ["a"], 3, commit=True)   # frames 3-5 -> page 1 filled, page 2 (4, 5); resident 0, 2-5
    assert m.block_ids("a") == [1, 2, 3] and m.resident_frames("a") == [0, 2, 3, 4, 5]
    run_forward(m, ["a"], 3, commit=True)   # frames 6-8; resident 0, 5-8: page 1 (2, 3) dies, page 0 keeps sink 0
    assert m.resident_frames("a") == [0, 5, 6, 7, 8] and m.block_ids("a") == [1, 3, 4, 5]
    assert m.pool.is_free(2)


def test_partial_page_is_copied_not_shared() -> None:
    m = make_manager(CacheConfig(window_frames=None, block_size_frames=2))
    assert m.admit("src", 8) and m.admit("dst", 8)
    run_forward(m, ["src"], 3, commit=True)  # pages: 0 = frames (0, 1) -> block 1, 1 = frames (2, -) -> block 2
    m.share_prefix("src", "dst", 3)
    assert m.block_ids("dst") == [1, 3] and m.pool.ref_count(1) == 2 and m.pool.ref_count(2) == 1
    assert torch.equal(m.pool.k_cache[:, 3], m.pool.k_cache[:, 2])
    run_forward(m, ["src", "dst"], 1, commit=True)  # both write frame 3 into their own (unshared) page
    assert m.block_ids("src") == [1, 2] and m.block_ids("dst") == [1, 3]


def test_admission_limits_and_reservations() -> None:
    m = make_manager(CacheConfig(window_frames=4, sink_frames=1), num_blocks=8)  # 7 usable
    assert m.can_admit(7) and not m.can_admit(8)
    never = m.admit("huge", 8)
    assert not never and "can never be admitted" in never.reason
    assert m.admit("a", 4) and m.num_available_blocks == 3
    assert not m.can_admit(4)
    m.free("a")
    assert m.can_admit(7)
    with pytest.raises(ValueError, match="worst_case_frames must be > 0"):
        m.admit("z", 0)
    assert m.admit("a", 2)
    with pytest.raises(ValueError, match="already admitted"):
        m.admit("a", 2)
    run_forward(m, ["a"], 2, commit=True)
    with pytest.raises(ValueError, match="more than the 2 reserved for worst_case_frames=2"):
        m.begin_forward(["a"], 1, commit=False)


def test_blocks_for_frames_bounds_multi_frame_pages() -> None:
    m = make_manager(CacheConfig(window_frames=12, sink_frames=3, block_size_frames=2))
    # sinks 0-2 -> 2 pages; any run of 12 frames touches at most 7 pages.
    assert m.blocks_for_frames(15) == 2 + 7
    # 9 consecutive frames in 4-frame pages touch at most 3 pages wherever they start.
    assert make_manager(CacheConfig(block_size_frames=4)).blocks_for_frames(9) == 3
    with pytest.raises(ValueError):
        m.blocks_for_frames(-1)


def test_bad_forward_requests_raise() -> None:
    m = make_manager(CacheConfig(window_frames=4, sink_frames=1), num_layers=2, num_heads=2)
    m.admit("a", 6)
    m.admit("b", 6)
    with pytest.raises(KeyError, match="unknown session 'zz'"):
        m.begin_forward(["zz"], 1, commit=True)
    with pytest.raises(ValueError, match="num_frames must be > 0"):
        m.begin_forward(["a"], 0, commit=True)
    with pytest.raises(ValueError, match="duplicate session ids"):
        m.begin_forward(["a", "a"], 1, commit=True)
    view = m.begin_forward(["a", "b"], 1, commit=True)
    with pytest.raises(RuntimeError, match="already has an open forward"):
        m.begin_forward(["a"], 1, commit=True)
    q = torch.randn(2, TOKENS_PER_FRAME, 2, 2)
    with pytest.raises(ValueError, match="dtype torch.bfloat16 does not match the KV pool dtype"):
        view.attend(0, q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="pool heads/head_dim 2/2"):
        view.attend(0, q, torch.randn(2, TOKENS_PER_FRAME, 1, 2), q)
    with pytest.raises(ValueError, match=r"expects \[B, L, H, D\] = \(2, 2, 2, 2\)"):
        view.attend(0, q, torch.randn(2, 3 * TOKENS_PER_FRAME, 2, 2), q)
    with pytest.raises(ValueError, match="layer_idx 5 out of range"):
        view.attend(5, q, q, q)
    view.attend(0, q, q, q)
    with pytest.raises(RuntimeError, match=r"layers \[1\] never called attend\(\)"):
        view.finish()
    assert view.closed and m.num_committed_frames("a") == 0 and m.pool.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="closed"):
        view.attend(0, q, q, q)


def test_manager_rejects_mismatched_pool() -> None:
    spec = KVPageSpec(1, 1, 2, block_size_tokens=3)
    with pytest.raises(ValueError, match="pool pages hold 3 tokens but block_size_frames=2 x tokens_per_frame=2"):
        PagedKVCacheManager(BlockPool(spec, 4), CacheConfig(block_size_frames=2), 2, get_backend("sdpa"))
    # block_size_frames=1 (the default) leaves the page size to the pool: any token count.
    assert PagedKVCacheManager(BlockPool(spec, 4), CacheConfig(), 2, get_backend("sdpa")).block_size_tokens == 3
    with pytest.raises(ValueError, match="pass block_size_tokens or CacheConfig.block_size_frames > 1, not both"):
        PagedKVCacheManager.from_preset(get_preset("test"), get_backend("sdpa"), num_blocks=4,
                                        cache_config=CacheConfig(block_size_frames=2), block_size_tokens=8)
    with pytest.raises(ValueError, match="exactly one of num_blocks or memory_budget_bytes"):
        PagedKVCacheManager.from_preset(get_preset("test"), get_backend("sdpa"))
    m = PagedKVCacheManager.from_preset(get_preset("test"), get_backend("sdpa"), memory_budget_bytes=1 << 20)
    assert m.block_size_tokens == get_preset("test").tokens_per_frame
    assert m.pool.total_bytes <= 1 << 20


def test_exception_in_forward_aborts_and_free_closes_open_view() -> None:
    m = make_manager(CacheConfig(window_frames=4, sink_frames=1))
    m.admit("a", 6)
    run_forward(m, ["a"], 2, commit=True)
    with pytest.raises(ZeroDivisionError), m.begin_forward(["a"], 2, commit=True):
        1 / 0  # noqa: B018
    assert m.num_committed_frames("a") == 2 and m.block_ids("a") == [1, 2]
    view = m.begin_forward(["a"], 2, commit=True)
    assert m.pool.num_used_blocks == 4
    m.free("a")
    assert view.closed and m.pool.num_used_blocks == 0
    view.abort()  # idempotent


# ---------------------------------------------------------------------- attention correctness


class BruteForce:
    """Per-frame K/V history; attention recomputed from scratch with the window rule."""

    def __init__(self, cfg: CacheConfig) -> None:
        self.cfg = cfg
        self.frames: dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.num_frames: dict[str, int] = {}

    def attend(self, sid: str, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               num_frames: int) -> torch.Tensor:
        n = self.num_frames.setdefault(sid, 0)
        past = visible_cached_frames(self.cfg, n, n, n + num_frames)
        ks = [self.frames[sid][j][layer][0] for j in past] + [k]
        vs = [self.frames[sid][j][layer][1] for j in past] + [v]
        kk, vv = torch.cat(ks), torch.cat(vs)  # [Lk, H, D]
        return F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1)).transpose(0, 1)

    def store(self, sid: str, layer: int, k: torch.Tensor, v: torch.Tensor, num_frames: int) -> None:
        n = self.num_frames[sid]
        for f in range(num_frames):
            sl = slice(f * TOKENS_PER_FRAME, (f + 1) * TOKENS_PER_FRAME)
            self.frames.setdefault(sid, {}).setdefault(n + f, [None] * 8)[layer] = (k[sl], v[sl])  # type: ignore


@pytest.mark.parametrize("cfg,prefer_gather,layout,page", [
    (CacheConfig(window_frames=6, sink_frames=2), False, "paged", None),
    (CacheConfig(window_frames=6, sink_frames=2), True, "gather", None),
    (CacheConfig(window_frames=None), False, "paged", None),
    (CacheConfig(window_frames=7, sink_frames=1, block_size_frames=2), False, None, None),
    (CacheConfig(window_frames=8, sink_frames=3, block_size_frames=3), False, None, None),
    # token-granular pages: frames of 2 tokens cut by 3- and 5-token pages, sinks ending mid-page
    (CacheConfig(window_frames=6, sink_frames=2), False, "paged", 3),
    (CacheConfig(window_frames=8, sink_frames=3), False, "paged", 5),
    (CacheConfig(window_frames=5, sink_frames=0), False, "paged", 3),
    (CacheConfig(window_frames=None), False, "paged", 5),
], ids=["bsf1-paged", "bsf1-gather", "nowindow", "bsf2", "bsf3", "tok3-w6s2", "tok5-w8s3", "tok3-w5s0",
        "tok5-nowindow"])
def test_attention_equals_brute_force(cfg: CacheConfig, prefer_gather: bool, layout: str | None,
                                      page: int | None) -> None:
    num_layers, heads, dim, chunk = 2, 2, 4, 2
    m = make_manager(cfg, num_blocks=100, num_layers=num_layers, num_heads=heads, head_dim=dim,
                     block_size_tokens=page)
    ref = BruteForce(cfg)
    sids = ["a", "b", "c"]
    for sid in sids:
        assert m.admit(sid, m.worst_case_frames(chunk, total_frames=28))
    layouts = set()
    for step in range(14):
        active = sids[: 1 + min(step, 2)]  # b and c join later: different context lengths in one batch
        for commit in (False, True):
            view = m.begin_forward(active, chunk, commit=commit, prefer_gather=prefer_gather)
            layouts.add(view.layout)
            with view:
                for layer in range(num_layers):
                    q, k, v = (torch.randn(len(active), chunk * TOKENS_PER_FRAME, heads, dim) for _ in range(3))
                    out = view.attend(layer, q, k, v)
                    for b, sid in enumerate(active):
                        expected = ref.attend(sid, layer, q[b], k[b], v[b], chunk)
                        torch.testing.assert_close(out[b], expected, atol=1e-6, rtol=1e-5)
                        if commit:
                            ref.store(sid, layer, k[b], v[b], chunk)
            if commit:
                for sid in active:
                    ref.num_frames[sid] += chunk
    if layout is not None:
        assert layouts == {layout}
    for sid in sids:
        m.free(sid)
    assert m.pool.num_used_blocks == 0


def test_gradients_flow_through_the_chunk_and_not_into_the_pool() -> None:
    m = make_manager(CacheConfig(window_frames=6, sink_frames=2), num_blocks=20, num_heads=2, head_dim=4)
    m.admit("a", 8)
    run_forward(m, ["a"], 2, commit=True)
    q, k, v = (torch.randn(1, 2 * TOKENS_PER_FRAME, 2, 4, requires_grad=True) for _ in range(3))
    with m.begin_forward(["a"], 2, commit=False) as view:
        assert view.layout == "paged"
        out = view.attend(0, q, k, v)  # grad on: takes the gather layout with the chunk's own K/V
    with torch.no_grad(), m.begin_forward(["a"], 2, commit=False) as view:
        expected = view.attend(0, q, k, v)  # paged layout, no grad
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    assert not m.pool.k_cache.requires_grad and m.pool.k_cache.grad_fn is None


# ---------------------------------------------------------------------- token-granular pages


def test_token_pages_split_frames_and_mask_dead_tokens_exactly() -> None:
    """2-token frames in 3-token pages: frame 1 spans pages 0-1, frame 4 pages 2-3, ... Exact ids, rows, masks."""
    m = make_manager(CacheConfig(window_frames=4, sink_frames=1), block_size_tokens=3)  # R = 3
    # sinks: 2 tokens -> 1 page; a 5-frame run (10 tokens) starting at offset <= 2 touches <= 4 pages
    assert m.worst_case_frames(2) == 6 and m.blocks_for_frames(6) == 5
    assert m.admit("a", 6)
    run_forward(m, ["a"], 2, commit=True)             # frames 0, 1 = tokens 0-3 -> pages 0, 1
    assert m.block_ids("a") == [1, 2]
    assert m.frame_location("a", 1) == (1, 2) and m.frame_slots("a", 1).tolist() == [1 * 3 + 2, 2 * 3 + 0]
    run_forward(m, ["a"], 2, commit=True)             # frames 2, 3 = tokens 4-7: page 1 filled, page 2 new
    assert m.block_ids("a") == [1, 2, 3]

    view = m.begin_forward(["a"], 2, commit=True)     # frames 4, 5 = tokens 8-11; sees sink 0 and frame 3
    # visible tokens 0-1 (page 0, whose token 2 is frame 1: out of the window), 6-7, 8-11 (pages 2, 3 full):
    # full pages first, the partial one last, and what remains visible is a prefix -> no mask.
    assert view.plan.block_table.tolist() == [[3, 4, 1]] and view.plan.seq_lens.tolist() == [8]
    assert view.plan.kv_valid is None
    view.attend(0, *(torch.randn(1, 4, 1, 2) for _ in range(3)))
    view.finish()
    assert m.resident_frames("a") == [0, 3, 4, 5]
    assert m.block_ids("a") == [1, 3, 4] and m.pool.is_free(2)  # page 1 (frames 1, 2) died whole

    view = m.begin_forward(["a"], 2, commit=True)     # frames 6, 7 = tokens 12-15 -> pages 4, 5 (blocks 2, 5)
    # sink page 0 [T T F], page 3 = tokens 9-11 [F T T] (frame 4 evicted, frame 5 live), page 4 full,
    # page 5 [T F F] (written up to token 15): three partial pages -> a token mask.
    assert view.plan.block_table.tolist() == [[2, 1, 4, 5]] and view.plan.seq_lens.tolist() == [10]
    assert view.plan.kv_valid is not None
    assert view.plan.kv_valid.int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0]]
    view.attend(0, *(torch.randn(1, 4, 1, 2) for _ in range(3)))
    view.finish()
    assert m.resident_frames("a") == [0, 5, 6, 7] and m.block_ids("a") == [1, 4, 2, 5]
    assert m.pool.is_free(3)
    with pytest.raises(KeyError, match="frame 4 of session 'a' is not stored"):
        m.frame_location("a", 4)                      # its page is alive (frame 5), the frame is not
    # live tokens: frame 0 (2) + frames 5-7 (6) = 8 of 4 pages x 3 tokens
    usage = m.usage()
    assert usage.live_token_bytes == 8 * m.pool.spec.bytes_per_token and usage.used_bytes == 12 * (
        m.pool.spec.bytes_per_token)
    m.free("a")
    assert m.pool.num_used_blocks == 0


def test_token_pages_share_whole_pages_and_copy_the_open_one() -> None:
    m = make_manager(CacheConfig(window_frames=None), block_size_tokens=3)
    assert m.admit("src", 8) and m.admit("dst", 8)
    run_forward(m, ["src"], 2, commit=True)  # tokens 0-3: page 0 (block 1) full, page 1 (block 2) holds token 3
    run_forward(m, ["src"], 1, commit=True)  # frame 2 = tokens 4-5: page 1 full now
    m.share_prefix("src", "dst", 2)          # prefix = tokens 0-3: page 0 shared, page 1 copied (src wrote on)
    assert m.block_ids("dst") == [1, 3] and m.pool.ref_count(1) == 2 and m.pool.ref_count(2) == 1
    run_forward(m, ["dst"], 1, commit=True)  # dst writes its own frame 2 into its copy, not into src's page
    assert m.block_ids("dst") == [1, 3] and m.block_ids("src") == [1, 2]
    assert m.frame_slots("dst", 1).tolist() == [1 * 3 + 2, 3 * 3 + 0]  # block 1 offset 2, block 3 offset 0


def test_token_pages_rewrite_recomputes_frames_across_page_edges() -> None:
    """Prompt re-cache with pages cutting frames: each resident frame's tokens get the new K/V, the dead
    tokens sharing their pages stay as they were, and the next chunk attends to the rewritten keys."""
    cfg = CacheConfig(window_frames=4, sink_frames=1)
    m = make_manager(cfg, block_size_tokens=3)
    ref = BruteForce(cfg)
    assert m.admit("a", 6)
    for _ in range(3):  # frames 0-5; resident 0, 3, 4, 5
        with m.begin_forward(["a"], 2, commit=True) as view:
            k, v = torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2)
            view.attend(0, k, k, v)
            ref.attend("a", 0, k[0], k[0], v[0], 2)
            ref.store("a", 0, k[0], v[0], 2)
        ref.num_frames["a"] += 2
    frames = m.resident_frames("a")
    assert frames == [0, 3, 4, 5]
    k_flat = m.pool.k_cache[0].view(-1, 1, 2)
    dead_slot = m.frame_slots("a", 0)[-1] + 1   # token 2 of page 0: frame 1, evicted
    dead_before = k_flat[dead_slot].clone()
    visible = torch.ones(4, 4, dtype=torch.bool).tril()
    new_k, new_v = torch.randn(1, 8, 1, 2), torch.randn(1, 8, 1, 2)
    with m.begin_rewrite("a", frames, visible) as view:
        out = view.attend(0, new_k, new_k, new_v)
    mask = visible.repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(out, get_backend("sdpa").attention(new_k, new_k, new_v, mask))
    for i, j in enumerate(frames):
        assert torch.equal(k_flat[m.frame_slots("a", j)], new_k[0, 2 * i:2 * i + 2])
        ref.frames["a"][j][0] = (new_k[0, 2 * i:2 * i + 2], new_v[0, 2 * i:2 * i + 2])
    assert torch.equal(k_flat[dead_slot], dead_before)
    with m.begin_forward(["a"], 2, commit=False) as view:
        q, k, v = (torch.randn(1, 4, 1, 2) for _ in range(3))
        torch.testing.assert_close(view.attend(0, q, k, v)[0], ref.attend("a", 0, q[0], k[0], v[0], 2),
                                   atol=1e-6, rtol=1e-5)


def test_wan_geometry_page_bound_and_waste() -> None:
    """Wan 1.3B (1560 tokens per frame, window 12 incl. 3 sinks, chunks of 3) with 256-token pages."""
    wan = get_preset("wan-1.3b")
    spec = KVPageSpec(1, 1, 1, block_size_tokens=256)
    m = PagedKVCacheManager(BlockPool(spec, 200), wan.cache, wan.tokens_per_frame, get_backend("sdpa"))
    worst = m.worst_case_frames(3)
    assert worst == 15
    # sinks 4680 tokens -> 19 pages; 12 frames from an 8-token-aligned offset (gcd(1560, 256) = 8) -> 75 pages
    assert m.blocks_for_frames(worst) == 19 + 75
    assert m.admit("a", worst)
    most = 0
    for _ in range(12):  # well past the window: the run starts at every offset a 3-frame stride reaches
        view = m.begin_forward(["a"], 3, commit=False)
        most = max(most, len(m.block_ids("a")))
        view.abort()
        view = m.begin_forward(["a"], 3, commit=True)
        most = max(most, len(m.block_ids("a")))
        view._closed = True  # K/V contents do not matter here: commit the bookkeeping only
        m._finish_forward(view, committed=True)
    assert most <= m.blocks_for_frames(worst)
    # steady state: 12 resident frames = 18720 live tokens in the pages that hold them
    usage = m.usage()
    assert usage.live_token_bytes == 12 * 1560 * spec.bytes_per_token
    assert usage.used_bytes - usage.live_token_bytes <= 3 * 256 * spec.bytes_per_token  # < 3 pages of dead tokens


def test_paged_calls_are_counted_by_path() -> None:
    cfg = CacheConfig(window_frames=4, sink_frames=1)
    spec = KVPageSpec(2, 1, 2, block_size_tokens=128)
    for backend, path in ((get_backend("sdpa"), "gathered"), (get_backend("flex", paged="direct"), "direct")):
        m = PagedKVCacheManager(BlockPool(spec, 16), cfg, 64, backend)  # 2 frames per 128-token page
        assert m.admit("a", 6)
        for _ in range(3):
            with m.begin_forward(["a"], 2, commit=True) as view:
                for layer in range(2):
                    x = torch.randn(1, 128, 1, 2)
                    view.attend(layer, x, x, x)
        usage = m.usage()
        assert (usage.paged_direct_calls, usage.paged_gathered_calls) == ((6, 0) if path == "direct" else (0, 6))
    with m.begin_forward(["a"], 2, commit=False, prefer_gather=True) as view:  # the gather layout counts too
        x = torch.randn(1, 128, 1, 2)
        view.attend(0, x, x, x)
    assert (m.usage().paged_direct_calls, m.usage().paged_gathered_calls) == (6, 1)


def test_plan_tensors_live_on_the_pool_device() -> None:
    """Slots, table, lengths and mask are built once per forward and moved to the pool's device
    ("meta" stands in for a GPU here: the move must happen, no data is needed)."""
    spec = KVPageSpec(1, 1, 2, block_size_tokens=3)
    m = PagedKVCacheManager(BlockPool(spec, 16, device="meta"), CacheConfig(window_frames=4, sink_frames=1),
                            TOKENS_PER_FRAME, get_backend("sdpa"))
    assert m.admit("a", 6)
    view = m.begin_forward(["a"], 2, commit=False)
    plan = view.plan
    assert {t.device.type for t in (plan.write_slots, plan.block_table, plan.seq_lens, *plan.cached_slots)} == {"meta"}
    view.abort()
