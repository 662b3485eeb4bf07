"""The WebRTC gateway: the page, ``POST /offer``, WHEP, ``/live.ts``; one ``Generate`` call per viewer.

Ways in::

    GET  /                   the page (viewer.js); /?obs=1&prompt=... is the OBS Browser Source view
    POST /offer              the page's JSON offer -> JSON answer (see :mod:`clients.webrtc.protocol`)
    POST /whep               a WHEP player's SDP offer -> 201 + SDP answer, Location: /whep/<id>
    DELETE /whep/<id>        ... ends it (see :mod:`clients.webrtc.whep`)
    GET  /live.ts            MPEG-TS over HTTP for OBS's Media Source, ffplay, VLC (:mod:`clients.webrtc.live_ts`)
    GET  /config             what the page needs before it offers: the ICE servers
    GET  /status             JSON: the server address and the viewers

Each offer is checked (400 + a message), then the viewer limit (503), then the server
(GetModelInfo; 502), then its Generate call is opened and the answer waits for StreamStarted (a
refusal: 503 when the server is busy, else 502); a :class:`~clients.webrtc.viewer.Viewer` then
lives in its own tasks, so one viewer's error never reaches another.

Logs are the server's structured lines (:mod:`streamgen.server.logs`): viewer ids, outcomes,
counts and timings, never prompts. This module never imports the engine or the model.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from clients.stream import ENCODINGS, StreamError, StreamRequest
from clients.webrtc import whep
from clients.webrtc.ice import IceServer
from clients.webrtc.live_ts import LiveTsStream, handle_live_ts
from clients.webrtc.protocol import MAX_OFFER_BYTES, OfferError, Refused, parse_offer
from clients.webrtc.track import DEFAULT_MAX_LAG_S
from clients.webrtc.upstream import Upstream
from clients.webrtc.viewer import Viewer
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
    ice_servers: tuple[IceServer, ...] = ()  # STUN/TURN for both peers; none = host candidates only
    max_lag_ms: float = 1000 * DEFAULT_MAX_LAG_S  # live edge: skip frames that would wait longer
    peer_timeout_s: float = 3.0           # no RTCP from a viewer this long -> it is gone, cancel its stream

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
                     "stats_interval_s", "peer_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.max_lag_ms >= 0:
            raise ValueError(f"max_lag_ms must be >= 0, got {self.max_lag_ms}")

    def rtc_configuration(self) -> RTCConfiguration:
        """The gateway's peer configuration. With no ICE servers configured, none at all: aiortc's
        default would be a public STUN server, and a gateway without them serves hosts that reach it
        directly (loopback, LAN, a published port)."""
        return RTCConfiguration(iceServers=[server.to_aiortc() for server in self.ice_servers])


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
        app.router.add_get("/config", self.page_config)
        app.router.add_get("/status", self.status)
        app.router.add_get("/live.ts", self.live_ts)
        whep.add_routes(app, self)
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

    async def page_config(self, request: web.Request) -> web.Response:
        return web.json_response({"iceServers": [server.to_page() for server in self.config.ice_servers]},
                                 headers={"Cache-Control": "no-store"})

    async def live_ts(self, request: web.Request) -> web.StreamResponse:
        return await handle_live_ts(self, request)

    async def offer(self, request: web.Request) -> web.Response:
        viewer_id = uuid.uuid4().hex[:8]
        try:
            offer = parse_offer(await _read_body(request, MAX_OFFER_BYTES))
            viewer = await self.negotiate(viewer_id, offer.sdp, offer.prompt, offer.seed, kind="webrtc")
        except OfferError as exc:
            return _reject(400, viewer_id, str(exc))
        except Refused as exc:
            return _reject(exc.status, viewer_id, str(exc), **exc.fields)
        return web.json_response({"sdp": viewer.pc.localDescription.sdp, "type": viewer.pc.localDescription.type,
                                  "viewer": viewer_id})

    async def negotiate(self, viewer_id: str, sdp: str, prompt: str | None, seed: int, kind: str) -> Viewer:
        """Check the limits and the server, answer ``sdp`` with a new viewer (its pc's localDescription).
        Raises :class:`Refused` (with the HTTP status) or OfferError (400)."""
        if self.num_viewers() >= self.config.max_viewers:
            raise Refused(503, f"the gateway is full ({self.config.max_viewers} viewers); try later")
        try:
            info = await self.upstream.model_info(timeout_s=self.config.server_timeout_s)
        except StreamError as exc:
            raise Refused(502, self.describe_error(exc), code=exc.code.name) from None
        if prompt is not None and info.max_prompt_chars and len(prompt) > info.max_prompt_chars:
            raise OfferError(f"\"prompt\" has {len(prompt)} characters; the server's limit is {info.max_prompt_chars}")
        codec = CODECS[self.config.codec]
        if f" {codec.split('/')[1].lower()}/90000" not in sdp.lower():
            raise OfferError(f"the browser offered no {self.config.codec.upper()} video; "
                             f"start the gateway with another --codec ({', '.join(CODECS)})")
        pc = RTCPeerConnection(self.config.rtc_configuration())
        request = StreamRequest(prompt=prompt or self.config.prompt, seed=seed, num_frames=0,
                                encoding=self.config.encoding)
        viewer: Viewer | None = None
        try:
            viewer = Viewer(self, viewer_id, pc, info, request, kind=kind)
            # The sending transceiver exists before the offer is applied: aiortc picks the codecs
            # when it applies the offer, so the preference (our codec + its retransmission format)
            # must already be set then. The offer's recvonly video section binds to it.
            transceiver = pc.addTransceiver(viewer.track, direction="sendonly")
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                             if c.mimeType in (codec, "video/rtx")])
            viewer.sender = transceiver.sender
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError / OperationError / others for SDP it cannot use
            if viewer is not None:
                await viewer.close("unusable offer")
            with contextlib.suppress(Exception):
                await pc.close()
            raise OfferError(f"the offer could not be used: {type(exc).__name__}: {exc}") from None
        self.viewers[viewer_id] = viewer
        try:
            await viewer.open_stream(self.config.server_timeout_s)
        except StreamError as exc:
            await viewer.close(f"server refused: {exc.code.name}")
            status = 503 if exc.code.name == "RESOURCE_EXHAUSTED" else 502
            raise Refused(status, self.describe_error(exc), code=exc.code.name) from None
        event(log, "viewer_connecting", viewer=viewer_id, kind=kind, viewers=self.num_viewers(), seed=seed,
              prompt_chars=len(request.prompt))
        return viewer

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
