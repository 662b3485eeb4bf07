"""The engine loop: requests in, decoded frame chunks out, many sessions in one batch.

:class:`Engine` is synchronous and single-threaded: ``step()`` asks the scheduler what
to run, lets the model runner execute every forward batch, feeds results back to the
scheduler and returns the decoded chunks. :class:`AsyncEngine` runs that loop on a worker
thread and hands each session's chunks to an asyncio queue, which is what the gRPC layer
consumes. A failure inside one session's work ends that session with an error and frees
its pages; the other sessions keep streaming.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from streamgen.cache.paged import PagedKVCacheManager
from streamgen.cache.paged_view import PagedCacheView
from streamgen.config import Preset
from streamgen.engine.model_runner import ModelRunner, StepResult
from streamgen.engine.request import ChunkOutput, ChunkTiming, FinishReason, GenerationRequest, generator_seed
from streamgen.engine.scheduler import Admission, AdmissionDecision, Scheduler, SchedulerConfig, WorkItem, WorkKind
from streamgen.engine.session import Session, Status
from streamgen.model.text import TextEncoder
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    """Serving limits and resources (all validated)."""

    max_sessions: int = 8
    kv_memory_bytes: int = 512 * 2**20
    max_queue_wait_s: float = 30.0
    max_lead_s: float = math.inf
    max_prompt_chars: int = 500
    max_frames: int | None = 16 * 60 * 10  # ten minutes at 16 fps; None = no limit
    unbounded_max_frames: int | None = None  # cap for num_frames=None streams; None = until stopped
    # A new stream's first chunk before the others' work (SchedulerConfig.first_chunk_first);
    # None = where a batched forward costs about as much as its streams one by one: on a CPU.
    first_chunk_first: bool | None = None
    # A stream's first latent frame delivered as soon as it is denoised, the rest of its first chunk in the
    # next round (ModelRunner.early_first_frames): the same frames, the first of them one decode sooner.
    early_first_frames: bool = True

    def __post_init__(self) -> None:
        if self.max_sessions <= 0:
            raise ValueError(f"EngineConfig.max_sessions must be > 0, got {self.max_sessions}")
        if self.kv_memory_bytes <= 0:
            raise ValueError(f"EngineConfig.kv_memory_bytes must be > 0, got {self.kv_memory_bytes}")
        if self.max_prompt_chars <= 0:
            raise ValueError(f"EngineConfig.max_prompt_chars must be > 0, got {self.max_prompt_chars}")
        if self.max_frames is not None and self.max_frames <= 0:
            raise ValueError(f"EngineConfig.max_frames must be > 0 or None, got {self.max_frames}")


@dataclass(frozen=True)
class PagedKVSpace:
    """The paged KV cache as the scheduler's :class:`~streamgen.engine.scheduler.KVSpace`."""

    kv: PagedKVCacheManager

    def reserve(self, session_id: str, worst_case_frames: int) -> Admission:
        """Reserve a session's worst case, or say why not: NEVER when it needs more blocks than the
        whole pool holds (refused at once), WAIT when the pool is only short right now, decided from
        the block counts, never from the message."""
        result = self.kv.admit(session_id, worst_case_frames)
        if result.admitted:
            return Admission(AdmissionDecision.ADMIT, handle=result.blocks)
        never = result.blocks_needed > self.kv.pool.num_usable_blocks
        return Admission(AdmissionDecision.NEVER if never else AdmissionDecision.WAIT, result.reason)

    def release(self, session_id: str) -> None:
        if session_id in self.kv.session_ids:
            self.kv.free(session_id)  # also aborts a forward allocated for it and not yet run

    def allocate(self, kind: WorkKind, num_frames: int, items: tuple[WorkItem, ...]) -> PagedCacheView | None:
        """Open the forward's cache view: pages for each session's chunk at its scheduled start frame,
        and the plan (block tables, write slots) the runner's model reads. A RECACHE rewrites the
        frames a session already stores and allocates nothing (the runner opens that rewrite)."""
        if kind is WorkKind.RECACHE:
            return None
        return self.kv.begin_forward([it.session_id for it in items], num_frames, commit=kind is not WorkKind.DENOISE,
                                     start_frames=[it.start_frame for it in items])


class Engine:
    def __init__(self, preset: Preset, model: CausalWanTransformer, vae: CausalVideoVAE, text: TextEncoder,
                 config: EngineConfig = EngineConfig(), *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", clock: Callable[[], float] = time.monotonic) -> None:
        """``device``: where the model, VAE, KV pool and every intermediate live (the prompt encoder
        returns its embeddings wherever it runs; they are moved). Noise is drawn on the CPU by each
        session's generator and moved, so a seed gives the same video on every device."""
        self.preset = preset
        self.config = config
        self.clock = clock
        self.device = torch.device(device)
        self.model = model.eval().to(device=self.device, dtype=dtype)
        # The VAE runs in the engine's dtype too: a bf16 decode is ~2x faster here and differs from
        # fp32 by under one 8-bit level (max 0.75, mean 0.09 on the default VAE).
        self.vae = vae.eval().to(device=self.device, dtype=dtype)
        # Page size: the preset's (CacheConfig.block_size_tokens; whole frames unless it says otherwise).
        self.kv = PagedKVCacheManager.from_preset(preset, model.backend, memory_budget_bytes=config.kv_memory_bytes,
                                                  dtype=dtype, device=self.device)
        self.runner = ModelRunner(preset, self.model, self.vae, text, self.kv, dtype, self.device,
                                  early_first_frames=config.early_first_frames)
        sched_cfg = SchedulerConfig(num_steps=len(preset.sampler.denoising_steps),
                                    chunk_frames=preset.sampler.chunk_frames, max_running=config.max_sessions,
                                    max_queue_wait_s=config.max_queue_wait_s, max_lead_s=config.max_lead_s,
                                    first_chunk_first=(self.device.type == "cpu" if config.first_chunk_first is None
                                                       else config.first_chunk_first))
        self.scheduler = Scheduler(sched_cfg, PagedKVSpace(self.kv))
        self.last_step_ran = False

    @property
    def sessions(self) -> dict[str, Session]:
        """Every session not yet released, by id (the scheduler's registry; read-only use)."""
        return self.scheduler.sessions

    def _session(self, session_id: str) -> Session:
        try:
            return self.scheduler.sessions[session_id]
        except KeyError:
            raise KeyError(f"unknown session {session_id!r}") from None

    # ------------------------------------------------------------------ API

    def validate(self, request: GenerationRequest) -> None:
        request.validate(self.config.max_prompt_chars, self.config.max_frames)
        if request.start_image is not None:
            img = request.start_image
            h, w = self.preset.video.height, self.preset.video.width
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != (h, w, 3):
                shape = getattr(img, "shape", None)
                raise ValueError(f"start image must be uint8 RGB of shape ({h}, {w}, 3), got "
                                 f"{getattr(img, 'dtype', type(img))} {shape}")

    def add_request(self, request: GenerationRequest, session_id: str | None = None, *,
                    outbox: object | None = None) -> str:
        """Queue a stream; raises ``ValueError`` on a malformed request (nothing is allocated).

        ``outbox`` is stored on the session for the caller that delivers its chunks (AsyncEngine).
        """
        self.validate(request)
        sid = session_id or uuid.uuid4().hex[:12]
        if sid in self.scheduler.sessions:
            raise ValueError(f"session {sid!r} already exists")
        tf = self.preset.vae.temporal_factor
        num_frames = request.num_frames if request.num_frames is not None else self.config.unbounded_max_frames
        # The VAE knows its frame layout (ours: tf per latent frame; Wan's: 1 + tf k).
        total_latent = None if num_frames is None else self.vae.latent_frames_for(num_frames)
        if request.start_image is not None and total_latent is not None:
            total_latent = max(total_latent, 2)  # the image frame plus at least one generated chunk
        worst = self.kv.worst_case_frames(self.preset.sampler.chunk_frames, total_latent)
        session = Session(sid, total_latent, worst, request.fps or float(self.preset.video.fps), tf, self.clock(),
                          has_image=request.start_image is not None, request=request, max_pixel_frames=num_frames,
                          outbox=outbox)
        self.runner.attach(session, request.prompt, generator_seed(request.seed), request.start_image)
        self.scheduler.add(session)
        return sid

    def update_prompt(self, session_id: str, prompt: str) -> None:
        """Switch a session's prompt at its next chunk boundary (KV re-cache)."""
        session = self._session(session_id)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if len(prompt) > self.config.max_prompt_chars:
            raise ValueError(f"prompt has {len(prompt)} characters; the limit is {self.config.max_prompt_chars}")
        self.scheduler.request_recache(session_id)
        session.state.pending_prompt = prompt

    def set_paused(self, session_id: str, paused: bool) -> None:
        """Hold (or release) a session between work items: backpressure from a slow consumer.

        A paused session keeps its pages and its place; only its compute waits. A session that
        has already ended is ignored (its consumer may still be draining the last chunks).
        """
        session = self.scheduler.sessions.get(session_id)
        if session is not None:
            session.paused = paused

    def abort(self, session_id: str, reason: FinishReason = FinishReason.STOPPED) -> ChunkOutput | None:
        """End a session now and free its pages; returns its final message (None if already gone)."""
        session = self.scheduler.sessions.get(session_id)
        if session is None:
            return None
        if session.status is not Status.FINISHED:
            self.scheduler.finish(session_id, reason)
        return self._release(session)

    def _release(self, session: Session) -> ChunkOutput:
        """Drop a finished session (the scheduler freed its pages when it finished); its final message."""
        self.scheduler.remove(session.session_id)
        session.tensors = None
        empty = np.zeros((0, self.preset.video.height, self.preset.video.width, 3), np.uint8)
        return ChunkOutput(session.session_id, session.emitted_pixel_frames, empty, finished=True,
                           finish_reason=session.finish_reason, error=session.error, session=session)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.sessions)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ------------------------------------------------------------------ loop
    def step(self) -> list[ChunkOutput]:
        """Run one scheduling round; return the chunks (and end messages) it produced."""
        now = self.clock()
        out = self.scheduler.schedule(now)
        self.last_step_ran = bool(out.batches)
        outputs: list[ChunkOutput] = []
        for sid in out.admitted:
            admitted = self.scheduler.get(sid)
            admitted.queue_ms = (now - admitted.arrival_s) * 1000
        for sid in out.rejected:
            outputs.append(self._release(self.scheduler.get(sid)))
        for batch in out.batches:
            try:
                results = self.runner.execute(batch)
            except Exception as exc:  # one bad batch must not take the server down
                log.exception("forward batch %s failed", batch.kind.value)
                for item in batch.items:
                    if item.session.status is not Status.FINISHED:
                        self.scheduler.finish(item.session_id, FinishReason.ERROR, f"internal error: {exc}")
                    if item.session_id in self.scheduler.sessions:
                        outputs.append(self._release(item.session))
                continue
            for result in results:
                outputs.extend(self._absorb(result))
        return outputs

    def _absorb(self, result: StepResult) -> list[ChunkOutput]:
        session = result.item.session
        if session.status is not Status.RUNNING:
            return []  # ended (aborted) while its forward ran
        session.generate_ms += result.forward_ms
        outputs: list[ChunkOutput] = []
        frames = result.frames
        emitted = 0
        if frames is not None:
            first = session.emitted_pixel_frames
            if session.max_pixel_frames is not None:
                frames = frames[: max(0, session.max_pixel_frames - first)]
            timing = ChunkTiming(generate_ms=session.generate_ms, decode_ms=result.decode_ms,
                                 queue_ms=session.queue_ms,
                                 since_start_ms=(self.clock() - session.arrival_s) * 1000)
            outputs.append(ChunkOutput(session.session_id, first, frames, timing, session=session))
            emitted = len(frames)
            session.generate_ms = session.queue_ms = 0.0
        if self.scheduler.update(result.item, emitted):
            if session.request is not None and session.request.num_frames is None:
                session.finish_reason = FinishReason.LIMIT
            outputs.append(self._release(session))
        return outputs

    def warm_up(self, chunks: int = 2) -> float:
        """Run a throwaway stream of ``chunks`` chunks through the path of a stream and drop it, so the first
        client does not pay one-time costs: kernel selection and weight packing, allocator growth, CUDA's lazy
        initialisation, ``torch.compile``'s compilation. Two chunks (the default) run every kind of forward a
        stream without a start image runs: the first chunk's denoising steps, its cache write, a chunk attending
        to it, and both kinds of decode; one chunk runs only the first. It is one stream: batches of several
        streams meet their own shapes later (a fixed-shape compile, ``--compile`` on CUDA, compiles them then).
        Returns its seconds.

        Only on an engine with no session. It leaves none, its pages are free again and the cache's call counters
        are reset; a failed warm-up is a ``RuntimeError`` (a server should not start on an engine that cannot run
        a stream).
        """
        if chunks < 1:
            raise ValueError(f"warm_up needs at least 1 chunk, got {chunks}")
        if self.scheduler.sessions:
            raise RuntimeError(f"warm_up runs on an idle engine; {len(self.scheduler.sessions)} sessions are open")
        start = time.perf_counter()
        latent = chunks * self.preset.sampler.chunk_frames
        frames = self.preset.pixel_frames(latent)
        while frames > 1 and self.vae.latent_frames_for(frames) > latent:  # Wan's VAE: 1 + 4k frames
            frames -= 1
        if self.config.max_frames is not None:
            frames = min(frames, self.config.max_frames)
        # At the highest playback rate a request may ask for: pacing holds a chunk back only under a lead of less
        # than ~0.1 s, and then run_until_done waits for it.
        request = GenerationRequest("warm-up"[: self.config.max_prompt_chars], seed=0, num_frames=frames, fps=240.0)
        try:
            sid = self.add_request(request, "warm-up")
            end = self.run_until_done()[sid][-1]
        except Exception as exc:
            self.abort("warm-up")
            raise RuntimeError(f"warm-up stream failed: {exc}") from exc
        if end.finish_reason is not FinishReason.COMPLETED:
            hint = " (a KV pool too small for it? fewer warm-up chunks or none)" \
                if end.finish_reason is FinishReason.REJECTED else ""
            raise RuntimeError(f"warm-up stream ended with {end.finish_reason}: {end.error}{hint}")
        self.kv.paged_calls.clear()  # the served streams' counts only (metrics, benchmarks)
        return time.perf_counter() - start

    def run_until_done(self, max_steps: int = 1_000_000) -> dict[str, list[ChunkOutput]]:
        """Drive the loop until every session ended (tests, benchmarks, offline use)."""
        by_session: dict[str, list[ChunkOutput]] = {}
        for _ in range(max_steps):
            if not self.has_unfinished():
                return by_session
            for chunk in self.step():
                by_session.setdefault(chunk.session_id, []).append(chunk)
            if not self.last_step_ran:  # every session paced or queued: wait a little instead of spinning
                time.sleep(0.001)
        raise RuntimeError(f"engine did not finish within {max_steps} steps")


class AsyncEngine:
    """Runs :class:`Engine` on a worker thread; each stream is an async iterator of chunks.

    All engine calls happen on the worker thread (commands are queued), so the engine
    itself needs no locks. A stream's asyncio queue is its session's ``outbox``.

    ``max_buffered_chunks`` bounds each session's undelivered chunks: a session whose queue
    holds that many is paused until its consumer catches up (backpressure instead of an
    unbounded buffer; at most one more chunk, from a forward already running, can arrive).
    ``None`` leaves the queues unbounded.
    """

    def __init__(self, engine: Engine, idle_sleep_s: float = 0.005, max_buffered_chunks: int | None = None) -> None:
        if max_buffered_chunks is not None and max_buffered_chunks < 1:
            raise ValueError(f"max_buffered_chunks must be >= 1 or None, got {max_buffered_chunks}")
        self.engine = engine
        self.idle_sleep_s = idle_sleep_s
        self.max_buffered_chunks = max_buffered_chunks
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="streamgen-engine", daemon=True)
        self._thread.start()

    def _call(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()

        def run() -> None:
            try:
                value = fn()
            except BaseException as exc:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, value)

        with self._lock:
            self._commands.append(run)
        self._wake.set()
        return fut

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps (consistent reads, e.g. metrics)."""
        return await self._call(fn)  # type: ignore[return-value]

    @staticmethod
    def new_session_id() -> str:
        return uuid.uuid4().hex[:12]

    async def start(self, request: GenerationRequest,
                    session_id: str | None = None) -> tuple[str, asyncio.Queue[ChunkOutput]]:
        """Validate and queue a stream; raises ``ValueError`` for bad input.

        Pass ``session_id`` (from :meth:`new_session_id`) to know the id *before* awaiting: a caller
        cancelled during this await can still abort the session, because commands run in order on
        the engine thread, so an ``abort`` sent after ``start`` always finds the session added.
        """
        queue: asyncio.Queue[ChunkOutput] = asyncio.Queue()
        sid = session_id or self.new_session_id()
        outbox = (asyncio.get_running_loop(), queue)
        await self._call(lambda: self.engine.add_request(request, sid, outbox=outbox))
        return sid, queue

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ChunkOutput]:
        sid, queue = await self.start(request)
        try:
            while True:
                chunk = await queue.get()
                yield chunk
                if chunk.finished:
                    return
        finally:
            await self.abort(sid)

    async def update_prompt(self, session_id: str, prompt: str) -> None:
        await self._call(lambda: self.engine.update_prompt(session_id, prompt))

    async def abort(self, session_id: str, reason: FinishReason = FinishReason.STOPPED) -> None:
        def run() -> None:
            final = self.engine.abort(session_id, reason)
            if final is not None:
                self._deliver(final)
        await self._call(run)

    @staticmethod
    def _deliver(chunk: ChunkOutput) -> None:
        outbox = getattr(chunk.session, "outbox", None)
        if outbox is None:
            return
        loop, queue = outbox
        loop.call_soon_threadsafe(queue.put_nowait, chunk)

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                commands, self._commands = self._commands, []
            for command in commands:
                command()
            self._apply_backpressure()
            if self.engine.has_unfinished():
                try:
                    chunks = self.engine.step()
                except Exception:  # the loop must survive anything a step throws
                    log.exception("engine step failed")
                    chunks = []
                for chunk in chunks:
                    self._deliver(chunk)
                if not self.engine.last_step_ran:  # all sessions paced or queued: don't spin
                    self._wake.wait(self.idle_sleep_s)
                    self._wake.clear()
            else:
                self._wake.wait(self.idle_sleep_s * 20)
                self._wake.clear()

    def _apply_backpressure(self) -> None:
        if self.max_buffered_chunks is None:
            return
        # qsize() of a queue owned by another thread's loop: a GIL-atomic len(); a stale value
        # only delays the pause/resume by one loop iteration.
        for session in self.engine.sessions.values():
            if session.outbox is not None:
                _, queue = session.outbox  # type: ignore[misc]
                session.paused = queue.qsize() >= self.max_buffered_chunks

    def shutdown(self, reason: FinishReason = FinishReason.SHUTDOWN) -> None:
        """End every session with ``reason`` and stop the worker thread."""
        done = threading.Event()

        def run() -> None:
            for sid in list(self.engine.sessions):
                final = self.engine.abort(sid, reason)
                if final is not None:
                    self._deliver(final)
            self._stopping = True
            done.set()

        with self._lock:
            self._commands.append(run)
        self._wake.set()
        done.wait(timeout=10)
        self._thread.join(timeout=10)


def _set_result(fut: asyncio.Future[object], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[object], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
