"""``GET /live.ts?prompt=...&seed=...&fps=...``: the stream as MPEG-TS (H.264) over plain HTTP.

MPEG-TS over HTTP is what OBS's Media Source (the ffmpeg one, in every OBS build, including
Debian's, which has no Browser Source), ffplay, VLC and mpv open as a network URL. One request
is one ``Generate`` call: the response starts once the server has sent the first chunk (so a
refusal is an HTTP error with a readable body, never a 200 that goes silent) and the call is
cancelled the moment the client goes away (aiohttp cancels the handler on disconnect), which
frees the session's KV pages on the server.

Frames are re-encoded by the gateway with libx264 (``tune=zerolatency``: no B-frames, no
lookahead, one slice per frame) and written as soon as each frame is encoded: a chunk's frames
go out together, and the player's clock (the pts) spreads them. No pacing here: the server is
paced already, and a second clock in front of the player would only add delay.

This module knows nothing of WebRTC; it speaks the public gRPC API through :class:`Upstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiohttp import web

from clients.stream import OK_REASONS, StreamError, StreamRequest
from clients.webrtc.protocol import MAX_SEED, OfferError, check_prompt
from clients.webrtc.upstream import DecodedChunk
from streamgen.api.v1 import pb
from streamgen.server.logs import event

if TYPE_CHECKING:
    from clients.webrtc.gateway import Gateway

log = logging.getLogger("clients.webrtc")

QUERY_KEYS = ("prompt", "seed", "fps")
MAX_FPS = 240  # StartRequest.fps's range
MIME_TYPE = "video/mp2t"


class QueryError(ValueError):
    """A bad ``/live.ts`` query string; the message says what to fix."""


@dataclass(frozen=True)
class LiveQuery:
    prompt: str | None   # None: the gateway's default prompt
    seed: int
    fps: int = 0         # 0: the model's native rate


def parse_query(query: Mapping[str, str], max_prompt_chars: int | None = None,
                keys: tuple[str, ...] = QUERY_KEYS) -> LiveQuery:
    """Check ``/live.ts``'s query parameters (or those of ``POST /whep``, which takes ``keys``
    prompt and seed only). Raises :class:`QueryError`."""
    unknown = sorted(set(query) - set(keys))
    if unknown:
        raise QueryError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; valid: {', '.join(keys)}")
    prompt = query.get("prompt")
    if prompt is not None:
        try:
            prompt = check_prompt(prompt, max_prompt_chars, OfferError)
        except OfferError as exc:
            raise QueryError(str(exc)) from None
    seed_text = query.get("seed", "0")
    try:
        seed = int(seed_text)
    except ValueError:
        raise QueryError(f"\"seed\" must be an integer in [0, 2**64), got {seed_text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise QueryError(f"\"seed\" must be an integer in [0, 2**64), got {seed_text!r}")
    fps_text = query.get("fps", "0")
    if not fps_text.isdigit() or not 0 <= int(fps_text) <= MAX_FPS:
        raise QueryError(f"\"fps\" must be an integer in [1, {MAX_FPS}] (0 or none: the model's rate), "
                         f"got {fps_text!r}")
    return LiveQuery(prompt=prompt, seed=seed, fps=int(fps_text))


class _Sink(io.RawIOBase):
    """The muxer's output file: collects what it writes until :meth:`take`."""

    def __init__(self) -> None:
        super().__init__()
        self._data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._data += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._data)
        self._data.clear()
        return data


class TsEncoder:
    """RGB frames -> H.264 (libx264, zerolatency, no B-frames) in MPEG-TS bytes, frame by frame.

    A keyframe every second of video, so a player that joins or drops packets recovers quickly."""

    def __init__(self, width: int, height: int, fps: int) -> None:
        self._sink = _Sink()
        # flush_packets: each muxed packet reaches the sink at once (no 188-byte-packet batching).
        self._container = av.open(self._sink, mode="w", format="mpegts", options={"flush_packets": "1"})
        self._stream = self._container.add_stream("libx264", rate=fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.codec_context.time_base = Fraction(1, fps)
        self._stream.codec_context.options = {"tune": "zerolatency", "preset": "veryfast", "bf": "0",
                                              "g": str(fps), "crf": "20"}
        self.frames = 0

    def encode(self, frames: np.ndarray) -> bytes:
        """``frames`` ``np.uint8 [N, H, W, 3]`` -> the TS bytes that carry them."""
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        with contextlib.suppress(Exception):
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        return self._sink.take()


class LiveTsStream:
    """One ``/live.ts`` client, for the gateway's status, viewer count and shutdown."""

    kind = "live.ts"

    def __init__(self, stream_id: str, task: asyncio.Task[Any]) -> None:
        self.id = stream_id
        self.task = task
        self.session_id: str | None = None
        self.frames = 0
        self.end_reason: str | None = None
        self.created_s = time.monotonic()

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "connection": "http", "session_id": self.session_id,
                "frames": self.frames, "end_reason": self.end_reason}

    async def close(self, reason: str) -> None:
        self.end_reason = self.end_reason or reason
        self.task.cancel()


async def handle_live_ts(gateway: Gateway, request: web.Request) -> web.StreamResponse:
    """The ``GET /live.ts`` handler (see the module docstring)."""
    stream_id = uuid.uuid4().hex[:8]
    task = asyncio.current_task()
    assert task is not None
    try:
        query = parse_query(request.query)
    except QueryError as exc:
        return _reject(400, stream_id, str(exc))
    if gateway.num_viewers() >= gateway.config.max_viewers:
        return _reject(503, stream_id, f"the gateway is full ({gateway.config.max_viewers} viewers); try later")
    try:
        info = await gateway.upstream.model_info(timeout_s=gateway.config.server_timeout_s)
    except StreamError as exc:
        return _reject(502, stream_id, gateway.describe_error(exc), code=exc.code.name)
    if query.prompt is not None and info.max_prompt_chars and len(query.prompt) > info.max_prompt_chars:
        return _reject(400, stream_id, f"\"prompt\" has {len(query.prompt)} characters; "
                                       f"the server's limit is {info.max_prompt_chars}")
    live = LiveTsStream(stream_id, task)
    gateway.live_streams[stream_id] = live
    stream_request = StreamRequest(prompt=query.prompt or gateway.config.prompt, seed=query.seed, num_frames=0,
                                   fps=query.fps, encoding=gateway.config.encoding)
    event(log, "live_ts_connecting", viewer=stream_id, viewers=gateway.num_viewers(), seed=query.seed,
          prompt_chars=len(stream_request.prompt))
    try:
        return await _stream(gateway, request, live, stream_request, info)
    except asyncio.CancelledError:
        live.end_reason = live.end_reason or "client gone"
        raise
    finally:
        gateway.live_streams.pop(stream_id, None)
        event(log, "viewer_closed", viewer=stream_id, session=live.session_id, reason=live.end_reason,
              frames=live.frames, duration_s=round(time.monotonic() - live.created_s, 3))


async def _stream(gateway: Gateway, request: web.Request, live: LiveTsStream, stream_request: StreamRequest,
                  info: pb.ModelInfo) -> web.StreamResponse:
    call = gateway.upstream.open(stream_request)
    response: web.StreamResponse | None = None
    encoder: TsEncoder | None = None
    fps = info.fps
    try:
        # aclosing: leaving this block any way (the client gone, an error, the end) cancels the call.
        async with contextlib.aclosing(call.events()) as events:
            async for item in _first_chunk_within(events, gateway.config.first_chunk_timeout_s):
                if isinstance(item, pb.StreamStarted):
                    live.session_id = item.session_id
                    fps = item.fps or fps
                    encoder = TsEncoder(item.width, item.height, fps)
                    event(log, "stream_started", viewer=live.id, session=item.session_id, width=item.width,
                          height=item.height, fps=fps, preset=item.preset, format="mpegts")
                elif isinstance(item, DecodedChunk):
                    assert encoder is not None
                    data = await asyncio.to_thread(encoder.encode, item.frames)
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": MIME_TYPE,
                                                               "Cache-Control": "no-store"})
                        await response.prepare(request)
                    await response.write(data)
                    live.frames = encoder.frames
                else:
                    live.end_reason = pb.StreamEnded.Reason.Name(item.reason)
                    level = logging.INFO if item.reason in OK_REASONS else logging.WARNING
                    event(log, "stream_ended", level, viewer=live.id, session=live.session_id,
                          reason=live.end_reason, frames=live.frames, message=item.message)
                    if response is None:
                        return _reject(502, live.id, f"the stream ended before its first frame: {live.end_reason}"
                                                     + (f" ({item.message})" if item.message else ""))
    except StreamError as exc:
        live.end_reason = f"error {exc.code.name}"
        event(log, "stream_failed", logging.WARNING, viewer=live.id, session=live.session_id,
              code=exc.code.name, error=exc.message)
        if response is None:
            status = 503 if exc.code.name == "RESOURCE_EXHAUSTED" else 502
            return _reject(status, live.id, gateway.describe_error(exc), code=exc.code.name)
    except TimeoutError:
        live.end_reason = "no first frame"
        return _reject(504, live.id, f"the streamgen server sent no frame within "
                                     f"{gateway.config.first_chunk_timeout_s:g} s; is it overloaded?")
    except (ConnectionResetError, ConnectionError):
        live.end_reason = "client gone"
        raise asyncio.CancelledError from None
    assert response is not None
    if encoder is not None:
        with contextlib.suppress(ConnectionError):
            await response.write(encoder.close())
            await response.write_eof()
    live.end_reason = live.end_reason or "stream over"
    return response


async def _first_chunk_within(events: Any, timeout_s: float) -> Any:
    """``events``, raising TimeoutError when the first FrameChunk takes longer than ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    waiting = True
    while True:
        try:
            if waiting:
                async with asyncio.timeout_at(deadline):
                    item = await anext(events)
            else:
                item = await anext(events)
        except StopAsyncIteration:
            return
        if isinstance(item, DecodedChunk):
            waiting = False
        yield item


def _reject(status: int, stream_id: str, message: str, **fields: Any) -> web.Response:
    event(log, "live_ts_rejected", logging.WARNING, viewer=stream_id, status=status, error=message, **fields)
    # Plain text: what ffplay, VLC and OBS print or log when a network URL fails.
    body = message + "".join(f"\n{k}: {v}" for k, v in fields.items()) + "\n"
    return web.Response(status=status, text=body, content_type="text/plain", headers={"Cache-Control": "no-store"})
