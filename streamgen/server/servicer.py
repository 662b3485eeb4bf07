"""The StreamGen gRPC servicer: one ``Generate`` call = one engine session, streamed as encoded chunks.

A call runs two tasks: this handler reads the engine's chunk queue, encodes each chunk and
writes it; a reader task applies PromptUpdate / StopRequest as they arrive. Every decision about
*what* to generate (validation limits, admission, batching, pacing, backpressure) is the
engine's; this layer converts protos, encodes, measures and maps errors to status codes.

Memory: whatever way a call ends - completed, stopped, client cancelled or disconnected,
stalled, server drain - the session is aborted and its KV pages are freed at once (for a
stalled client before its status is sent, since that waits until the client reads again).

This module must never touch tensors, block ids or engine internals: only the
:class:`AsyncEngine` API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

import streamgen
from streamgen.api.v1 import pb, pb_grpc
from streamgen.engine.engine import AsyncEngine
from streamgen.engine.request import ChunkOutput, FinishReason
from streamgen.server import convert
from streamgen.server.config import ServerConfig
from streamgen.server.convert import RequestError
from streamgen.server.encoders import ChunkEncoder, make_encoder
from streamgen.server.identity import model_id
from streamgen.server.logs import event
from streamgen.server.metrics import Metrics

log = logging.getLogger("streamgen.server")

_OUTCOME_OF_REASON = {FinishReason.COMPLETED: "completed", FinishReason.STOPPED: "stopped",
                      FinishReason.LIMIT: "limit", FinishReason.SHUTDOWN: "shutdown", FinishReason.ERROR: "error"}


class _Stalled(Exception):
    """The client read nothing for ``stall_timeout_s``."""


@dataclass(eq=False)  # identity semantics: calls live in a set
class _Call:
    """State of one open Generate call (shared by its writer and reader tasks)."""

    peer: str
    started_s: float
    session_id: str | None = None
    error: RequestError | None = None   # set by the reader on a protocol violation mid-stream
    ended: bool = False                 # the session's final message was taken from the engine
    frames_sent: int = 0
    bytes_sent: int = 0
    first_chunk_s: float | None = None
    last_chunk_s: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class StreamGenServicer(pb_grpc.StreamGenServicer):
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: Metrics, weights: str) -> None:
        self.engine = engine
        self.preset = engine.engine.preset
        self.engine_config = engine.engine.config
        self.config = config
        self.metrics = metrics
        self.weights = weights
        # Computed once: GetModelInfo is cheap, and replicas compare it to refuse a mixed pool.
        self.model_id = model_id(self.preset, engine.engine.model, engine.engine.vae,
                                 type(engine.engine.runner.text.token_encoder).__name__)
        self.draining = False
        self._calls: set[_Call] = set()
        self._background: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------------ info
    def model_info(self) -> pb.ModelInfo:
        video, ec = self.preset.video, self.engine_config
        paced = ec.max_lead_s != float("inf")
        return pb.ModelInfo(
            preset=self.preset.name, width=video.width, height=video.height, fps=video.fps,
            frames_per_chunk=self.preset.pixel_frames(self.preset.sampler.chunk_frames),
            max_prompt_chars=ec.max_prompt_chars, max_frames=ec.max_frames or 0, max_sessions=ec.max_sessions,
            encodings=list(convert.ENCODINGS), weights=self.weights, version=_version(),
            max_message_bytes=self.config.max_message_bytes, paced=paced,
            max_lead_s=ec.max_lead_s if paced else 0.0, max_waiting=self.config.max_waiting,
            model_id=self.model_id)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.model_info()

    # ------------------------------------------------------------------ Generate
    async def Generate(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        call = _Call(peer=context.peer(), started_s=time.monotonic())
        self._calls.add(call)
        self.metrics.streams_active.set(len(self._calls))
        outcome = "error"
        encoding = ""
        try:
            outcome, encoding = await self._generate(call, context)
        except RequestError as exc:
            outcome = exc.code.name.lower()
            await context.abort(exc.code, exc.message)
        except _Stalled:
            outcome = "stalled"
            # The client's flow-control window is full, so this status reaches it only when it reads
            # again (or its deadline passes, or it disconnects): end the session and account for the
            # call first, so its pages and the metrics do not wait for that.
            await self._end_call(call, outcome, encoding)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the client read nothing for {self.config.stall_timeout_s:g} s; stream cancelled")
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client cancelled or disconnected
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("Generate failed")
            raise
        finally:
            await self._end_call(call, outcome, encoding)

    async def _end_call(self, call: _Call, outcome: str, encoding: str) -> None:
        """Free the call's session and record how it ended (once; safe from a cancelled handler)."""
        if call.done.is_set():
            return
        call.done.set()
        if call.session_id is not None:
            await self._abort_session(call.session_id)
        self._calls.discard(call)
        self.metrics.streams_active.set(len(self._calls))
        self.metrics.outcome(outcome)
        self._log_end(call, outcome, encoding)

    async def _generate(self, call: _Call, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        first = await context.read()
        if first is grpc.aio.EOF:
            raise convert.invalid("the request stream ended before a StartRequest")
        kind = first.WhichOneof("request")
        if kind is None:
            raise convert.invalid("empty GenerateRequest: set start, prompt_update or stop")
        if kind != "start":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the first message must be a StartRequest, got {kind}")
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another replica")
        plan = convert.plan_stream(first.start, self.preset, max_image_pixels=self.config.max_image_pixels,
                                   default_keyframe_interval_s=self.config.keyframe_interval_s,
                                   default_jpeg_quality=self.config.jpeg_quality)
        waiting = len(self._live_calls()) - self.engine_config.max_sessions
        if waiting >= self.config.max_waiting:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server busy: {self.engine_config.max_sessions} streams running and "
                               f"{self.config.max_waiting} waiting; retry later or on another replica")
        video = self.preset.video
        try:
            encoder = make_encoder(plan.encoding, video.width, video.height, plan.fps,
                                   keyframe_interval=plan.keyframe_interval, jpeg_quality=plan.jpeg_quality,
                                   crf=self.config.h264_crf)
        except ValueError as exc:
            raise convert.invalid(str(exc)) from None
        try:
            try:
                sid, queue = await self.engine.start(plan.request)
            except ValueError as exc:  # the engine's validation: prompt, frames, fps, seed, image
                raise convert.invalid(str(exc)) from None
            call.session_id = sid
            paced = self.engine_config.max_lead_s != float("inf")
            await context.write(convert.stream_started(
                sid, self.preset, plan, codec=encoder.codec, mime_type=encoder.mime_type,
                init_segment=encoder.init_segment, time_base_den=encoder.time_base_den,
                keyframe_interval=encoder.keyframe_interval, paced=paced))
            reader = asyncio.create_task(self._read_updates(call, context), name=f"streamgen-read-{sid}")
            try:
                final = await self._pump(call, context, queue, encoder, plan.encoding.value)
                call.ended = True
                if call.error is not None:
                    raise call.error
                refusal = convert.refusal_of(final)
                if refusal is not None:
                    raise refusal
                reason = final.finish_reason or FinishReason.ERROR
                await self._write(context, convert.stream_ended(reason, final.error or "", call.frames_sent))
                # Close the call only once the client half-closed (bounded): a client that wrote a
                # PromptUpdate before it saw StreamEnded must not find the call gone - grpc's client
                # then reports INTERNAL and drops the responses it had not read yet.
                await asyncio.wait({reader}, timeout=self.config.linger_s)
                return _OUTCOME_OF_REASON[reason], plan.encoding.value
            finally:
                call.ended = True
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        finally:
            encoder.close()

    async def _pump(self, call: _Call, context: grpc.aio.ServicerContext, queue: asyncio.Queue[ChunkOutput],
                    encoder: ChunkEncoder, encoding: str) -> ChunkOutput:
        """Encode and send chunks until the session's final message, which is returned."""
        while True:
            chunk = await queue.get()
            if chunk.finished:
                return chunk
            if len(chunk.frames) == 0:
                continue
            t0 = time.perf_counter()
            # x264/JPEG release the GIL; a worker thread keeps the event loop (all other streams) responsive.
            encoded = await asyncio.to_thread(encoder.encode, chunk.frames)
            encode_ms = (time.perf_counter() - t0) * 1000
            now = time.monotonic()
            message = convert.frame_chunk(chunk, encoded, encoder.pts(chunk.first_frame_index), encode_ms=encode_ms,
                                          since_start_ms=(now - call.started_s) * 1000)
            await self._write(context, message)
            sent = time.monotonic()
            if call.first_chunk_s is None:
                call.first_chunk_s = sent
                self.metrics.ttff.observe(sent - call.started_s)
            else:
                self.metrics.inter_chunk.observe(sent - (call.last_chunk_s or sent))
            call.last_chunk_s = sent
            call.frames_sent += len(chunk.frames)
            call.bytes_sent += len(encoded.payload)
            self.metrics.frames.inc(len(chunk.frames))
            self.metrics.bytes_sent.labels(encoding=encoding).inc(len(encoded.payload))

    async def _write(self, context: grpc.aio.ServicerContext, message: pb.GenerateResponse) -> None:
        # write() waits for HTTP/2 flow control: a slow reader blocks here, the chunk queue fills
        # up to max_buffered_chunks and the engine pauses the session (backpressure, no drops).
        # A write held back by flow control ignores cancellation until the client reads, so the
        # stall clock waits *beside* the write (asyncio.wait) rather than cancelling it.
        write = asyncio.ensure_future(context.write(message))
        done, _ = await asyncio.wait({write}, timeout=self.config.stall_timeout_s)
        if not done:
            self._background.add(write)  # finishes (or fails) whenever the call ends; nobody waits
            write.add_done_callback(_forget(self._background))
            raise _Stalled()
        write.result()

    async def _read_updates(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """Apply PromptUpdate / StopRequest until the client half-closes.

        A protocol violation records its status in ``call.error`` and aborts the session (the
        writer then ends the call with it). Messages after the session ended are read and
        ignored, so the client's side of the stream stays writable until it closes it.
        """
        sid = call.session_id
        assert sid is not None
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            if call.ended or call.error is not None:
                continue
            kind = message.WhichOneof("request")
            violation: RequestError | None = None
            if kind == "prompt_update":
                try:
                    await self.engine.update_prompt(sid, message.prompt_update.prompt)
                    event(log, "prompt_update", session=sid, prompt_chars=len(message.prompt_update.prompt))
                except KeyError:
                    pass  # the session already ended; its final message is on the way
                except ValueError as exc:
                    violation = convert.invalid(f"prompt_update: {exc}")
            elif kind == "stop":
                await self.engine.abort(sid, FinishReason.STOPPED)
            elif kind == "start":
                violation = RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                         "this stream has already started: send one StartRequest per call")
            else:
                violation = convert.invalid("empty GenerateRequest: set start, prompt_update or stop")
            if violation is not None:
                call.error = violation
                await self.engine.abort(sid, FinishReason.ERROR)  # the writer sees call.error with the end

    async def _abort_session(self, session_id: str) -> None:
        """Free a session's pages now, even from a cancelled handler (the abort runs as its own task)."""
        task = asyncio.get_running_loop().create_task(self.engine.abort(session_id))
        self._background.add(task)
        task.add_done_callback(_forget(self._background))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    def _log_end(self, call: _Call, outcome: str, encoding: str) -> None:
        now = time.monotonic()
        ttff = None if call.first_chunk_s is None else round(call.first_chunk_s - call.started_s, 4)
        level = logging.WARNING if outcome in ("error", "stalled") else logging.INFO
        event(log, "stream_end", level, session=call.session_id, outcome=outcome, frames=call.frames_sent,
              bytes=call.bytes_sent, encoding=encoding, ttff_s=ttff, duration_s=round(now - call.started_s, 3),
              peer=call.peer)

    # ------------------------------------------------------------------ drain
    async def drain(self, timeout_s: float, grace_s: float = 2.0) -> int:
        """Stop admitting; let running streams go on for ``timeout_s``, then end them with
        REASON_SERVER_SHUTDOWN and wait up to ``grace_s`` for their last messages. Returns how
        many streams were ended early."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = time.monotonic() + timeout_s
        while self._live_calls() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        remaining = self._live_calls()
        for c in remaining:
            assert c.session_id is not None
            await self.engine.abort(c.session_id, FinishReason.SHUTDOWN)
        closing = [c.done.wait() for c in self._calls]  # also calls lingering for a half-close
        if closing:
            await asyncio.wait([asyncio.ensure_future(w) for w in closing], timeout=grace_s)
        return len(remaining)

    def _live_calls(self) -> list[_Call]:
        """Calls whose engine session has started and not yet ended."""
        return [c for c in self._calls if c.session_id is not None and not c.ended]


def _forget(tasks: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback that drops a background task from ``tasks`` and retrieves its outcome (no
    "exception was never retrieved" noise from a write that failed because its call ended)."""

    def done(task: asyncio.Future[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("streamgen")
    except Exception:  # not installed (e.g. run from a bare checkout)
        return getattr(streamgen, "__version__", "0+unknown")
