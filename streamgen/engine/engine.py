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
from streamgen.config import Preset
from streamgen.engine.model_runner import ModelRunner, StepResult
from streamgen.engine.request import ChunkOutput, ChunkTiming, FinishReason, GenerationRequest, generator_seed
from streamgen.engine.scheduler import (
    Admission,
    AdmissionDecision,
    Scheduler,
    SchedulerConfig,
    SessionProgress,
    Status,
)
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

    def __post_init__(self) -> None:
        if self.max_sessions <= 0:
            raise ValueError(f"EngineConfig.max_sessions must be > 0, got {self.max_sessions}")
        if self.kv_memory_bytes <= 0:
            raise ValueError(f"EngineConfig.kv_memory_bytes must be > 0, got {self.kv_memory_bytes}")
        if self.max_prompt_chars <= 0:
            raise ValueError(f"EngineConfig.max_prompt_chars must be > 0, got {self.max_prompt_chars}")
        if self.max_frames is not None and self.max_frames <= 0:
            raise ValueError(f"EngineConfig.max_frames must be > 0 or None, got {self.max_frames}")


def kv_admit(kv: PagedKVCacheManager, session_id: str, worst_case_frames: int) -> Admission:
    """Admission over ``kv`` for the scheduler: reserve a session's worst case, or say why not.

    NEVER when the session needs more blocks than the whole pool holds (refused at once), WAIT
    when the pool is only short right now, decided from the block counts, never from the message.
    """
    result = kv.admit(session_id, worst_case_frames)
    if result.admitted:
        return Admission(AdmissionDecision.ADMIT)
    never = result.blocks_needed > kv.pool.num_usable_blocks
    return Admission(AdmissionDecision.NEVER if never else AdmissionDecision.WAIT, result.reason)


class Engine:
    def __init__(self, preset: Preset, model: CausalWanTransformer, vae: CausalVideoVAE, text: TextEncoder,
                 config: EngineConfig = EngineConfig(), *, dtype: torch.dtype = torch.bfloat16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.preset = preset
        self.config = config
        self.clock = clock
        self.model = model.eval().to(dtype)
        # The VAE runs in the engine's dtype too: a bf16 decode is ~2x faster here and differs from
        # fp32 by under one 8-bit level (max 0.75, mean 0.09 on the default VAE).
        self.vae = vae.eval().to(dtype)
        self.kv = PagedKVCacheManager.from_preset(preset, model.backend, memory_budget_bytes=config.kv_memory_bytes,
                                                  dtype=dtype)
        self.runner = ModelRunner(preset, self.model, self.vae, text, self.kv, dtype)
        sched_cfg = SchedulerConfig(num_steps=len(preset.sampler.denoising_steps),
                                    chunk_frames=preset.sampler.chunk_frames, max_running=config.max_sessions,
                                    max_queue_wait_s=config.max_queue_wait_s, max_lead_s=config.max_lead_s)
        self.scheduler = Scheduler(sched_cfg, self._admit)
        self._requests: dict[str, GenerationRequest] = {}
        self._emitted: dict[str, int] = {}
        self._gen_ms: dict[str, float] = {}
        self._queue_ms: dict[str, float] = {}
        self.last_step_ran = False

    # ------------------------------------------------------------------ API
    def _admit(self, session_id: str, worst_case_frames: int) -> Admission:
        return kv_admit(self.kv, session_id, worst_case_frames)

    def validate(self, request: GenerationRequest) -> None:
        request.validate(self.config.max_prompt_chars, self.config.max_frames)
        if request.start_image is not None:
            img = request.start_image
            h, w = self.preset.video.height, self.preset.video.width
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != (h, w, 3):
                shape = getattr(img, "shape", None)
                raise ValueError(f"start image must be uint8 RGB of shape ({h}, {w}, 3), got "
                                 f"{getattr(img, 'dtype', type(img))} {shape}")

    def add_request(self, request: GenerationRequest, session_id: str | None = None) -> str:
        """Queue a stream; raises ``ValueError`` on a malformed request (nothing is allocated)."""
        self.validate(request)
        sid = session_id or uuid.uuid4().hex[:12]
        if sid in self._requests:
            raise ValueError(f"session {sid!r} already exists")
        tf = self.preset.vae.temporal_factor
        num_frames = request.num_frames if request.num_frames is not None else self.config.unbounded_max_frames
        # The VAE knows its frame layout (ours: tf per latent frame; Wan's: 1 + tf k).
        total_latent = None if num_frames is None else self.vae.latent_frames_for(num_frames)
        if request.start_image is not None and total_latent is not None:
            total_latent = max(total_latent, 2)  # the image frame plus at least one generated chunk
        worst = self.kv.worst_case_frames(self.preset.sampler.chunk_frames, total_latent)
        self.runner.add_session(sid, request.prompt, generator_seed(request.seed), request.start_image)
        fps = request.fps or float(self.preset.video.fps)
        self.scheduler.add(SessionProgress(sid, total_latent, worst, fps, tf, self.clock(),
                                           has_image=request.start_image is not None))
        self._requests[sid] = request
        self._emitted[sid] = 0
        self._gen_ms[sid] = 0.0
        return sid

    def update_prompt(self, session_id: str, prompt: str) -> None:
        """Switch a session's prompt at its next chunk boundary (KV re-cache)."""
        if session_id not in self._requests:
            raise KeyError(f"unknown session {session_id!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if len(prompt) > self.config.max_prompt_chars:
            raise ValueError(f"prompt has {len(prompt)} characters; the limit is {self.config.max_prompt_chars}")
        self.runner.set_prompt(session_id, prompt)
        self.scheduler.request_recache(session_id)

    def set_paused(self, session_id: str, paused: bool) -> None:
        """Hold (or release) a session between work items: backpressure from a slow consumer.

        A paused session keeps its pages and its place; only its compute waits. A session that
        has already ended is ignored (its consumer may still be draining the last chunks).
        """
        progress = self.scheduler.sessions.get(session_id)
        if progress is not None:
            progress.paused = paused

    def abort(self, session_id: str, reason: FinishReason = FinishReason.STOPPED) -> ChunkOutput | None:
        """End a session now and free its pages; returns its final message (None if already gone)."""
        if session_id not in self._requests:
            return None
        progress = self.scheduler.get(session_id)
        if progress.status is not Status.FINISHED:
            self.scheduler.finish(session_id, reason)
        return self._release(session_id)

    def _release(self, session_id: str) -> ChunkOutput:
        progress = self.scheduler.get(session_id)
        if session_id in self.kv.session_ids:
            self.kv.free(session_id)
        self.runner.remove_session(session_id)
        self.scheduler.remove(session_id)
        self._requests.pop(session_id)
        self._gen_ms.pop(session_id, None)
        self._queue_ms.pop(session_id, None)
        emitted = self._emitted.pop(session_id)
        return ChunkOutput(session_id, emitted, np.zeros((0, self.preset.video.height, self.preset.video.width, 3),
                                                         np.uint8),
                           finished=True, finish_reason=progress.finish_reason, error=progress.error)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

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
            self._queue_ms[sid] = (now - self.scheduler.get(sid).arrival_s) * 1000
        for sid in out.rejected:
            outputs.append(self._release(sid))
        for batch in out.batches:
            try:
                results = self.runner.execute(batch)
            except Exception as exc:  # one bad batch must not take the server down
                log.exception("forward batch %s failed", batch.kind.value)
                for item in batch.items:
                    if item.session_id in self._requests:
                        self.scheduler.finish(item.session_id, FinishReason.ERROR, f"internal error: {exc}")
                        outputs.append(self._release(item.session_id))
                continue
            for result in results:
                outputs.extend(self._absorb(result))
        return outputs

    def _absorb(self, result: StepResult) -> list[ChunkOutput]:
        sid = result.item.session_id
        if sid not in self._requests:
            return []
        self._gen_ms[sid] += result.forward_ms
        outputs: list[ChunkOutput] = []
        frames = result.frames
        emitted = 0
        if frames is not None:
            request = self._requests[sid]
            limit = request.num_frames if request.num_frames is not None else self.config.unbounded_max_frames
            if limit is not None:
                frames = frames[: max(0, limit - self._emitted[sid])]
            progress = self.scheduler.get(sid)
            timing = ChunkTiming(generate_ms=self._gen_ms[sid], decode_ms=result.decode_ms,
                                 queue_ms=self._queue_ms.pop(sid, 0.0),
                                 since_start_ms=(self.clock() - progress.arrival_s) * 1000)
            outputs.append(ChunkOutput(sid, self._emitted[sid], frames, timing))
            emitted = len(frames)
            self._emitted[sid] += emitted
            self._gen_ms[sid] = 0.0
        done = self.scheduler.update(result.item, emitted)
        if done:
            if self._requests[sid].num_frames is None:
                self.scheduler.get(sid).finish_reason = FinishReason.LIMIT
            outputs.append(self._release(sid))
        return outputs

    def run_until_done(self, max_steps: int = 1_000_000) -> dict[str, list[ChunkOutput]]:
        """Drive the loop until every session ended (tests, benchmarks, offline use)."""
        by_session: dict[str, list[ChunkOutput]] = {}
        for _ in range(max_steps):
            if not self.has_unfinished():
                return by_session
            for chunk in self.step():
                by_session.setdefault(chunk.session_id, []).append(chunk)
        raise RuntimeError(f"engine did not finish within {max_steps} steps")


class AsyncEngine:
    """Runs :class:`Engine` on a worker thread; each stream is an async iterator of chunks.

    All engine calls happen on the worker thread (commands are queued), so the engine
    itself needs no locks.

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
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[ChunkOutput]]] = {}
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
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ChunkOutput] = asyncio.Queue()
        sid = session_id or self.new_session_id()
        self._queues[sid] = (loop, queue)
        try:
            await self._call(lambda: self.engine.add_request(request, sid))
        except BaseException:
            self._queues.pop(sid, None)
            raise
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

    def _deliver(self, chunk: ChunkOutput) -> None:
        target = self._queues.get(chunk.session_id)
        if target is None:
            return
        loop, queue = target
        if chunk.finished:
            self._queues.pop(chunk.session_id, None)
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
        for sid, (_, queue) in list(self._queues.items()):
            self.engine.set_paused(sid, queue.qsize() >= self.max_buffered_chunks)

    def shutdown(self, reason: FinishReason = FinishReason.SHUTDOWN) -> None:
        """End every session with ``reason`` and stop the worker thread."""
        done = threading.Event()

        def run() -> None:
            for sid in list(self.engine._requests):
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
