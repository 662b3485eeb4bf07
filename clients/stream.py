"""Stream a video from a streamgen server: a command line tool and a small async library.

Command line (``python -m clients.stream --help`` lists every option)::

    python -m clients.stream --server 127.0.0.1:50051 --prompt "a glossy red bottle turning" \\
        --seconds 20 --switch 5:"a blue bottle" --out out.mp4

shows a live progress line (frames, delivery fps, time to first frame, inter-chunk latency), writes a
playable MP4 (H.264: the server's fragmented MP4, init segment + fragments, written as it arrives;
JPEG / raw / Annex-B: decoded and re-encoded with ``Mp4Writer``), prints a JSON summary on stdout
and exits non-zero with the server's status and message on error. Ctrl-C sends a StopRequest
(the file is finished properly); a second Ctrl-C quits at once.

Library::

    async with StreamClient("127.0.0.1:50051") as client:
        async for frames in client.frames(StreamRequest("a red mug", num_frames=48)):
            ...  # np.uint8 [N, H, W, 3] per chunk

Behind a load balancer, or given several replicas (``"10.0.0.5:50051,10.0.0.6:50051"``, or a
``dns:///`` name of a headless Service: round-robin over its addresses), a start that a replica
refuses (``UNAVAILABLE`` while it drains, ``RESOURCE_EXHAUSTED`` when it is full) is retried with
exponential backoff (:class:`RetryPolicy`), landing on another replica; a stream that already
delivered frames is never retried (its frames would repeat from another session).

This module speaks only the public gRPC API; it never imports the engine or the model (torch is
loaded only through ``streamgen.video_io`` when JPEG/raw/Annex-B frames are re-encoded to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import av
import grpc
import numpy as np

from streamgen.api.v1 import pb, pb_grpc
from streamgen.server import fmp4

ENCODINGS: dict[str, int] = {"h264": pb.ENCODING_H264_FMP4, "h264-annexb": pb.ENCODING_H264_ANNEXB,
                             "jpeg": pb.ENCODING_JPEG, "raw": pb.ENCODING_RAW_RGB}
# Reasons after which the stream is complete as far as the client asked (exit 0).
OK_REASONS = (pb.StreamEnded.REASON_COMPLETED, pb.StreamEnded.REASON_STOPPED, pb.StreamEnded.REASON_LIMIT_REACHED)
EXIT_OK, EXIT_RPC_ERROR, EXIT_USAGE, EXIT_STREAM_ENDED_EARLY = 0, 1, 2, 3
# A replica refuses a start with these when it drains or is full: another replica may take it. (Also
# what a client sees when the balancer finds no live replica, or the replica died before any frame.)
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# How a stream ends when its replica dies mid-way: UNAVAILABLE directly, INTERNAL (RST_STREAM) through a proxy.
_CUT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})
# Response header naming the replica that served a call (deploy/local/nginx.conf.template sets it).
UPSTREAM_HEADER = "x-streamgen-upstream"


class StreamError(Exception):
    """The call ended with a non-OK gRPC status (the server's code and message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class StreamEndedEarly(Exception):
    """The server ended the stream with REASON_ERROR or REASON_SERVER_SHUTDOWN."""

    def __init__(self, ended: pb.StreamEnded) -> None:
        super().__init__(f"{pb.StreamEnded.Reason.Name(ended.reason)}: {ended.message}")
        self.ended = ended


@dataclass(frozen=True)
class RetryPolicy:
    """How a refused start is retried: up to ``max_attempts`` calls in all, sleeping a jittered
    exponential backoff between them (uniform in [b/2, b], b = initial * multiplier^(n-1), capped)
    so that clients refused together do not come back together."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not (0 <= self.initial_backoff_s <= self.max_backoff_s and self.multiplier >= 1):
            raise ValueError("want 0 <= initial_backoff_s <= max_backoff_s and multiplier >= 1")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to sleep before retry number ``retry`` (1, 2, ...)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return rng.uniform(cap / 2, cap)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Refusal:
    """One start that was refused and then retried."""

    code: grpc.StatusCode
    message: str
    upstream: str  # the replica, from the balancer's x-streamgen-upstream header ("" without one)


@dataclass
class StreamTrace:
    """What it took to get a stream (filled in by :meth:`StreamClient.stream` when passed one)."""

    refusals: list[Refusal] = field(default_factory=list)
    upstream: str = ""  # the replica of the last attempt, as the balancer names it ("" if it does not)


@dataclass(frozen=True, order=True)
class PromptSwitch:
    """Send ``prompt`` once ``at_s`` seconds of video have been received."""

    at_s: float
    prompt: str

    @classmethod
    def parse(cls, text: str) -> PromptSwitch:
        seconds, sep, prompt = text.partition(":")
        try:
            at_s = float(seconds)
        except ValueError:
            at_s = math.nan
        if not sep or not prompt.strip() or not at_s >= 0:
            raise ValueError(f"--switch wants SECONDS:PROMPT (e.g. 5:\"a blue mug\"), got {text!r}")
        return cls(at_s, prompt)


@dataclass(frozen=True)
class StreamRequest:
    """What to ask for; ``num_frames=0`` streams until stopped (or the server's limit)."""

    prompt: str
    seed: int = 0
    num_frames: int = 0
    fps: int = 0
    encoding: str = "h264"
    image: bytes = b""
    keyframe_interval: int = 0
    jpeg_quality: int = 0
    switches: tuple[PromptSwitch, ...] = ()
    expect_preset: str = ""

    def to_proto(self) -> pb.GenerateRequest:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; valid: {', '.join(ENCODINGS)}")
        return pb.GenerateRequest(start=pb.StartRequest(
            prompt=self.prompt, start_image=self.image, seed=self.seed, num_frames=self.num_frames, fps=self.fps,
            encoding=ENCODINGS[self.encoding], keyframe_interval=self.keyframe_interval,
            jpeg_quality=self.jpeg_quality, expect_preset=self.expect_preset))


class FrameDecoder:
    """Turns each FrameChunk of one stream into ``np.uint8 [N, H, W, 3]``, incrementally."""

    def __init__(self, started: pb.StreamStarted) -> None:
        self.started = started
        self.width, self.height = started.width, started.height
        self._h264: av.CodecContext | None = None
        self._prefix = b""
        if started.encoding in (pb.ENCODING_H264_FMP4, pb.ENCODING_H264_ANNEXB):
            self._h264 = av.CodecContext.create("h264", "r")
        if started.encoding == pb.ENCODING_H264_FMP4:
            sps, pps = fmp4.read_avcc(started.init_segment)
            self._prefix = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x00\x01" + pps  # the decoder's first input

    def decode(self, chunk: pb.FrameChunk) -> np.ndarray:
        enc = self.started.encoding
        if enc == pb.ENCODING_RAW_RGB:
            frames = np.frombuffer(chunk.payload, np.uint8).reshape(-1, self.height, self.width, 3)
        elif enc == pb.ENCODING_JPEG:
            from PIL import Image

            out, at = [], 0
            for size in chunk.frame_sizes:
                with Image.open(io.BytesIO(chunk.payload[at:at + size])) as img:
                    out.append(np.asarray(img.convert("RGB")))
                at += size
            frames = np.stack(out) if out else np.zeros((0, self.height, self.width, 3), np.uint8)
        elif enc == pb.ENCODING_H264_FMP4:
            assert self._h264 is not None
            decoded = []
            for sample in fmp4.fragment_samples(chunk.payload):
                packet = av.Packet(self._prefix + fmp4.samples_to_annexb([sample]))
                self._prefix = b""
                decoded.extend(self._h264.decode(packet))
            frames = self._stack(decoded)
        elif enc == pb.ENCODING_H264_ANNEXB:
            assert self._h264 is not None
            decoded = []
            for packet in [*self._h264.parse(chunk.payload), *self._h264.parse(None)]:  # None: end of this chunk
                decoded.extend(self._h264.decode(packet))
            frames = self._stack(decoded)
        else:
            raise ValueError(f"cannot decode encoding {enc}")
        if len(frames) != chunk.frame_count:
            raise ValueError(f"chunk at frame {chunk.first_frame_index} decoded to {len(frames)} frames, "
                             f"expected {chunk.frame_count}")
        return frames

    def _stack(self, frames: list[av.VideoFrame]) -> np.ndarray:
        if not frames:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.stack([f.to_ndarray(format="rgb24") for f in frames])


def channel_target(target: str) -> str:
    """``host:port``, a gRPC target URI (``dns:///name:port``), or several ``ip:port`` separated by commas
    (made into gRPC's ``ipv4:``/``ipv6:`` list, balanced round-robin by the channel)."""
    if "," not in target or ":///" in target or target.startswith(("ipv4:", "ipv6:")):
        return target
    scheme = "ipv6" if target.startswith("[") else "ipv4"
    return f"{scheme}:{target}"


class StreamClient:
    """An async client of one server, balancer or replica set (one channel); use as ``async with``."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 ca_cert: bytes | None = None, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1),  # raw chunks of large videos exceed 4 MiB
            ("grpc.lb_policy_name", "round_robin"),  # several addresses: each call (and retry) takes the next
        ]
        target = channel_target(target)
        if tls:
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca_cert), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.StreamGenStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.retry = retry
        self._rng = random.Random()

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def model_info(self, timeout_s: float = 10.0) -> pb.ModelInfo:
        """The server's model and limits; raises :class:`StreamError` (UNAVAILABLE when it is down)."""
        try:
            return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self._metadata,
                                                 timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise StreamError(exc.code(), exc.details() or "") from None

    async def stream(self, request: StreamRequest, *, stop: asyncio.Event | None = None,
                     trace: StreamTrace | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """Raw responses (StreamStarted, FrameChunk..., StreamEnded). Sends the prompt switches as the
        video time they name is received and a StopRequest when ``stop`` is set. Leaving the loop
        early cancels the call (the server frees the session). Raises :class:`StreamError`.

        A start refused with a code in :data:`RETRYABLE_CODES` before any frame arrived is retried
        under ``self.retry`` (recorded in ``trace``); StreamStarted is therefore passed on together
        with the first chunk (or StreamEnded), once the stream is known to run where it started."""
        trace = trace if trace is not None else StreamTrace()
        attempt = 0
        while True:
            attempt += 1
            held: pb.GenerateResponse | None = None
            delivered = False
            frames = 0
            try:
                async with contextlib.aclosing(self._attempt(request, stop, trace)) as responses:
                    async for response in responses:
                        if response.WhichOneof("response") == "started" and not delivered:
                            held = response
                            continue
                        if held is not None:
                            delivered = True
                            yield held
                            held = None
                        delivered = True
                        if response.WhichOneof("response") == "chunk":
                            frames += response.chunk.frame_count
                        yield response
                if held is not None:  # a server that ends the call OK right after StreamStarted
                    yield held
                return
            except StreamError as exc:
                if delivered and exc.code in _CUT_CODES:  # say what happened, not only the transport's words
                    raise StreamError(exc.code, f"the stream was cut after {frames} frames (the replica or the "
                                                f"connection to it went away): {exc.message}") from None
                if (delivered or exc.code not in RETRYABLE_CODES or attempt >= self.retry.max_attempts
                        or (stop is not None and stop.is_set())):
                    raise
                trace.refusals.append(Refusal(exc.code, exc.message, trace.upstream))
            await asyncio.sleep(self.retry.backoff_s(attempt, self._rng))

    async def _attempt(self, request: StreamRequest, stop: asyncio.Event | None,
                       trace: StreamTrace) -> AsyncIterator[pb.GenerateResponse]:
        """One Generate call (see :meth:`stream`)."""
        call = self._stub.Generate(metadata=self._metadata)
        trace.upstream = ""
        # Responses are read by their own task, as fast as they arrive, so the end of the stream is
        # seen (and our side half-closed) even while the caller is still busy with earlier chunks.
        # A write (prompt switch, stop) can still race the server's close: grpc.aio then replaces the
        # call's status with INTERNAL (_LOST_STATUS_DETAILS) and drops what was not read yet. So
        # nothing is written once a bounded stream's last frame has arrived (the server closes right
        # after it), and once StreamEnded, the server's last message, has been read a lost status says
        # nothing about the stream, so it is not an error.
        inbox: asyncio.Queue[pb.GenerateResponse | StreamError | None] = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []
        pending = sorted(request.switches)
        fps = request.fps
        received = 0
        ended = False
        read = _Read(request.num_frames)
        try:
            await _write_start(call, request.to_proto())
            tasks.append(asyncio.create_task(_read_all(call, inbox, trace, read)))
            if stop is not None:
                tasks.append(asyncio.create_task(_send_stop_when(stop, call, read)))
            while (response := await inbox.get()) is not None:
                if isinstance(response, StreamError):
                    if ended and _lost_status(response.code, response.message):
                        return
                    raise response
                kind = response.WhichOneof("response")
                if kind == "ended":
                    ended = True
                elif kind == "started":
                    fps = response.started.fps
                elif kind == "chunk":
                    received += response.chunk.frame_count
                    while pending and fps and received >= pending[0].at_s * fps and not read.all_frames:
                        switch = pending.pop(0)
                        await _write_quietly(call, pb.GenerateRequest(
                            prompt_update=pb.PromptUpdate(prompt=switch.prompt)))
                yield response
            code = await call.code()
            if code != grpc.StatusCode.OK:
                details = await call.details() or ""
                if not (ended and _lost_status(code, details)):
                    raise StreamError(code, details)
        except grpc.aio.AioRpcError as exc:
            if not (ended and _lost_status(exc.code(), exc.details() or "")):
                raise StreamError(exc.code(), exc.details() or "") from None
        finally:
            for task in tasks:
                task.cancel()
            if not call.done():
                call.cancel()

    async def frames(self, request: StreamRequest, *, stop: asyncio.Event | None = None,
                     trace: StreamTrace | None = None) -> AsyncIterator[np.ndarray]:
        """Decoded frames, ``np.uint8 [N, H, W, 3]`` per chunk. Raises :class:`StreamError` on a non-OK
        status and :class:`StreamEndedEarly` on REASON_ERROR / REASON_SERVER_SHUTDOWN."""
        decoder: FrameDecoder | None = None
        async for response in self.stream(request, stop=stop, trace=trace):
            kind = response.WhichOneof("response")
            if kind == "started":
                decoder = FrameDecoder(response.started)
            elif kind == "chunk":
                assert decoder is not None, "FrameChunk before StreamStarted"
                yield decoder.decode(response.chunk)
            elif kind == "ended" and response.ended.reason not in OK_REASONS:
                raise StreamEndedEarly(response.ended)


@dataclass
class _Read:
    """What the reader task has received of one call (it runs ahead of the caller)."""

    num_frames: int
    frames: int = 0

    @property
    def all_frames(self) -> bool:
        """A bounded stream's last frame arrived: the server closes the call now."""
        return self.num_frames > 0 and self.frames >= self.num_frames


async def _read_all(call: Any, inbox: asyncio.Queue[pb.GenerateResponse | StreamError | None],
                    trace: StreamTrace, read: _Read) -> None:
    """Move every response into ``inbox``; half-close on StreamEnded; then None (or the error)."""
    try:
        # The balancer's header arrives with the response headers; a refusal sent as trailers only
        # carries it in the trailers.
        trace.upstream = _upstream_of(await call.initial_metadata())
        while (response := await call.read()) is not grpc.aio.EOF:
            if response.WhichOneof("response") == "chunk":
                read.frames += response.chunk.frame_count
            inbox.put_nowait(response)
            if response.WhichOneof("response") == "ended":
                with contextlib.suppress(Exception):
                    await call.done_writing()  # lets the server close the call now
    except grpc.aio.AioRpcError as exc:
        trace.upstream = trace.upstream or _upstream_of(exc.trailing_metadata())
        inbox.put_nowait(StreamError(exc.code(), exc.details() or ""))
        return
    inbox.put_nowait(None)


def _upstream_of(metadata: Any) -> str:
    """The replica that answered: nginx lists every upstream it tried ("dead:1, live:2"), the last served."""
    for key, value in metadata or ():
        if key == UPSTREAM_HEADER:
            return str(value).split(",")[-1].strip()
    return ""


# What grpc.aio reports for a write that found the call already closed by the peer; the peer's own
# status is replaced by it (grpc/aio/_call.py: set_internal_error), so the real answer is lost.
_LOST_STATUS_DETAILS = "Internal error from Core"


def _lost_status(code: grpc.StatusCode, details: str) -> bool:
    return code == grpc.StatusCode.INTERNAL and details == _LOST_STATUS_DETAILS


async def _write_start(call: Any, message: pb.GenerateRequest) -> None:
    """Send the start request. A balancer or server that answers before reading it (nginx with no
    replica reachable answers in well under a millisecond, then resets the stream) can close the call
    before the message is handed to the transport; grpc.aio then reports INTERNAL and loses the
    status the peer sent. The request was never read, so nothing started: report it as UNAVAILABLE,
    which :meth:`StreamClient.stream` retries like any refused start."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        return  # the call already ended with a status of its own: the reader reports it
    except grpc.aio.AioRpcError as exc:
        if _lost_status(exc.code(), exc.details() or ""):
            raise StreamError(grpc.StatusCode.UNAVAILABLE,
                              "the server closed the call before the start request could be sent "
                              "(nothing started; its own status was lost in the client library)") from None
        raise


async def _write_quietly(call: Any, message: pb.GenerateRequest) -> None:
    # After our half-close (the stream ended) a write fails locally; the final status tells the rest.
    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        await call.write(message)


async def _send_stop_when(stop: asyncio.Event, call: Any, read: _Read) -> None:
    await stop.wait()
    if read.all_frames:
        return  # the stream is ending by itself; a write now could only race its close
    await _write_quietly(call, pb.GenerateRequest(stop=pb.StopRequest()))
    with contextlib.suppress(Exception):  # the call may have ended meanwhile
        await call.done_writing()


# ---------------------------------------------------------------------------------------- command line


@dataclass
class Progress:
    """Receive-side statistics and the live progress line."""

    target_frames: int
    started_s: float = field(default_factory=time.monotonic)
    # The clock chunks are timed by (``time.monotonic``; a test passes its own instead of patching the module's).
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    first_chunk_s: float | None = None
    last_chunk_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    frames: int = 0
    bytes: int = 0

    def chunk(self, frame_count: int, payload_bytes: int) -> None:
        now = self.clock()
        if self.first_chunk_s is None:
            self.first_chunk_s = now
        else:
            self.gaps_s.append(now - (self.last_chunk_s or now))
        self.last_chunk_s = now
        self.frames += frame_count
        self.bytes += payload_bytes

    @property
    def ttff_s(self) -> float | None:
        return None if self.first_chunk_s is None else self.first_chunk_s - self.started_s

    @property
    def fps(self) -> float:
        elapsed = (self.last_chunk_s or self.started_s) - self.started_s
        return self.frames / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        total = f"/{self.target_frames}" if self.target_frames else ""
        ttff = "-" if self.ttff_s is None else f"{self.ttff_s:.2f}s"
        gap = f"{self.gaps_s[-1]:.2f}s (p95 {_p95(self.gaps_s):.2f}s)" if self.gaps_s else "-"
        return (f"frames {self.frames}{total}  {self.fps:5.1f} fps  ttff {ttff}  chunk gap {gap}  "
                f"{self.bytes / 1e6:.2f} MB")

    def summary(self) -> dict[str, Any]:
        return {"frames": self.frames, "bytes": self.bytes, "delivery_fps": round(self.fps, 2),
                "ttff_s": None if self.ttff_s is None else round(self.ttff_s, 4),
                "inter_chunk_p50_s": round(statistics.median(self.gaps_s), 4) if self.gaps_s else None,
                "inter_chunk_p95_s": round(_p95(self.gaps_s), 4) if self.gaps_s else None}


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class _Mp4Out:
    """The output file: fMP4 bytes appended as they arrive, or decoded frames re-encoded."""

    def __init__(self, path: Path, started: pb.StreamStarted) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._raw: IO[bytes] | None = None
        self._writer: Any = None
        self._decoder: FrameDecoder | None = None
        if started.encoding == pb.ENCODING_H264_FMP4:
            self._raw = path.open("wb")
            self._raw.write(started.init_segment)
        else:
            from streamgen.video_io import Mp4Writer  # PyAV only; no torch at run time

            self._decoder = FrameDecoder(started)
            self._writer = Mp4Writer(path, started.width, started.height, started.fps)

    def write(self, chunk: pb.FrameChunk) -> None:
        if self._raw is not None:
            self._raw.write(chunk.payload)
            self._raw.flush()  # a player (or a crash) sees everything received so far
        else:
            assert self._decoder is not None
            self._writer.write(self._decoder.decode(chunk))

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._writer is not None:
            self._writer.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.stream", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream a generated video from a streamgen server (gRPC) and write it to an MP4.",
        epilog="without --seconds or --frames the stream runs until Ctrl-C (or the server's frame limit).\n"
               "Ctrl-C sends a StopRequest and finishes the file; a second Ctrl-C quits at once.\n\n"
               "exit codes: 0  completed, stopped or limit reached\n"
               "            1  the server refused or failed the call (its gRPC status and message are printed)\n"
               "            2  bad arguments\n"
               "            3  the stream ended early (REASON_ERROR or REASON_SERVER_SHUTDOWN); the frames\n"
               "               received are still written")
    p.add_argument("--server", default="127.0.0.1:50051",
                   help="host:port of the server or load balancer; several replicas as ip:port,ip:port; or a gRPC "
                        "target such as dns:///streamgen-headless:50051 (default: %(default)s)")
    p.add_argument("--start-attempts", type=int, default=RetryPolicy.max_attempts,
                   help="calls to try when replicas refuse the start (UNAVAILABLE / RESOURCE_EXHAUSTED), with "
                        "backoff; a stream that delivered frames is never retried (default: %(default)s)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--image", type=Path, help="PNG/JPEG start image (product photo) for the first frame")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed + prompt + model -> same video")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="video length in seconds (at --fps or the model's fps)")
    length.add_argument("--frames", type=int, help="video length in frames")
    p.add_argument("--fps", type=int, default=0, help="playback fps for pacing and timestamps (0 = the model's)")
    p.add_argument("--encoding", choices=list(ENCODINGS), default="h264",
                   help="h264 = H.264 fragmented MP4 (written as received), h264-annexb, jpeg, raw "
                        "(all but h264 are decoded and re-encoded into --out) (default: %(default)s)")
    p.add_argument("--keyframe-interval", type=int, default=0, help="H.264 frames per keyframe (0 = server default)")
    p.add_argument("--jpeg-quality", type=int, default=0, help="JPEG quality 1-100 (0 = server default)")
    p.add_argument("--switch", action="append", default=[], metavar="SECONDS:PROMPT",
                   help="change the prompt once SECONDS of video were received; repeatable")
    p.add_argument("--expect-preset", default="", help="fail unless the server runs this preset")
    p.add_argument("--token", help="bearer token (default: env STREAMGEN_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-cert", type=Path, help="CA certificate (PEM) for --tls (default: system roots)")
    p.add_argument("--out", type=Path, help="output .mp4 (omit to only measure)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _request_from(args: argparse.Namespace, info: pb.ModelInfo) -> StreamRequest:
    fps = args.fps or info.fps
    num_frames = 0
    if args.frames is not None:
        num_frames = args.frames
    elif args.seconds is not None:
        num_frames = max(1, round(args.seconds * fps))
    return StreamRequest(prompt=args.prompt, seed=args.seed, num_frames=num_frames, fps=args.fps,
                         encoding=args.encoding, image=args.image.read_bytes() if args.image else b"",
                         keyframe_interval=args.keyframe_interval, jpeg_quality=args.jpeg_quality,
                         switches=tuple(PromptSwitch.parse(s) for s in args.switch), expect_preset=args.expect_preset)


def _validate(args: argparse.Namespace) -> None:
    if args.frames is not None and args.frames <= 0:
        raise ValueError(f"--frames must be > 0, got {args.frames}")
    if args.seconds is not None and not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if args.out is not None and args.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {args.out}")
    if args.image is not None and not args.image.is_file():
        raise ValueError(f"--image {args.image} is not a file")
    if args.start_attempts < 1:
        raise ValueError(f"--start-attempts must be >= 1, got {args.start_attempts}")
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise ValueError(f"--ca-cert {args.ca_cert} is not a file")
    for s in args.switch:
        PromptSwitch.parse(s)


async def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("STREAMGEN_TOKEN") or None
    ca = args.ca_cert.read_bytes() if args.ca_cert else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_sigint() -> None:
        if stop.is_set() and main_task is not None:
            main_task.cancel()  # second Ctrl-C: give up now
        stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    if args.out is not None and args.encoding != "h264":
        import streamgen.video_io  # noqa: F401 - pulls torch (~1 s): load it before frames are in flight
    tty = sys.stderr.isatty() and not args.quiet
    out: _Mp4Out | None = None
    summary: dict[str, Any] = {"server": args.server}
    trace = StreamTrace()
    retry = RetryPolicy(max_attempts=args.start_attempts)
    async with StreamClient(args.server, token=token, tls=args.tls, ca_cert=ca, retry=retry) as client:
        try:
            info = await client.model_info()
            request = _request_from(args, info)
            progress = Progress(request.num_frames)
            async for response in client.stream(request, stop=stop, trace=trace):
                kind = response.WhichOneof("response")
                if kind == "started":
                    summary.update(session=response.started.session_id, width=response.started.width,
                                   height=response.started.height, fps=response.started.fps,
                                   codec=response.started.codec)
                    if args.out is not None:
                        out = _Mp4Out(args.out, response.started)
                elif kind == "chunk":
                    progress.chunk(response.chunk.frame_count, len(response.chunk.payload))
                    if out is not None:
                        out.write(response.chunk)
                    if tty:
                        print(f"\r{progress.line()}", end="", file=sys.stderr, flush=True)
                elif kind == "ended":
                    summary.update(reason=pb.StreamEnded.Reason.Name(response.ended.reason),
                                   message=response.ended.message)
        except StreamError as exc:
            if tty:
                print(file=sys.stderr)
            _print_refusals(trace)
            print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
            return EXIT_RPC_ERROR
        finally:
            if out is not None:
                out.close()
                summary["out"] = str(out.path)
    if tty:
        print(file=sys.stderr)
    summary.update(progress.summary())
    summary.update(start_retries=len(trace.refusals), upstream=trace.upstream or None)
    _print_refusals(trace)
    print(json.dumps(summary))
    reason = summary.get("reason")
    if reason not in [pb.StreamEnded.Reason.Name(r) for r in OK_REASONS]:
        print(f"error: stream ended with {reason}: {summary.get('message', '')}", file=sys.stderr)
        return EXIT_STREAM_ENDED_EARLY
    return EXIT_OK


def _print_refusals(trace: StreamTrace) -> None:
    for r in trace.refusals:
        where = f" by {r.upstream}" if r.upstream else ""
        print(f"note: start refused{where} ({r.code.name}: {r.message}); retried", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
    except ValueError as exc:
        print(f"python -m clients.stream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(run(args))
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
