"""One forward's view of the paged KV cache for a batch of sessions (the ``SelfAttentionCache``).

The manager (:mod:`streamgen.cache.paged`) plans a forward once: it reserves pages for the
chunk's frames and precomputes, for every session, where the chunk's K/V go (``write_slots``)
and which stored tokens the chunk may see (a block table + lengths + a token mask, and token
slots). This view then only moves tensors, per layer:

1. ``attend`` writes the chunk's K/V into its pages (in every forward: a noisy denoising
   forward writes to pages that are released again, a committing forward to pages that stay);
2. it runs the attention backend over the visible pages. Two layouts, one answer:

   * *paged*: the backend's ``paged_attention`` over the block table; the visible tokens are
     the first ``seq_len`` of a row (always so with one frame per page) or, when a window
     edge or an evicted frame leaves dead tokens inside a page, those ``kv_valid`` marks.
     The backend reads the pages in place ("direct") or copies them first ("gathered"), as
     its ``paged_layout`` says; the view counts both on the manager (``/metrics``);
   * *gather*: the visible *stored* tokens are gathered by slot and concatenated with the
     chunk's own K/V (as given, so autograd flows through them), then dense ``attention``.
     Used whenever gradients are on, and when asked (``prefer_gather``); counted as gathered.

Eviction is never done here: it happens in :meth:`finish` (the manager's commit), after the
forward, so a window never shrinks under a running forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from streamgen.attention.paged_common import HostLengths, PagedSplit

if TYPE_CHECKING:
    from streamgen.attention import AttentionBackend
    from streamgen.cache.block_pool import BlockPool
    from streamgen.cache.paged import PagedKVCacheManager


@dataclass(frozen=True)
class ForwardPlan:
    """Everything a view needs, computed once per forward by the manager.

    ``N`` = pool blocks, ``P`` = tokens per page, ``B`` = sessions, ``L`` = chunk tokens.
    """

    session_ids: tuple[str, ...]
    start_frames: tuple[int, ...]       # first frame of the chunk, per session
    num_frames: int                     # chunk length in latent frames (same for all sessions)
    num_tokens: int                     # L = num_frames * tokens_per_frame
    commit: bool
    write_slots: torch.Tensor           # int64 [B * L]: flat index into the [N * P] token axis
    block_table: torch.Tensor           # int32 [B, max_blocks], padded with block 0; visible pages only
    seq_lens: torch.Tensor              # int32 [B]: no visible token at or beyond this row position
    kv_valid: torch.Tensor | None       # bool [B, max_blocks * P]: visible row positions; None = the prefix
    cached_slots: tuple[torch.Tensor, ...]  # per session int64 [num_visible_cached_tokens]
    lengths: HostLengths | None = None  # seq_lens (and kv_valid's row counts) as ints: no device reads
    split: PagedSplit | None = None     # with kv_valid: the rows cut into in-place full pages + partial ones


class PagedCacheView:
    """``SelfAttentionCache`` over paged memory for one forward of ``B`` sessions.

    Use as a context manager (``with manager.begin_forward(...) as view: model(..., cache=view)``):
    a clean exit commits (or releases the scratch pages of a non-committing forward), an
    exception aborts and returns every page reserved for the chunk.
    """

    def __init__(self, owner: PagedKVCacheManager, pool: BlockPool, backend: AttentionBackend,
                 plan: ForwardPlan, prefer_gather: bool = False) -> None:
        self._owner = owner
        self._pool = pool
        self._backend = backend
        self.plan = plan
        self._prefer_gather = prefer_gather
        self._layers_written: set[int] = set()
        self._closed = False
        # Equal context lengths let the gather layout run as one batched call; concatenate once here,
        # not once per layer.
        slots = plan.cached_slots
        self._batched_slots = torch.cat(slots) if all(s.numel() == slots[0].numel() for s in slots) else None
        self.paged_path = backend.paged_layout(pool.spec.block_size_tokens, masked=plan.kv_valid is not None,
                                               device=pool.k_cache.device)
        if self.paged_path == "split" and plan.split is None:
            self.paged_path = "gather (a row has no fully visible page to read in place)"

    # ------------------------------------------------------------------ introspection

    @property
    def session_ids(self) -> tuple[str, ...]:
        return self.plan.session_ids

    @property
    def commit(self) -> bool:
        return self.plan.commit

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def layout(self) -> str:
        """``"paged"`` or ``"gather"``: the layout gradient-free ``attend`` calls will use.

        Within ``"paged"``, :attr:`paged_path` says whether the backend reads the pages in place
        (``"direct"``) or copies them (``"gather (why)"``)."""
        return "gather" if self._prefer_gather else "paged"

    # ------------------------------------------------------------------ the protocol

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the chunk's K/V of ``layer_idx`` and attend over the visible context.

        ``q, k, v: [B, L, H, D]`` with keys RoPE'd at absolute positions. Returns ``[B, L, H, D]``.
        """
        if self._closed:
            raise RuntimeError("this cache view is closed (committed, aborted, or its session was freed)")
        self._check_inputs(layer_idx, q, k, v)
        batch, num_tokens, heads, head_dim = k.shape
        k_pool, v_pool = self._pool.layer(layer_idx)  # [N, P, H, D] each
        k_flat = k_pool.view(-1, heads, head_dim)     # [N * P, H, D]
        v_flat = v_pool.view(-1, heads, head_dim)
        # The pool is storage, not part of the autograd graph: write detached values.
        k_flat.index_copy_(0, self.plan.write_slots, k.detach().reshape(batch * num_tokens, heads, head_dim))
        v_flat.index_copy_(0, self.plan.write_slots, v.detach().reshape(batch * num_tokens, heads, head_dim))
        self._layers_written.add(layer_idx)

        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if self.layout == "paged" and not needs_grad:
            if self.paged_path == "split":
                self._owner.paged_calls["split"] += 1
                return self._backend.paged_attention_split(  # type: ignore[attr-defined]
                    q, k_pool, v_pool, self.plan.block_table, self.plan.split)
            self._owner.paged_calls["direct" if self.paged_path == "direct" else "gathered"] += 1
            return self._backend.paged_attention(q, k_pool, v_pool, self.plan.block_table, self.plan.seq_lens,
                                                 self.plan.kv_valid, lengths=self.plan.lengths)
        self._owner.paged_calls["gathered"] += 1
        return self._attend_gathered(q, k, v, k_flat, v_flat)

    def _attend_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_flat: torch.Tensor, v_flat: torch.Tensor) -> torch.Tensor:
        """Stored visible tokens (gathered by slot) ++ the chunk's own K/V, dense attention."""
        if self._batched_slots is not None:
            batch, _, heads, head_dim = k.shape
            past_k = k_flat.index_select(0, self._batched_slots).view(batch, -1, heads, head_dim)  # [B, Lc, H, D]
            past_v = v_flat.index_select(0, self._batched_slots).view(batch, -1, heads, head_dim)
            return self._backend.attention(q, torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1))
        outs = []
        for b, s in enumerate(self.plan.cached_slots):
            past_k = k_flat.index_select(0, s)[None]  # [1, Lc_b, H, D]
            past_v = v_flat.index_select(0, s)[None]
            outs.append(self._backend.attention(q[b:b + 1], torch.cat([past_k, k[b:b + 1]], dim=1),
                                                torch.cat([past_v, v[b:b + 1]], dim=1)))
        return torch.cat(outs, dim=0)

    def _check_inputs(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        spec = self._pool.spec
        if not 0 <= layer_idx < spec.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range [0, {spec.num_layers})")
        expected = (len(self.plan.session_ids), self.plan.num_tokens, spec.num_heads, spec.head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; this view expects [B, L, H, D] = {expected} "
                                 f"({self.plan.num_frames} frames per session, pool heads/head_dim "
                                 f"{spec.num_heads}/{spec.head_dim})")
            if t.dtype != spec.dtype:
                raise ValueError(f"{name} dtype {t.dtype} does not match the KV pool dtype {spec.dtype}")

    # ------------------------------------------------------------------ lifecycle

    def finish(self) -> None:
        """Commit (store the chunk, advance the sessions, evict) or release the scratch pages.

        A committing view must have written every layer; otherwise it is aborted and
        ``RuntimeError`` is raised, because committing half-written pages would poison
        every later chunk.
        """
        if self._closed:
            raise RuntimeError("this cache view is already closed")
        if self.plan.commit and len(self._layers_written) != self._pool.spec.num_layers:
            missing = sorted(set(range(self._pool.spec.num_layers)) - self._layers_written)
            self.abort()
            raise RuntimeError(f"cannot commit: layers {missing} never called attend(); the chunk was aborted")
        self._closed = True
        self._owner._finish_forward(self, committed=self.plan.commit)

    def abort(self) -> None:
        """Return the chunk's reserved pages without committing. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._owner._finish_forward(self, committed=False)

    def __enter__(self) -> PagedCacheView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finish()



class RewriteView:
    """``SelfAttentionCache`` that recomputes stored frames in place (KV re-cache).

    ``attend`` overwrites the frames' slots with the new keys/values and runs masked dense
    attention among the frames themselves; nothing outside them is visible or touched.
    """

    def __init__(self, owner: PagedKVCacheManager, pool: BlockPool, backend: AttentionBackend, session_id: str,
                 slots: torch.Tensor, mask: torch.Tensor) -> None:
        self._owner = owner
        self._pool = pool
        self._backend = backend
        self.session_id = session_id
        self._slots = slots  # int64 [n * T]
        self._mask = mask    # bool [n * T, n * T]
        self._closed = False

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("this rewrite view is closed")
        spec = self._pool.spec
        expected = (1, self._slots.numel(), spec.num_heads, spec.head_dim)
        if tuple(k.shape) != expected or k.dtype != spec.dtype:
            raise ValueError(f"rewrite expects k of shape {expected} and dtype {spec.dtype}, got "
                             f"{tuple(k.shape)} {k.dtype}")
        k_pool, v_pool = self._pool.layer(layer_idx)  # [N, P, H, D]
        k_pool.view(-1, spec.num_heads, spec.head_dim).index_copy_(0, self._slots, k.detach()[0])
        v_pool.view(-1, spec.num_heads, spec.head_dim).index_copy_(0, self._slots, v.detach()[0])
        return self._backend.attention(q, k, v, self._mask)

    def finish(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Close the view. If the forward failed midway, earlier layers keep their rewritten K/V;
        the engine ends such a session, so the mixed state is never attended to."""
        if not self._closed:
            self._closed = True
            self._owner._finish_rewrite(self)

    def __enter__(self) -> RewriteView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()
