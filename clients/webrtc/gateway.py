"""The WebRTC gateway: an HTTP page + ``POST /offer``, one peer connection and one ``Generate`` call per viewer.

A viewer's life::

    POST /offer {sdp, type, prompt?, seed?}
      -> check the offer (400 + JSON message), the viewer limit (503), the server (GetModelInfo; 502)
      -> answer with a sendonly video track (VP8 or H.264) and the page's data channel
    peer connection "connected"
      -> open Generate (unbounded), decode chunks, feed the paced track; stats on the data channel
    data channel: {"type": "prompt"} -> PromptUpdate, {"type": "stop"} -> StopRequest
    tab closed / pc closed or failed / data channel closed / stream over / never connected
      -> cancel the Generate call (the server frees the session's pages at once), close the pc

Every viewer runs in its own tasks: a viewer's error (bad message, server down, server refusal)
is logged and reported to that viewer only; the gateway keeps serving the others.

Logs are the server's structured lines (:mod:`streamgen.server.logs`): viewer ids, outcomes,
counts and timings, never prompts. This module never imports the engine or the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from clients.stream import ENCODINGS, OK_REASONS, StreamError, StreamRequest
from clients.webrtc.live_ts import LiveTsStream, handle_live_ts
from clients.webrtc.protocol import (
    MAX_OFFER_BYTES,
    MessageError,
    Offer,
    OfferError,
    parse_message,
    parse_offer,
    to_page,
)
from clients.webrtc.track import GeneratedVideoTrack
from clients.webrtc.upstream import DecodedChunk, LiveCall, Upstream
from streamgen.api.v1 import pb
from streamgen.server.logs import event

log = logging.getLogger("clients.webrtc")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_PROMPT = "a glossy red bottle turning on a white table"
# RTP payload formats the gateway can send (aiortc encodes both; VP8 plays in every browser,
# including OBS builds whose Chromium lacks the proprietary H.264 decoder).
CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


@dataclass(frozen=True)
class GatewayConfig:
    grpc_target: str                      # host:port of `streamgen serve`
    host: str = "127.0.0.1"
    port: int = 8080                      # 0 = any free port
    codec: str = "vp8"                    # key of CODECS
    encoding: str = "h264"                # gRPC encoding asked of the server (key of clients.stream.ENCODINGS)
    prompt: str = DEFAULT_PROMPT          # when the offer names none
    max_viewers: int = 8
    token: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_cert: bytes | None = field(default=None, repr=False)
    server_timeout_s: float = 3.0         # GetModelInfo at each offer: is the server there?
    connect_timeout_s: float = 20.0       # offer answered -> peer connection "connected"
    end_grace_s: float = 3.0              # stream over -> close the pc (the page closes it sooner)
    first_chunk_timeout_s: float = 60.0   # /live.ts: the server's first frame, else 504 (covers its queueing)
    stats_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.grpc_target or ":" not in self.grpc_target:
            raise ValueError(f"grpc_target must be HOST:PORT, got {self.grpc_target!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; valid: {', '.join(CODECS)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; valid: {', '.join(ENCODINGS)}")
        if not self.prompt.strip():
            raise ValueError("the default prompt must be non-empty")
        if self.max_viewers <= 0:
            raise ValueError(f"max_viewers must be > 0, got {self.max_viewers}")
        for name in ("server_timeout_s", "connect_timeout_s", "end_grace_s", "first_chunk_timeout_s",
                     "stats_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Viewer:
    """One browser tab: its peer connection, video track, data channel and Generate call."""

    def __init__(self, gateway: Gateway, viewer_id: str, pc: RTCPeerConnection, info: pb.ModelInfo,
                 request: StreamRequest) -> None:
        self.gateway = gateway
        self.id = viewer_id
        self.pc = pc
        self.info = info
        self.request = request
        self.track = GeneratedVideoTrack(info.fps, max_buffered_frames=2 * max(1, info.frames_per_chunk))
        self.created_s = time.monotonic()
        self.session_id: str | None = None
        self.end_reason: str | None = None
        self.closed = False
        self._channel: RTCDataChannel | None = None
        self._outbox: list[str] = []
        self._call: LiveCall | None = None
        self._started = False
        self._last_timing: pb.ChunkTiming | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                self.start()
            elif state in ("failed", "closed"):
                await self.close(f"peer connection {state}")

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            self.attach(channel)

        self.spawn(self._close_unless_connected())

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            event(log, "viewer_failed", logging.ERROR, viewer=self.id, error=f"{type(exc).__name__}: {exc}")
            self.send("error", message=f"gateway error: {type(exc).__name__}: {exc}", fatal=True)
            self.spawn(self.close("gateway error"))

    # ------------------------------------------------------------------ data channel
    def attach(self, channel: RTCDataChannel) -> None:
        self._channel = channel

        @channel.on("open")
        def on_open() -> None:
            self._flush()

        @channel.on("message")
        def on_message(data: str | bytes) -> None:
            self.on_message(data)

        @channel.on("close")
        def on_close() -> None:
            self.spawn(self.close("data channel closed"))

        self._flush()

    def send(self, kind: str, **fields: Any) -> None:
        """To the page over the data channel; queued until the channel opens."""
        if self.closed:
            return
        self._outbox.append(to_page(kind, **fields))
        self._flush()

    def _flush(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        while self._outbox:
            channel.send(self._outbox.pop(0))

    def on_message(self, data: str | bytes) -> None:
        try:
            message = parse_message(data, self.info.max_prompt_chars or None)
        except MessageError as exc:
            event(log, "bad_message", logging.WARNING, viewer=self.id, error=str(exc))
            self.send("error", message=str(exc), fatal=False)
            return
        if message.type == "prompt":
            self.spawn(self._update_prompt(message.prompt))
        else:
            self.spawn(self._stop())

    async def _update_prompt(self, prompt: str) -> None:
        if self._call is None or not await self._call.update_prompt(prompt):
            self.send("error", message="no stream is running: the prompt was not sent", fatal=False)
            return
        event(log, "prompt_sent", viewer=self.id, session=self.session_id, prompt_chars=len(prompt))
        self.send("prompt_sent", prompt=prompt)

    async def _stop(self) -> None:
        event(log, "stop_requested", viewer=self.id, session=self.session_id)
        if self._call is None or not await self._call.stop():
            await self.close("stopped before the stream started")

    # ------------------------------------------------------------------ the stream
    def start(self) -> None:
        """Open the Generate call (once the peer connection is up: no server pages for a viewer that
        never connects) and the stats loop."""
        if self._started or self.closed:
            return
        self._started = True
        self.spawn(self._run_stream())
        self.spawn(self._send_stats())

    async def _run_stream(self) -> None:
        call = self._call = self.gateway.upstream.open(self.request)
        try:
            async with contextlib.aclosing(call.events()) as events:  # aclosing: cancel the call on any exit
                async for item in events:
                    if isinstance(item, DecodedChunk):
                        self._last_timing = item.chunk.timing
                        await self.track.put(item.frames)
                    elif isinstance(item, pb.StreamStarted):
                        self._on_started(item)
                    else:
                        self._on_ended(item)
        except StreamError as exc:
            self.end_reason = f"error {exc.code.name}"
            message = self.gateway.describe_error(exc)
            event(log, "stream_failed", logging.WARNING, viewer=self.id, session=self.session_id,
                  code=exc.code.name, error=exc.message)
            self.send("error", message=message, fatal=True)
        self.track.finish()
        await asyncio.sleep(self.gateway.config.end_grace_s)  # the page closes first when it can
        await self.close(self.end_reason or "stream over")

    def _on_started(self, started: pb.StreamStarted) -> None:
        self.session_id = started.session_id
        if started.fps and started.fps != self.track.fps and self.track.frames_sent == 0:
            self.track.fps = started.fps
        event(log, "stream_started", viewer=self.id, session=started.session_id, width=started.width,
              height=started.height, fps=started.fps, preset=started.preset)
        self.send("started", session_id=started.session_id, width=started.width, height=started.height,
                  fps=started.fps, preset=started.preset, codec=self.gateway.config.codec)

    def _on_ended(self, ended: pb.StreamEnded) -> None:
        reason = pb.StreamEnded.Reason.Name(ended.reason)
        self.end_reason = reason
        level = logging.INFO if ended.reason in OK_REASONS else logging.WARNING
        event(log, "stream_ended", level, viewer=self.id, session=self.session_id, reason=reason,
              frames=ended.frames_sent, message=ended.message)
        self.send("ended", reason=reason, message=ended.message, frames=ended.frames_sent)

    async def _send_stats(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.gateway.config.stats_interval_s)
            timing = self._last_timing
            chunk_ms = None if timing is None else round(timing.generate_ms + timing.decode_ms + timing.encode_ms, 1)
            self.send("stats", **self.track.stats(), chunk_ms=chunk_ms, buffered_frames=self.track.buffered_frames)

    async def _close_unless_connected(self) -> None:
        await asyncio.sleep(self.gateway.config.connect_timeout_s)
        if not self._started:
            await self.close(f"not connected within {self.gateway.config.connect_timeout_s:g} s")

    # ------------------------------------------------------------------ tear-down
    async def close(self, reason: str) -> None:
        """Cancel the Generate call (frees the server session), close the pc; idempotent."""
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()
        self.gateway.viewers.pop(self.id, None)
        event(log, "viewer_closed", viewer=self.id, session=self.session_id, reason=reason,
              frames=self.track.frames_sent, duration_s=round(time.monotonic() - self.created_s, 3))

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "connection": self.pc.connectionState, "session_id": self.session_id,
                "frames": self.track.frames_sent, "end_reason": self.end_reason}


class Gateway:
    """The aiohttp app and the viewers; ``await start()`` / ``await stop()``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._upstream: Upstream | None = None
        self.viewers: dict[str, Viewer] = {}
        self.live_streams: dict[str, LiveTsStream] = {}
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("gateway not started")
        return self._upstream

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("gateway not started")
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/viewer.js", self.script)
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/status", self.status)
        app.router.add_get("/live.ts", self.live_ts)
        return app

    def num_viewers(self) -> int:
        """Everyone watching, whatever the way in (counted against ``max_viewers``)."""
        return len(self.viewers) + len(self.live_streams)

    async def start(self) -> None:
        cfg = self.config
        # Created here, not in __init__: a grpc.aio channel belongs to the event loop it is made on.
        self._upstream = Upstream(cfg.grpc_target, token=cfg.token, tls=cfg.tls, ca_cert=cfg.ca_cert)
        # handler_cancellation: a /live.ts client that disconnects cancels its handler at once, and
        # with it the Generate call (the server frees the session's pages).
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the bound port (config.port 0 = any free)
        event(log, "serving", url=self.url, grpc=self.config.grpc_target, codec=self.config.codec,
              encoding=self.config.encoding, max_viewers=self.config.max_viewers)

    async def stop(self) -> None:
        for viewer in [*self.viewers.values(), *self.live_streams.values()]:
            await viewer.close("gateway stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        if self._upstream is not None:
            await self._upstream.close()

    # ------------------------------------------------------------------ HTTP
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def script(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "viewer.js", headers={"Cache-Control": "no-store"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"server": self.config.grpc_target,
                                  "viewers": [v.status() for v in [*self.viewers.values(),
                                                                   *self.live_streams.values()]]})

    async def live_ts(self, request: web.Request) -> web.StreamResponse:
        return await handle_live_ts(self, request)

    async def offer(self, request: web.Request) -> web.Response:
        viewer_id = uuid.uuid4().hex[:8]
        try:
            offer = parse_offer(await _read_body(request, MAX_OFFER_BYTES))
        except OfferError as exc:
            return _reject(400, viewer_id, str(exc))
        if self.num_viewers() >= self.config.max_viewers:
            return _reject(503, viewer_id, f"the gateway is full ({self.config.max_viewers} viewers); try later")
        try:
            info = await self.upstream.model_info(timeout_s=self.config.server_timeout_s)
        except StreamError as exc:
            return _reject(502, viewer_id, self.describe_error(exc), code=exc.code.name)
        if offer.prompt is not None and info.max_prompt_chars and len(offer.prompt) > info.max_prompt_chars:
            return _reject(400, viewer_id, f"\"prompt\" has {len(offer.prompt)} characters; "
                                           f"the server's limit is {info.max_prompt_chars}")
        return await self._answer(viewer_id, offer, info)

    async def _answer(self, viewer_id: str, offer: Offer, info: pb.ModelInfo) -> web.Response:
        codec = CODECS[self.config.codec]
        if f" {codec.split('/')[1].lower()}/90000" not in offer.sdp.lower():
            return _reject(400, viewer_id, f"the browser offered no {self.config.codec.upper()} video; "
                                           f"start the gateway with another --codec ({', '.join(CODECS)})")
        # No ICE servers: aiortc's default would be a public STUN server; a gateway serves hosts
        # that reach it directly (loopback, LAN, a published port).
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        request = StreamRequest(prompt=offer.prompt or self.config.prompt, seed=offer.seed, num_frames=0,
                                encoding=self.config.encoding)
        viewer: Viewer | None = None
        try:
            viewer = Viewer(self, viewer_id, pc, info, request)
            # The sending transceiver exists before the offer is applied: aiortc picks the codecs
            # when it applies the offer, so the preference (our codec + its retransmission format)
            # must already be set then. The offer's recvonly video section binds to it.
            transceiver = pc.addTransceiver(viewer.track, direction="sendonly")
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                             if c.mimeType in (codec, "video/rtx")])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError / OperationError / others for SDP it cannot use
            if viewer is not None:
                await viewer.close("unusable offer")
            with contextlib.suppress(Exception):
                await pc.close()
            return _reject(400, viewer_id, f"the offer could not be used: {type(exc).__name__}: {exc}")
        self.viewers[viewer_id] = viewer
        event(log, "viewer_connecting", viewer=viewer_id, viewers=len(self.viewers), seed=offer.seed,
              prompt_chars=len(request.prompt))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "viewer": viewer_id})

    def describe_error(self, exc: StreamError) -> str:
        """A message for the page and the log: what failed and what to do about it."""
        target = self.config.grpc_target
        if exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return (f"the streamgen server at {target} is unreachable: is `streamgen serve` running there? "
                    f"({exc.code.name}: {exc.message})")
        if exc.code.name == "UNAUTHENTICATED":
            return f"the streamgen server at {target} refused the gateway's token ({exc.message}); see --token"
        return f"the streamgen server at {target} answered {exc.code.name}: {exc.message}"


async def _read_body(request: web.Request, limit_bytes: int) -> bytes:
    # Read here rather than through aiohttp's client_max_size, whose refusal is a plain-text 413.
    body = bytearray()
    async for data in request.content.iter_chunked(16 * 1024):
        body += data
        if len(body) > limit_bytes:
            raise OfferError(f"the offer is over {limit_bytes} bytes")
    return bytes(body)


def _reject(status: int, viewer_id: str, message: str, **fields: Any) -> web.Response:
    event(log, "offer_rejected", logging.WARNING, viewer=viewer_id, status=status, error=message, **fields)
    return web.json_response({"error": message, **fields}, status=status)
