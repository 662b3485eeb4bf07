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
from streamgen.server.image_decode import ImageDecoder, ImageError
from streamgen.server.logs import event
from streamgen.server.metrics import Metrics
from streamgen.server.wire import MalformedMessage

log = logging.getLogger("streamgen.server")

_OUTCOME_OF_REASON = {FinishReason.COMPLETED: "completed", FinishReason.STOPPED: "stopped",
                      FinishReason.LIMIT: "limit", FinishReason.SHUTDOWN: "shutdown", FinishReason.ERROR: "error"}


try:  # grpc's error for an operation on a call its peer already cancelled (a private name, so looked up)
    from grpc._cython.cygrpc import ExecuteBatchError as _CallGone
except ImportError:  # pragma: no cover - another grpc layout: such writes are then logged as errors
    class _CallGone(Exception):  # type: ignore[no-redef]
        pass


# A write held by flow control this long means the client reads nothing now (a reading client takes a
# chunk within milliseconds); the drain does not wait for such a call.
_BLOCKED_S = 0.25


class _Stalled(Exception):
    """The client read nothing for ``stall_timeout_s``."""


@dataclass(eq=False)  # identity semantics: calls live in a set
class _Call:
    """State of one open Generate call (shared by its writer and reader tasks)."""

    peer: str
    started_s: float
    encoding: str = ""                  # set once the StartRequest is planned (for the stream_end line)
    admitted: bool = False              # holds one of the max_sessions + max_waiting places
    session_id: str | None = None       # set before the engine is asked to start it (see _generate)
    error: RequestError | None = None   # set by the reader on a protocol violation mid-stream
    ended: bool = False                 # the session's final message was taken from the engine
    frames_sent: int = 0                # frames in writes gRPC completed
    frames_unacked: int = 0             # frames in the write flow control still held when the call ended
    bytes_sent: int = 0
    first_chunk_s: float | None = None
    last_chunk_s: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Any] | None = None   # the handler, for a drain that must end a blocked call
    write_since_s: float | None = None      # a write is waiting for HTTP/2 flow control since then
    shut_down: bool = False                 # the drain cancelled the handler


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
        # Start images are decoded in worker processes, never on the event loop or in our threads (a
        # 40-Mpx PNG takes ~1 s of CPU and holds the GIL for long stretches); the pool's size bounds
        # the CPU and memory that uploads can take at once.
        self.images = ImageDecoder(config.image_decode_workers)

    def close(self) -> None:
        self.images.close()

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
        if isinstance(request, MalformedMessage):
            event(log, "malformed_request", logging.WARNING, method="GetModelInfo", peer=context.peer(),
                  error=request.reason)
            self.metrics.outcome("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return self.model_info()

    # ------------------------------------------------------------------ Generate
    async def Generate(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        call = _Call(peer=context.peer(), started_s=time.monotonic(), task=asyncio.current_task())
        self._calls.add(call)
        self.metrics.streams_active.set(len(self._calls))
        outcome = "error"
        try:
            outcome = await self._generate(call, context)
        except RequestError as exc:
            outcome = exc.code.name.lower()
            await context.abort(exc.code, convert.clean_message(exc.message))
        except _Stalled:
            outcome = "stalled"
            # The client's flow-control window is full, so this status reaches it only when it reads
            # again (or its deadline passes, or it disconnects): end the session and account for the
            # call first, so its pages and the metrics do not wait for that.
            await self._end_call(call, outcome)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the client read nothing for {self.config.stall_timeout_s:g} s; stream cancelled")
        except asyncio.CancelledError:
            outcome = "shutdown" if call.shut_down else "cancelled"  # else the client cancelled or went away
            raise
        except grpc.aio.AbortError:
            raise
        except _CallGone:
            # The client cancelled or went away while a write was in flight: grpc fails that write
            # before it cancels this handler. Not a server error; nothing can be sent any more.
            outcome = "cancelled"
        except Exception:
            log.exception("Generate failed")
            raise
        finally:
            await self._end_call(call, outcome)

    async def _end_call(self, call: _Call, outcome: str) -> None:
        """Free the call's session and record how it ended (once; safe from a cancelled handler)."""
        if call.done.is_set():
            return
        call.done.set()
        if call.session_id is not None:
            await self._abort_session(call.session_id)
        self._calls.discard(call)
        self.metrics.streams_active.set(len(self._calls))
        self.metrics.outcome(outcome)
        self._log_end(call, outcome)

    async def _read(self, call: _Call, context: grpc.aio.ServicerContext) -> Any:
        """The next request message (or EOF); a malformed one is a RequestError and one WARNING line."""
        message = await context.read()
        if isinstance(message, MalformedMessage):
            event(log, "malformed_request", logging.WARNING, method="Generate", session=call.session_id,
                  peer=call.peer, error=message.reason)
            raise convert.invalid(message.message)
        return message

    def _reserve(self, call: _Call) -> None:
        """Take one of the ``max_sessions + max_waiting`` places, or refuse at once.

        Check and take happen with no ``await`` between them, so a burst of calls on this event
        loop cannot all pass the check before any of them counts (the place is held until the call
        ends, including while its start image is decoded).
        """
        limit = self.engine_config.max_sessions + self.config.max_waiting
        if len(self._live_calls()) >= limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server busy: {self.engine_config.max_sessions} streams running and "
                               f"{self.config.max_waiting} waiting; retry later or on another replica")
        call.admitted = True

    async def _generate(self, call: _Call, context: grpc.aio.ServicerContext) -> str:
        try:  # a client that opens the call and sends nothing must not hold it (and a balancer's upstream) forever
            first = await asyncio.wait_for(self._read(call, context), timeout=self.config.stall_timeout_s)
        except TimeoutError:
            raise convert.invalid(f"no StartRequest within {self.config.stall_timeout_s:g} s "
                                  "of opening the call") from None
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
        plan = convert.plan_stream(first.start, self.preset,
                                   default_keyframe_interval_s=self.config.keyframe_interval_s,
                                   default_jpeg_quality=self.config.jpeg_quality)
        call.encoding = plan.encoding.value
        try:  # all but the start image, before a place is taken: a bad request is INVALID_ARGUMENT on a full server too
            self.engine.engine.validate(plan.request)
        except ValueError as exc:
            raise convert.invalid(str(exc)) from None
        self._reserve(call)
        video = self.preset.video
        if plan.image_bytes:
            try:
                image = await self.images.decode(plan.image_bytes, video.width, video.height,
                                                 self.config.max_image_pixels)
            except ImageError as exc:
                raise convert.invalid(str(exc)) from None
            except RuntimeError as exc:  # the decoding process died (the pool is rebuilt)
                raise RequestError(grpc.StatusCode.INTERNAL, str(exc)) from None
            plan = plan.with_image(image)
            if self.draining:  # the drain began while the image was decoded
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another replica")
        try:
            encoder = make_encoder(plan.encoding, video.width, video.height, plan.fps,
                                   keyframe_interval=plan.keyframe_interval, jpeg_quality=plan.jpeg_quality,
                                   crf=self.config.h264_crf)
        except ValueError as exc:
            raise convert.invalid(str(exc)) from None
        try:
            # The id belongs to the call *before* the engine is asked: a cancel at any moment from
            # here on aborts the session in _end_call (the abort runs after the start on the engine
            # thread), so no session outlives its call.
            sid = call.session_id = self.engine.new_session_id()
            try:
                _, queue = await self.engine.start(plan.request, sid)
            except ValueError as exc:  # the engine's validation: prompt, frames, fps, seed, image
                raise convert.invalid(str(exc)) from None
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
                await self._write(context, convert.stream_ended(reason, final.error or "", call.frames_sent), call)
                # Close the call only once the client half-closed (bounded): a client that wrote a
                # PromptUpdate before it saw StreamEnded must not find the call gone - grpc's client
                # then reports INTERNAL and drops the responses it had not read yet.
                await asyncio.wait({reader}, timeout=self.config.linger_s)
                return _OUTCOME_OF_REASON[reason]
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
            try:
                await self._write(context, message, call)
            except (_Stalled, asyncio.CancelledError):
                call.frames_unacked = len(chunk.frames)  # handed to gRPC, not (yet) taken by the client
                raise
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

    async def _write(self, context: grpc.aio.ServicerContext, message: pb.GenerateResponse,
                     call: _Call | None = None) -> None:
        # write() waits for HTTP/2 flow control: a slow reader blocks here, the chunk queue fills
        # up to max_buffered_chunks and the engine pauses the session (backpressure, no drops).
        # A write held back by flow control ignores cancellation until the client reads, so the
        # stall clock waits *beside* the write (asyncio.wait) rather than cancelling it.
        write = asyncio.ensure_future(context.write(message))
        if call is not None:
            call.write_since_s = time.monotonic()
        try:
            done, _ = await asyncio.wait({write}, timeout=self.config.stall_timeout_s)
            if call is not None:
                call.write_since_s = None
        except asyncio.CancelledError:
            self._keep(write)  # the client cancelled mid-write: the write fails; retrieve that quietly
            raise
        if not done:
            self._keep(write)  # finishes (or fails) whenever the call ends; nobody waits
            raise _Stalled()
        write.result()

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a task nobody awaits until it ends, then retrieve its outcome (no "exception was
        never retrieved" noise when it fails because its call ended)."""
        self._background.add(task)
        task.add_done_callback(_forget(self._background))

    async def _read_updates(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """Apply PromptUpdate / StopRequest until the client half-closes.

        A protocol violation records its status in ``call.error`` and aborts the session (the
        writer then ends the call with it). Messages after the session ended are read and
        ignored, so the client's side of the stream stays writable until it closes it.
        """
        sid = call.session_id
        assert sid is not None
        while True:
            try:
                message = await self._read(call, context)
            except RequestError as exc:
                if call.error is None and not call.ended:
                    call.error = exc
                    await self.engine.abort(sid, FinishReason.ERROR)
                continue
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
        self._keep(task)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    def _log_end(self, call: _Call, outcome: str) -> None:
        now = time.monotonic()
        ttff = None if call.first_chunk_s is None else round(call.first_chunk_s - call.started_s, 4)
        level = logging.WARNING if outcome in ("error", "stalled") else logging.INFO
        event(log, "stream_end", level, session=call.session_id, outcome=outcome, frames=call.frames_sent,
              frames_unacked=call.frames_unacked, bytes=call.bytes_sent, encoding=call.encoding, ttff_s=ttff,
              duration_s=round(now - call.started_s, 3), peer=call.peer)

    # ------------------------------------------------------------------ drain
    async def drain(self, timeout_s: float, grace_s: float = 1.0) -> int:
        """Stop admitting; let running streams go on for ``timeout_s``, then end them with
        REASON_SERVER_SHUTDOWN and wait up to ``grace_s`` for their last messages; a call still
        open then (its client reads nothing, so flow control holds its writes) is cancelled. So the
        drain takes at most ``timeout_s + grace_s`` whatever the clients do. Returns how many
        streams were ended early."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = time.monotonic() + timeout_s
        while self._live_calls() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        remaining = self._live_calls()
        for c in remaining:
            if c.session_id is not None:
                await self.engine.abort(c.session_id, FinishReason.SHUTDOWN)
        # Streams whose clients read get their StreamEnded within moments (and lingering calls their
        # half-close); a client that reads nothing cannot receive anything, so its call is not waited
        # for once its write has been held by flow control for a while.
        grace_end = time.monotonic() + grace_s
        while time.monotonic() < grace_end:
            now = time.monotonic()
            open_calls = [c for c in self._calls if not c.done.is_set()]
            if all(c.write_since_s is not None and now - c.write_since_s > _BLOCKED_S for c in open_calls):
                break
            await asyncio.sleep(0.05)
        for call in [c for c in self._calls if not c.done.is_set()]:
            if call.task is not None:
                call.shut_down = True
                call.task.cancel()
        return len(remaining)

    def _live_calls(self) -> list[_Call]:
        """Calls holding a place (see _reserve) whose session has not ended yet."""
        return [c for c in self._calls if c.admitted and not c.ended]


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
