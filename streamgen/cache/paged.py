"""Per-session block tables over a shared :class:`BlockPool`: admission, rolling window, eviction.

vLLM's ``KVCacheManager`` for a streaming video model. Each session's cache is a table
*logical page -> block id* over one token stream: frame ``j``'s ``T = tokens_per_frame``
tokens sit at stream positions ``[j * T, (j + 1) * T)`` and logical page ``p`` holds positions
``[p * P, (p + 1) * P)``, ``P = block_size_tokens``. The page size is a number of *tokens*
(the pool's), so it can be what a paged kernel needs (flash-attn: a multiple of 256) even
when a frame is not (Wan 1.3B: 1560 tokens); a page may then hold parts of two frames. With
``P`` a multiple of ``T`` (the default: ``P = block_size_frames * T``) pages hold whole frames
as before. No padding: a page is freed when no resident frame overlaps it, and a page that
still holds a live frame beside an evicted one (the window's oldest page, the last sink page)
keeps its dead tokens, which the forward plan masks out (``kv_valid``). Which frames are
stored and visible follows the rolling-window + sink rule of :mod:`streamgen.cache.window`;
because eviction happens at every commit, a session's stored frames are a function of one
integer, its committed frame count, and the manager keeps no per-frame state.

Admission reserves a session's worst case: the sum of admitted sessions' worst-case block
counts never exceeds the pool, so an admitted session can always get its pages and a forward
never fails for lack of memory. When the pool is short, :meth:`PagedKVCacheManager.admit`
returns a refusal the caller can queue on (it does not raise). Sharing (``share_prefix``)
saves physical pages but is not credited to admission, which keeps the guarantee simple.

This module never runs attention and never imports the model; the per-forward view it hands
out (:class:`~streamgen.cache.paged_view.PagedCacheView`) does the tensor work.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from streamgen.attention import AttentionBackend
from streamgen.attention.paged_common import HostLengths, PagedSplit
from streamgen.cache.block_pool import NULL_BLOCK_ID, BlockPool, BlockStateError, KVPageSpec
from streamgen.cache.paged_view import ForwardPlan, PagedCacheView, RewriteView
from streamgen.cache.window import is_resident, resident_frames, visible_cached_frames, worst_case_resident_frames
from streamgen.config import CacheConfig, Preset


def _run_pages(tokens_per_frame: int, page_tokens: int, num_frames: int) -> int:
    """Most pages ``num_frames`` consecutive frames can touch, wherever the run starts.

    A run starts at a frame boundary, i.e. at a page offset that is a multiple of
    ``g = gcd(T, P)``, at worst ``P - g``; ``m * T`` tokens from there span
    ``ceil((P - g + m * T) / P)`` pages (``ceil((m - 1) / bsf) + 1`` for ``bsf``-frame pages).
    """
    if num_frames == 0:
        return 0
    t, page = tokens_per_frame, page_tokens
    return -(-(page - math.gcd(t, page) + num_frames * t) // page)


def pages_for_frames(cache_config: CacheConfig, tokens_per_frame: int, page_tokens: int, num_frames: int) -> int:
    """Upper bound on the pages ``num_frames`` stored frames of one session can occupy.

    Stored frames are the sinks ``[0, S)`` (page-aligned at token 0) plus one contiguous run
    (see :func:`_run_pages`). With one frame per page this is exactly ``num_frames``. The pool's
    admission, the pipeline's pool size and the memory plan all count pages with it.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    num_sinks = min(cache_config.sink_frames, num_frames)
    sink_pages = -(-num_sinks * tokens_per_frame // page_tokens)
    return sink_pages + _run_pages(tokens_per_frame, page_tokens, num_frames - num_sinks)


@dataclass(frozen=True)
class Admission:
    """Outcome of :meth:`PagedKVCacheManager.admit`; falsy when refused (queue and retry)."""

    admitted: bool
    session_id: str
    blocks_needed: int
    blocks_available: int
    reason: str = ""
    blocks: SessionBlocks | None = field(default=None, repr=False)  # the admitted session's KV handle

    def __bool__(self) -> bool:
        return self.admitted


@dataclass(frozen=True)
class PoolUsage:
    """Byte-exact snapshot of the pool. ``live_token_bytes`` counts committed, resident tokens once
    per physical page even when the page is shared. ``paged_*_calls`` count attention calls since
    the manager was built: ``direct`` when the backend read the pages in place, ``gathered`` when
    they were copied into dense K/V first, ``split`` when it read the fully visible pages in place and
    gathered the few partially visible ones (see :meth:`AttentionBackend.paged_layout`)."""

    num_usable_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_reserved_blocks: int
    num_sessions: int
    total_bytes: int
    used_bytes: int
    free_bytes: int
    live_token_bytes: int
    paged_direct_calls: int = 0
    paged_gathered_calls: int = 0
    paged_split_calls: int = 0

    @property
    def usage(self) -> float:
        """Fraction of usable blocks handed out."""
        return self.num_used_blocks / self.num_usable_blocks

    @property
    def utilisation(self) -> float:
        """Fraction of handed-out bytes that hold live tokens (1.0 when nothing is allocated)."""
        return 1.0 if self.used_bytes == 0 else self.live_token_bytes / self.used_bytes


@dataclass(eq=False)
class SessionBlocks:
    """One admitted session's KV handle: its block table, its reservation and how many frames it
    has committed (the cache's own record of what it stores; the scheduler's ``Session`` holds a
    reference). Changed only by the manager."""

    session_id: str
    max_blocks: int                 # admission reservation
    worst_case_frames: int
    num_frames: int = 0             # committed frames = absolute index of the next frame
    pages: dict[int, int] = field(default_factory=dict)  # logical page -> block id
    new_pages: list[int] = field(default_factory=list)   # logical pages reserved by the open view
    view: PagedCacheView | RewriteView | None = None


class PagedKVCacheManager:
    """Owns the sessions' block tables over one pool and hands out per-forward cache views.

    The page size is the pool's ``block_size_tokens``. ``cache_config.block_size_frames > 1``
    pins it to that many whole frames (the pool must agree); with the default ``1`` any page
    size in tokens is accepted.
    """

    def __init__(self, pool: BlockPool, cache_config: CacheConfig, tokens_per_frame: int,
                 backend: AttentionBackend) -> None:
        if tokens_per_frame <= 0:
            raise ValueError(f"tokens_per_frame must be > 0, got {tokens_per_frame}")
        expected = cache_config.block_size_frames * tokens_per_frame
        if cache_config.block_size_frames > 1 and pool.spec.block_size_tokens != expected:
            raise ValueError(f"pool pages hold {pool.spec.block_size_tokens} tokens but block_size_frames="
                             f"{cache_config.block_size_frames} x tokens_per_frame={tokens_per_frame} = {expected}")
        self.pool = pool
        self.cache_config = cache_config
        self.tokens_per_frame = tokens_per_frame
        self.backend = backend
        self.paged_calls: Counter[str] = Counter()  # "direct" / "gathered" attention calls, bumped by views
        self._sessions: dict[str, SessionBlocks] = {}
        self._num_reserved_blocks = 0

    @classmethod
    def from_preset(cls, preset: Preset, backend: AttentionBackend, *, num_blocks: int | None = None,
                    memory_budget_bytes: int | None = None, dtype: torch.dtype = torch.float32,
                    cache_config: CacheConfig | None = None, device: torch.device | str = "cpu",
                    block_size_tokens: int | None = None) -> PagedKVCacheManager:
        """Pool sized by ``num_blocks`` or ``memory_budget_bytes`` (exactly one) for ``preset``'s model.

        ``block_size_tokens``: tokens per page; ``None`` keeps whole-frame pages
        (``cache_config.block_size_frames * tokens_per_frame``). For Wan 1.3B (1560-token frames)
        256 lets flash-attn / xformers / flex read pages in place (docs/serving.md, "KV pages").
        """
        if (num_blocks is None) == (memory_budget_bytes is None):
            raise ValueError("pass exactly one of num_blocks or memory_budget_bytes")
        cfg = cache_config or preset.cache
        if block_size_tokens is None:
            block_size_tokens = cfg.page_tokens(preset.tokens_per_frame)
        elif cfg.block_size_frames > 1:
            raise ValueError(f"pass block_size_tokens or CacheConfig.block_size_frames > 1, not both "
                             f"(got {block_size_tokens} tokens and {cfg.block_size_frames} frames)")
        spec = KVPageSpec(num_layers=preset.model.num_layers, num_heads=preset.model.num_heads,
                          head_dim=preset.model.head_dim, block_size_tokens=block_size_tokens, dtype=dtype)
        pool = (BlockPool(spec, num_blocks, device) if num_blocks is not None
                else BlockPool.from_memory_budget(spec, memory_budget_bytes, device))  # type: ignore[arg-type]
        return cls(pool, cfg, preset.tokens_per_frame, backend)

    # ------------------------------------------------------------------ sizes

    @property
    def block_size_tokens(self) -> int:
        return self.pool.spec.block_size_tokens

    @property
    def bytes_per_frame(self) -> int:
        return self.tokens_per_frame * self.pool.spec.bytes_per_token

    def worst_case_frames(self, chunk_frames: int, total_frames: int | None = None) -> int:
        """Most frames a session stores at once (see :func:`window.worst_case_resident_frames`)."""
        return worst_case_resident_frames(self.cache_config, chunk_frames, total_frames)

    def _pages_of_tokens(self, lo: int, hi: int) -> range:
        """Logical pages holding stream positions ``[lo, hi)``."""
        page = self.block_size_tokens
        return range(lo // page, (hi - 1) // page + 1) if hi > lo else range(0)

    def _pages_of_frames(self, frames: Sequence[int]) -> list[int]:
        """Ascending logical pages holding any token of ``frames``."""
        t = self.tokens_per_frame
        return sorted({lp for j in frames for lp in self._pages_of_tokens(j * t, (j + 1) * t)})

    def blocks_for_frames(self, num_frames: int) -> int:
        """Upper bound on the pages ``num_frames`` stored frames can occupy (:func:`pages_for_frames`)."""
        return pages_for_frames(self.cache_config, self.tokens_per_frame, self.block_size_tokens, num_frames)

    # ------------------------------------------------------------------ admission

    @property
    def num_available_blocks(self) -> int:
        """Usable blocks not reserved by any admitted session."""
        return self.pool.num_usable_blocks - self._num_reserved_blocks

    def can_admit(self, worst_case_frames: int) -> bool:
        """Whether a session storing at most ``worst_case_frames`` frames fits right now."""
        return self._blocks_needed(worst_case_frames) <= self.num_available_blocks

    def _blocks_needed(self, worst_case_frames: int) -> int:
        if worst_case_frames <= 0:
            raise ValueError(f"worst_case_frames must be > 0, got {worst_case_frames}")
        return self.blocks_for_frames(worst_case_frames)

    def admit(self, session_id: str, worst_case_frames: int) -> Admission:
        """Reserve a session's worst case, or refuse with ``reason="pool exhausted: ..."``.

        A refusal changes nothing; retry after another session ends. A duplicate id is a bug
        in the caller and raises ``ValueError``.
        """
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} is already admitted")
        needed = self._blocks_needed(worst_case_frames)
        available = self.num_available_blocks
        if needed > available:
            reason = (f"pool exhausted: session {session_id!r} needs {needed} blocks for {worst_case_frames} frames, "
                      f"{available} of {self.pool.num_usable_blocks} unreserved")
            if needed > self.pool.num_usable_blocks:
                reason += " (more than the whole pool: it can never be admitted)"
            return Admission(False, session_id, needed, available, reason)
        blocks = SessionBlocks(session_id, max_blocks=needed, worst_case_frames=worst_case_frames)
        self._sessions[session_id] = blocks
        self._num_reserved_blocks += needed
        return Admission(True, session_id, needed, available, blocks=blocks)

    def free(self, session_id: str) -> int:
        """End a session: abort its open forward (if any) and return every page. Returns pages dropped."""
        session = self._session(session_id)
        if session.view is not None:
            session.view.abort()
        dropped = list(session.pages.values())
        self.pool.free(dropped)
        self._num_reserved_blocks -= session.max_blocks
        del self._sessions[session_id]
        return len(dropped)

    def share_prefix(self, src_session_id: str, dst_session_id: str, num_frames: int) -> None:
        """Give a fresh session the first ``num_frames`` frames of another (e.g. a shared image frame).

        Pages lying wholly inside the prefix's tokens are shared by refcount; a page that also
        has room for later tokens is copied, because the source will keep writing into it.
        Keys are RoPE'd at the same absolute positions in both sessions, so shared pages need
        no rewrite.
        """
        src, dst = self._session(src_session_id), self._session(dst_session_id)
        if src is dst:
            raise ValueError("cannot share a session's prefix with itself")
        if dst.num_frames != 0 or dst.pages or dst.view is not None:
            raise ValueError(f"session {dst_session_id!r} must be fresh (no frames, no open forward) "
                             "to receive a prefix")
        if not 0 < num_frames <= src.num_frames:
            raise ValueError(f"num_frames={num_frames} must lie in [1, {src.num_frames}] "
                             f"(frames committed by {src_session_id!r})")
        frames = resident_frames(self.cache_config, num_frames)
        missing = [j for j in frames if not is_resident(self.cache_config, j, src.num_frames)]
        if missing:
            raise ValueError(f"frames {missing} of the prefix were already evicted from {src_session_id!r}")
        logical_pages = self._pages_of_frames(frames)
        if len(logical_pages) > dst.max_blocks:
            raise ValueError(f"prefix needs {len(logical_pages)} blocks, more than the {dst.max_blocks} "
                             f"{dst_session_id!r} was admitted with")
        prefix_end = num_frames * self.tokens_per_frame
        shared = [lp for lp in logical_pages if (lp + 1) * self.block_size_tokens <= prefix_end]
        copied = [lp for lp in logical_pages if (lp + 1) * self.block_size_tokens > prefix_end]
        self.pool.incref([src.pages[lp] for lp in shared])
        new_ids = self.pool.allocate(len(copied))
        for lp, block_id in zip(copied, new_ids, strict=True):
            self.pool.copy_block(src.pages[lp], block_id)
        dst.pages = {lp: src.pages[lp] for lp in shared} | dict(zip(copied, new_ids, strict=True))
        dst.pages = dict(sorted(dst.pages.items()))
        dst.num_frames = num_frames

    # ------------------------------------------------------------------ queries

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def num_committed_frames(self, session_id: str) -> int:
        return self._session(session_id).num_frames

    def resident_frames(self, session_id: str) -> list[int]:
        return resident_frames(self.cache_config, self._session(session_id).num_frames)

    def block_ids(self, session_id: str) -> list[int]:
        """The session's block ids in logical (stream) order."""
        return list(self._session(session_id).pages.values())

    def block_table(self, session_id: str) -> torch.Tensor:
        """int32 ``[num_pages]``: the session's block ids in stream order."""
        return torch.tensor(self.block_ids(session_id), dtype=torch.int32)

    def block_tables(self, session_ids: Sequence[str]) -> torch.Tensor:
        """int32 ``[B, max_pages]``, rows padded with the null block 0 (the kernel layout)."""
        rows = [self.block_ids(sid) for sid in session_ids]
        width = max((len(r) for r in rows), default=0)
        return torch.tensor([r + [NULL_BLOCK_ID] * (width - len(r)) for r in rows], dtype=torch.int32
                            ).reshape(len(rows), width)

    def frame_location(self, session_id: str, frame: int) -> tuple[int, int]:
        """``(block id, token offset in the block)`` where a stored frame's first token lives.

        With pages smaller than a frame, or not a multiple of it, the frame continues on the
        next logical page(s); :meth:`frame_slots` lists every token.
        """
        s = self._session(session_id)
        pos = frame * self.tokens_per_frame
        if not is_resident(self.cache_config, frame, s.num_frames) or pos // self.block_size_tokens not in s.pages:
            raise KeyError(f"frame {frame} of session {session_id!r} is not stored")
        return s.pages[pos // self.block_size_tokens], pos % self.block_size_tokens

    def frame_slots(self, session_id: str, frame: int) -> torch.Tensor:
        """int64 ``[T]``: flat indices (into a layer's ``[num_blocks * P]`` token axis) of a stored frame."""
        self.frame_location(session_id, frame)  # raises if not stored
        return self._slots(self._session(session_id), [frame])

    def session_bytes(self, session_id: str) -> int:
        """Bytes of the pages this session holds (a shared page counts fully for each holder)."""
        return len(self._session(session_id).pages) * self.pool.bytes_per_block

    def usage(self) -> PoolUsage:
        # Live token spans per physical block; a shared block's spans are unioned, so it counts once.
        spans: dict[int, list[tuple[int, int]]] = {}
        for s in self._sessions.values():
            for lp, page_spans in self._visible_pages(resident_frames(self.cache_config, s.num_frames)).items():
                spans.setdefault(s.pages[lp], []).extend(page_spans)
        num_live_tokens = 0
        for block_spans in spans.values():
            end = 0
            for lo, hi in sorted(block_spans):
                num_live_tokens += max(0, hi - max(lo, end))
                end = max(end, hi)
        pool = self.pool
        return PoolUsage(num_usable_blocks=pool.num_usable_blocks, num_used_blocks=pool.num_used_blocks,
                         num_free_blocks=pool.num_free_blocks, num_reserved_blocks=self._num_reserved_blocks,
                         num_sessions=len(self._sessions), total_bytes=pool.total_bytes, used_bytes=pool.used_bytes,
                         free_bytes=pool.free_bytes, live_token_bytes=num_live_tokens * pool.spec.bytes_per_token,
                         paged_direct_calls=self.paged_calls["direct"],
                         paged_gathered_calls=self.paged_calls["gathered"],
                         paged_split_calls=self.paged_calls["split"])

    def _session(self, session_id: str) -> SessionBlocks:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KeyError(f"unknown session {session_id!r}") from None

    # ------------------------------------------------------------------ forwards

    def begin_forward(self, session_ids: Sequence[str], num_frames: int, *, commit: bool,
                      start_frames: Sequence[int] | None = None, prefer_gather: bool = False) -> PagedCacheView:
        """Allocate pages for the next ``num_frames`` frames of each session and return the view
        (its plan holds the block tables the kernels read).

        ``commit=True`` for the forward that stores clean K/V (the chunk becomes part of the
        context when the view finishes); ``commit=False`` for denoising forwards, whose K/V
        are written to scratch tokens (fresh pages are released when the view finishes).
        ``start_frames``: where the caller's step starts each session's chunk (the engine's scheduler
        passes its positions); a step that does not start at the session's committed frame count is
        refused with ``BlockStateError`` before anything is allocated. ``prefer_gather`` forces the
        gather layout (parity tests).
        """
        if num_frames <= 0:
            raise ValueError(f"num_frames must be > 0, got {num_frames}")
        if not session_ids:
            raise ValueError("a forward needs at least one session")
        if len(set(session_ids)) != len(session_ids):
            raise ValueError(f"duplicate session ids in one forward: {list(session_ids)}")
        sessions = [self._session(sid) for sid in session_ids]
        for s in sessions:
            if s.view is not None:
                raise RuntimeError(f"session {s.session_id!r} already has an open forward")
        if start_frames is not None:
            if len(start_frames) != len(sessions):
                raise ValueError(f"{len(start_frames)} start frames for {len(sessions)} sessions")
            for s, start in zip(sessions, start_frames, strict=True):
                if start != s.num_frames:
                    raise BlockStateError(f"session {s.session_id!r}: a step at frame {start}, but the cache holds "
                                          f"{s.num_frames} committed frames (a step must start where the last "
                                          "commit ended)")
        t = self.tokens_per_frame
        new_pages: list[list[int]] = []
        for s in sessions:
            touched = self._pages_of_tokens(s.num_frames * t, (s.num_frames + num_frames) * t)
            fresh = [lp for lp in touched if lp not in s.pages]
            for lp in touched:
                if lp in s.pages and self.pool.ref_count(s.pages[lp]) != 1:
                    raise BlockStateError(f"session {s.session_id!r} would write into shared block {s.pages[lp]}")
            if len(s.pages) + len(fresh) > s.max_blocks:
                raise ValueError(f"session {s.session_id!r} would hold {len(s.pages) + len(fresh)} blocks, more than "
                                 f"the {s.max_blocks} reserved for worst_case_frames={s.worst_case_frames}")
            new_pages.append(fresh)
        block_ids = self.pool.allocate(sum(len(f) for f in new_pages))  # cannot fail: reservations cover it
        it = iter(block_ids)
        for s, fresh in zip(sessions, new_pages, strict=True):
            for lp in fresh:
                s.pages[lp] = next(it)
            s.pages = dict(sorted(s.pages.items()))
            s.new_pages = fresh
        view = PagedCacheView(self, self.pool, self.backend, self._plan(sessions, num_frames, commit), prefer_gather)
        for s in sessions:
            s.view = view
        return view

    def begin_rewrite(self, session_id: str, frames: Sequence[int], visible: torch.Tensor) -> RewriteView:
        """Open a forward that recomputes the keys/values of already-stored frames in place.

        Used for LongLive's KV re-cache on a prompt switch: the model runs over exactly the
        session's resident frames (at their absolute positions); attention is among them
        under ``visible`` (bool ``[n, n]`` over ``frames``, True = may attend), and each
        layer's new keys/values overwrite the frames' token slots (wherever a page boundary
        cuts them). No page is allocated or freed; dead tokens sharing a page are untouched.
        """
        s = self._session(session_id)
        if s.view is not None:
            raise RuntimeError(f"session {session_id!r} already has an open forward")
        frames = list(frames)
        resident = resident_frames(self.cache_config, s.num_frames)
        if frames != resident:
            raise ValueError(f"rewrite must cover exactly the resident frames {resident}, got {frames}")
        if tuple(visible.shape) != (len(frames), len(frames)) or visible.dtype != torch.bool:
            raise ValueError(f"visible must be bool [{len(frames)}, {len(frames)}], got {visible.dtype} "
                             f"{tuple(visible.shape)}")
        for lp in self._pages_of_frames(frames):
            if self.pool.ref_count(s.pages[lp]) != 1:
                raise BlockStateError(f"session {session_id!r} would rewrite shared block {s.pages[lp]}")
        device = self.pool.k_cache.device
        mask = visible.to(device).repeat_interleave(self.tokens_per_frame, 0).repeat_interleave(
            self.tokens_per_frame, 1)
        view = RewriteView(self, self.pool, self.backend, session_id, self._slots(s, frames).to(device), mask)
        s.view = view
        return view

    def _finish_rewrite(self, view: RewriteView) -> None:
        s = self._sessions.get(view.session_id)
        if s is not None and s.view is view:
            s.view = None

    def _slots(self, s: SessionBlocks, frames: Sequence[int]) -> torch.Tensor:
        """int64 ``[len(frames) * T]``: flat token indices (into ``[N * P]``) of ``frames``' tokens, in order."""
        t, page = self.tokens_per_frame, self.block_size_tokens
        if not frames:
            return torch.zeros(0, dtype=torch.int64)
        pos = (torch.tensor(list(frames), dtype=torch.int64)[:, None] * t + torch.arange(t)).reshape(-1)  # stream
        lps = pos // page
        lookup = torch.tensor([s.pages.get(lp, -1) for lp in range(int(lps.max()) + 1)], dtype=torch.int64)
        blocks = lookup[lps]
        if bool((blocks < 0).any()):
            raise BlockStateError(f"session {s.session_id!r} has no page for some tokens of frames {list(frames)}")
        return blocks * page + pos % page

    def _visible_pages(self, frames: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
        """Logical page -> ``[lo, hi)`` token offsets in it held by ``frames`` (ascending; pages ascending)."""
        t, page = self.tokens_per_frame, self.block_size_tokens
        ranges: list[list[int]] = []  # stream ranges, consecutive frames merged
        for j in frames:
            if ranges and ranges[-1][1] == j * t:
                ranges[-1][1] += t
            else:
                ranges.append([j * t, (j + 1) * t])
        per_page: dict[int, list[tuple[int, int]]] = {}
        for lo, hi in ranges:
            for lp in self._pages_of_tokens(lo, hi):
                base = lp * page
                per_page.setdefault(lp, []).append((max(lo, base) - base, min(hi, base + page) - base))
        return per_page

    def _plan(self, sessions: list[SessionBlocks], num_frames: int, commit: bool) -> ForwardPlan:
        """Per session: where the chunk's tokens go, and which stored tokens it sees, as slots and as pages.

        The table row lists the pages holding visible tokens, fully visible pages first and pages
        with dead tokens (evicted frames beside live ones, room not yet written) after them, so
        that with whole-frame pages the visible tokens are a prefix of the row (``kv_valid`` None,
        what every paged kernel reads). Otherwise ``kv_valid`` marks them token by token.
        """
        cfg, page = self.cache_config, self.block_size_tokens
        write_slots, cached_slots, rows, row_pages, lens, num_full = [], [], [], [], [], []
        prefix_only = True
        for s in sessions:
            start, end = s.num_frames, s.num_frames + num_frames
            cached = visible_cached_frames(cfg, s.num_frames, start, end)
            per_page = self._visible_pages(cached + list(range(start, end)))
            self.pool.check_live(s.pages[lp] for lp in per_page)
            slots = self._slots(s, cached + list(range(start, end)))
            num_cached = len(cached) * self.tokens_per_frame
            cached_slots.append(slots[:num_cached])
            write_slots.append(slots[num_cached:])
            full = [lp for lp, spans in per_page.items() if spans == [(0, page)]]
            partial = [lp for lp, spans in per_page.items() if spans != [(0, page)]]
            order = full + partial  # a partially visible page last, so whole-frame pages stay a prefix
            rows.append([s.pages[lp] for lp in order])
            row_pages.append([per_page[lp] for lp in order])
            num_full.append(len(full))
            num_visible = sum(hi - lo for spans in per_page.values() for lo, hi in spans)
            lens.append(len(full) * page if not partial else (len(order) - 1) * page + per_page[partial[-1]][-1][1])
            prefix_only = prefix_only and lens[-1] == num_visible
        width = max(len(r) for r in rows)
        block_table = torch.tensor([r + [NULL_BLOCK_ID] * (width - len(r)) for r in rows], dtype=torch.int32)
        kv_valid = None
        if not prefix_only:
            kv_valid = torch.zeros(len(rows), width * page, dtype=torch.bool)
            for b, pages in enumerate(row_pages):
                for col, spans in enumerate(pages):
                    for lo, hi in spans:
                        kv_valid[b, col * page + lo:col * page + hi] = True
        device = self.pool.k_cache.device
        split = None
        if kv_valid is not None and min(num_full) > 0:
            split = self._split(block_table, kv_valid, [len(r) for r in rows], num_full, device)
        return ForwardPlan(session_ids=tuple(s.session_id for s in sessions),
                           start_frames=tuple(s.num_frames for s in sessions), num_frames=num_frames,
                           num_tokens=num_frames * self.tokens_per_frame, commit=commit,
                           write_slots=torch.cat(write_slots).to(device), block_table=block_table.to(device),
                           seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                           kv_valid=None if kv_valid is None else kv_valid.to(device),
                           cached_slots=tuple(c.to(device) for c in cached_slots),
                           lengths=HostLengths(tuple(lens), None if kv_valid is None
                                               else tuple(int(n) for n in kv_valid.sum(dim=1).tolist())),
                           split=split)

    def _split(self, block_table: torch.Tensor, kv_valid: torch.Tensor, row_lens: list[int], num_full: list[int],
               device: torch.device) -> PagedSplit:
        """The plan's rows cut after their fully visible pages (listed first): a head a prefix kernel reads
        in place and the partially visible tail pages (:class:`~streamgen.attention.paged_common.PagedSplit`),
        sliced from the plan's host-side block table and ``kv_valid``."""
        page = self.block_size_tokens
        width = max(1, max(n_row - n for n_row, n in zip(row_lens, num_full, strict=True)))
        tail_table = torch.full((len(row_lens), width), NULL_BLOCK_ID, dtype=torch.int32)
        tail_valid = torch.zeros(len(row_lens), width * page, dtype=torch.bool)
        for b, (n_row, n) in enumerate(zip(row_lens, num_full, strict=True)):
            tail_table[b, :n_row - n] = block_table[b, n:n_row]
            tail_valid[b, :(n_row - n) * page] = kv_valid[b, n * page:n_row * page]
        counts = tail_valid.sum(dim=1, dtype=torch.int32)
        head = tuple(n * page for n in num_full)
        return PagedSplit(head_lens=torch.tensor(head, dtype=torch.int32, device=device), head_lengths=head,
                          tail_table=tail_table.to(device), tail_valid=tail_valid.to(device),
                          tail_counts=counts.to(device),
                          tail_lengths=HostLengths((width * page,) * len(row_lens), tuple(counts.tolist())))

    def _finish_forward(self, view: PagedCacheView, committed: bool) -> None:
        """Called by the view: commit + evict, or release the chunk's fresh pages."""
        t, page = self.tokens_per_frame, self.block_size_tokens
        released: list[int] = []
        for sid in view.session_ids:
            s = self._sessions.get(sid)
            if s is None or s.view is not view:
                continue  # session freed while the forward was open
            if committed:
                s.num_frames += view.plan.num_frames
                # A page dies when no resident frame overlaps it (dead tokens beside live ones stay, masked).
                dead = [lp for lp in s.pages
                        if not any(is_resident(self.cache_config, j, s.num_frames)
                                   for j in range(lp * page // t, ((lp + 1) * page - 1) // t + 1))]
            else:
                dead = s.new_pages
            released += [s.pages.pop(lp) for lp in dead]
            s.new_pages = []
            s.view = None
        # One call, so the next allocation hands the ids out again in session-then-page order.
        self.pool.free(released)
