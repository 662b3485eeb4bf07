"""Which session runs which step next: queues, admission, pacing. Never touches tensors.

A session's life is a sequence of *work items*, each one transformer forward over its
current chunk: optionally ``IMAGE`` (write the start image's latent frame as clean
context) and ``RECACHE`` (rewrite the cached frames under a new prompt), then per chunk
``num_steps`` ``DENOISE`` forwards and one ``COMMIT`` forward whose keys/values stay in
the cache. :meth:`Scheduler.schedule` picks the items of all runnable sessions and groups
those that can share one batched forward (same kind, same chunk length); the model
runner executes them and :meth:`Scheduler.update` advances the bookkeeping.

Continuous batching falls out of this: sessions at different denoising steps and context
lengths share a forward, because timesteps are per frame and attention is per session.
Pacing: a live stream's next chunk is generated once the chunk's *last* frame is within
``max_lead_s`` of its playback clock (or, for a chunk that lasts longer than ``max_lead_s``,
once its first frame is due), so no frame is delivered more than ``max_lead_s`` ahead and
sessions that are behind get the compute.

The scheduler owns the KV cache's space (:class:`KVSpace`): it reserves a session's worst case
when it admits it (the session keeps the returned KV handle), allocates every forward's pages when
it schedules the forward (the batch carries the resulting block tables to the runner, which only
reads them) and frees a session's pages when it finishes, whatever ends it. The waiting
queue is FIFO; a session that waited ``max_queue_wait_s`` is refused whatever the reason it waits
(KV memory short or every slot busy), so a client always gets its signal to retry elsewhere within
the deadline.

Sessions are :class:`~streamgen.engine.session.Session` objects; ``Scheduler.sessions`` is the
engine's one registry of them, and every work item carries a reference to its session.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from streamgen.engine.request import FinishReason
from streamgen.engine.session import Session, Status


class WorkKind(enum.StrEnum):
    IMAGE = "image"
    RECACHE = "recache"
    DENOISE = "denoise"
    COMMIT = "commit"


@dataclass(frozen=True)
class WorkItem:
    session: Session = field(repr=False)
    kind: WorkKind
    start_frame: int
    num_frames: int
    step: int  # denoise step index (DENOISE), else -1

    @property
    def session_id(self) -> str:
        return self.session.session_id


@dataclass(frozen=True)
class ForwardBatch:
    """Work items that run as one batched transformer forward.

    ``kv``: what the scheduler's KV space allocated for this forward (for the paged cache, the open
    cache view whose plan holds the step's block tables and write slots; the runner runs the model
    on it). ``None`` for a RECACHE forward, which rewrites pages the session already holds.
    """

    kind: WorkKind
    num_frames: int
    items: tuple[WorkItem, ...]
    kv: object | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SchedulerOutput:
    batches: tuple[ForwardBatch, ...]
    admitted: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()       # gave up waiting for the pool (see Session.error)
    throttled: tuple[str, ...] = ()      # ahead of their playback clock, skipped this step
    deferred: tuple[str, ...] = ()       # runnable, but waiting for new streams' first chunks
    next_wakeup_s: float | None = None   # when a throttled session becomes runnable again

    @property
    def is_empty(self) -> bool:
        return not self.batches


@dataclass(frozen=True)
class SchedulerConfig:
    num_steps: int = 4
    chunk_frames: int = 3
    max_running: int = 8
    max_queue_wait_s: float = 30.0
    max_lead_s: float = math.inf       # pacing: inf = generate as fast as possible
    # A stream's first chunk runs before the others' work: its first frame then waits for its own
    # five forwards, not for five batched forwards of every stream (the engine turns this on where a
    # batched forward costs about B single ones: CPUs).
    first_chunk_first: bool = False

    def __post_init__(self) -> None:
        if self.num_steps <= 0 or self.chunk_frames <= 0 or self.max_running <= 0:
            raise ValueError("SchedulerConfig num_steps, chunk_frames and max_running must be > 0")
        if self.max_queue_wait_s < 0 or self.max_lead_s <= 0:
            raise ValueError("SchedulerConfig max_queue_wait_s must be >= 0 and max_lead_s > 0")


class AdmissionDecision(enum.Enum):
    ADMIT = "admit"   # resources reserved: the session runs from now on
    WAIT = "wait"     # not now (the pool is short); retry when a session ends
    NEVER = "never"   # can never fit (needs more than the whole pool): refuse at once


@dataclass(frozen=True)
class Admission:
    """What the admission callback decided for one session, and why (for the client's message)."""

    decision: AdmissionDecision
    reason: str = ""
    handle: object | None = None  # ADMIT: the session's KV handle (kept on ``Session.kv`` while it runs)


class KVSpace(Protocol):
    """The KV cache's space as the scheduler sees it (no tensors)."""

    def reserve(self, session_id: str, worst_case_frames: int) -> Admission:
        """Reserve a session's worst case (ADMIT), or say why not (WAIT: short now; NEVER: never fits)."""
        ...

    def release(self, session_id: str) -> None:
        """Give back everything the session holds (nothing if it holds nothing)."""
        ...

    def allocate(self, kind: WorkKind, num_frames: int, items: tuple[WorkItem, ...]) -> object | None:
        """Allocate one forward's pages for its sessions, each starting at its item's ``start_frame``,
        and return what the runner needs (block tables); ``None`` when the forward allocates nothing."""
        ...


@dataclass
class Scheduler:
    config: SchedulerConfig
    kv: KVSpace
    sessions: dict[str, Session] = field(default_factory=dict)
    waiting: deque[str] = field(default_factory=deque)

    # ------------------------------------------------------------------ lifecycle
    def add(self, session: Session) -> None:
        if session.session_id in self.sessions:
            raise ValueError(f"session {session.session_id!r} already exists")
        session.needs_image = session.has_image
        self.sessions[session.session_id] = session
        self.waiting.append(session.session_id)

    def finish(self, session_id: str, reason: FinishReason, error: str | None = None) -> Session:
        """End a session (it stays registered until :meth:`remove`); its KV space is freed now."""
        s = self.get(session_id)
        if s.status is Status.WAITING:
            self.waiting.remove(session_id)
        was_running = s.status is Status.RUNNING
        s.status = Status.FINISHED
        s.finish_reason = reason
        s.error = error
        if was_running:
            self.kv.release(session_id)
            s.kv = None
        return s

    def remove(self, session_id: str) -> None:
        s = self.get(session_id)
        if s.status is not Status.FINISHED:
            raise ValueError(f"session {session_id!r} is still {s.status.value}; finish it first")
        del self.sessions[session_id]

    def request_recache(self, session_id: str) -> None:
        s = self.get(session_id)
        if s.status is Status.FINISHED:
            raise ValueError(f"session {session_id!r} has finished")
        # Applied at the next chunk boundary: the runner swaps the prompt and, if frames are
        # cached, rewrites their keys/values under it (LongLive's KV re-cache).
        s.needs_recache = True

    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"unknown session {session_id!r}") from None

    @property
    def num_running(self) -> int:
        return sum(s.status is Status.RUNNING for s in self.sessions.values())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ scheduling
    def _admit_waiting(self, now_s: float) -> tuple[list[str], list[str]]:
        admitted, rejected = [], []
        while self.waiting and self.num_running < self.config.max_running:
            sid = self.waiting[0]
            s = self.sessions[sid]
            result = self.kv.reserve(sid, s.worst_case_frames)
            if result.decision is AdmissionDecision.ADMIT:
                self.waiting.popleft()
                s.status = Status.RUNNING
                s.start_s = now_s
                s.kv = result.handle
                admitted.append(sid)
                continue
            if result.decision is AdmissionDecision.NEVER:
                self.finish(sid, FinishReason.REJECTED, result.reason)
                rejected.append(sid)
                continue
            if now_s - s.arrival_s >= self.config.max_queue_wait_s:
                self._reject(sid, result.reason)
                rejected.append(sid)
                continue
            break  # FIFO: later sessions wait behind the head of the queue
        # The deadline holds whatever the slot state: with every slot busy nothing above looked at
        # the queue, and a session behind a waiting head is never looked at either.
        expired = [sid for sid in self.waiting
                   if now_s - self.sessions[sid].arrival_s >= self.config.max_queue_wait_s]
        for sid in expired:
            busy = self.num_running >= self.config.max_running
            self._reject(sid, f"all {self.config.max_running} sessions busy" if busy
                         else "waiting behind earlier sessions for KV memory")
            rejected.append(sid)
        return admitted, rejected

    def _reject(self, session_id: str, reason: str) -> None:
        self.finish(session_id, FinishReason.REJECTED,
                    f"not admitted within {self.config.max_queue_wait_s:g} s: {reason}")

    def _next_item(self, s: Session) -> WorkItem:
        if s.needs_image:
            return WorkItem(s, WorkKind.IMAGE, 0, 1, -1)
        if s.needs_recache and s.step == 0:  # only at a chunk boundary
            return WorkItem(s, WorkKind.RECACHE, 0, s.next_frame, -1)
        if s.chunk_frames == 0:
            s.chunk_frames = self._chunk_len(s)
        if s.step < self.config.num_steps:
            return WorkItem(s, WorkKind.DENOISE, s.next_frame, s.chunk_frames, s.step)
        return WorkItem(s, WorkKind.COMMIT, s.next_frame, s.chunk_frames, -1)

    def _chunk_len(self, s: Session) -> int:
        if s.total_latent_frames is None:
            return self.config.chunk_frames
        return min(self.config.chunk_frames, s.total_latent_frames - s.next_frame)

    def schedule(self, now_s: float) -> SchedulerOutput:
        admitted, rejected = self._admit_waiting(now_s)
        groups: dict[tuple[WorkKind, int], list[WorkItem]] = {}
        throttled: list[str] = []
        deferred: list[str] = []
        wakeup: float | None = None
        first_only = self._first_chunks_only(now_s)
        for s in self.sessions.values():
            if s.status is not Status.RUNNING:
                continue
            if s.paused:
                throttled.append(s.session_id)
                continue
            if first_only and not s.starting:
                deferred.append(s.session_id)
                continue
            item = self._next_item(s)
            if item.kind is WorkKind.DENOISE and item.step == 0:  # pacing decides at a chunk's start only
                wait = s.wait_for_pacing_s(now_s, item.num_frames * s.pixel_frames_per_latent, self.config.max_lead_s)
                if wait > 0:
                    throttled.append(s.session_id)
                    wakeup = now_s + wait if wakeup is None else min(wakeup, now_s + wait)
                    continue
            # A RECACHE forward covers one session's resident frames, so it never shares a batch.
            key = (item.kind, item.num_frames) if item.kind is not WorkKind.RECACHE else (item.kind, -len(groups) - 1)
            groups.setdefault(key, []).append(item)
        order = {WorkKind.IMAGE: 0, WorkKind.RECACHE: 1, WorkKind.COMMIT: 2, WorkKind.DENOISE: 3}
        batches = []
        for (kind, _), items in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
            # The step's pages are allocated here, for every forward of the round, and travel with the
            # batch to the runner (as vLLM v1's scheduler allocates slots and hands over block tables).
            batch_items = tuple(items)
            num_frames = batch_items[0].num_frames
            batches.append(ForwardBatch(kind, num_frames, batch_items,
                                        kv=self.kv.allocate(kind, num_frames, batch_items)))
        return SchedulerOutput(tuple(batches), tuple(admitted), tuple(rejected), tuple(throttled), tuple(deferred),
                               next_wakeup_s=wakeup)

    def _first_chunks_only(self, now_s: float) -> bool:
        """Whether this round runs only the streams whose first chunk is not all out yet (``Session.starting``;
        see ``SchedulerConfig.first_chunk_first``). Each stream gets this once, for one chunk, and a
        stream starts only in a free slot, so the others lose at most one chunk's worth of single
        forwards per new stream."""
        if not self.config.first_chunk_first:
            return False
        running = [s for s in self.sessions.values() if s.status is Status.RUNNING and not s.paused]
        new = [s for s in running if s.starting]
        return bool(new) and len(new) < len(running)

    def update(self, item: WorkItem, pixel_frames_emitted: int = 0) -> bool:
        """Advance a session after its work item ran. Returns True when the session completed."""
        s = item.session
        if s.status is not Status.RUNNING:
            return False  # finished (stopped) while its forward ran
        if item.kind is WorkKind.IMAGE:
            s.needs_image = False
            s.next_frame = 1
        elif item.kind is WorkKind.RECACHE:
            s.needs_recache = False
        elif item.kind is WorkKind.DENOISE:
            s.step += 1
            if s.step == self.config.num_steps and s.in_last_chunk:
                # The stream's last chunk was delivered after this step: no later chunk attends to it, so
                # its K/V are never written (the step's pages are released with the session).
                s.emitted_pixel_frames += pixel_frames_emitted
                self.finish(s.session_id, FinishReason.COMPLETED)
                return True
        else:
            s.next_frame += s.chunk_frames
            s.step = 0
            s.chunk_frames = 0
        s.emitted_pixel_frames += pixel_frames_emitted
        if s.total_latent_frames is not None and s.next_frame >= s.total_latent_frames:
            self.finish(s.session_id, FinishReason.COMPLETED)
            return True
        return False
