"""Test harness for the WebRTC gateway: the gateway on a background event loop (like the server's
harness), a Python WebRTC viewer (aiortc) that behaves like the page, and a spy on prompt updates.

Everything listens on 127.0.0.1 and WebRTC media flows over 127.0.0.1 only (:func:`loopback_ice`);
the gateway offers no STUN server. Needs the ``webrtc`` extra (``make venv`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aioice.ice
import pytest
import torch
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from clients.webrtc.gateway import Gateway, GatewayConfig
from streamgen.engine.engine import Engine
from streamgen.engine.request import GenerationRequest
from tests.server.harness import ServerHarness, make_engine

T = TypeVar("T")
FPS = 16  # the test preset's


@contextlib.contextmanager
def loopback_ice() -> Iterator[None]:
    """Make aiortc offer 127.0.0.1 as its only ICE candidate, in this process (gateway and Python
    viewers alike). aioice gathers every interface *but* loopback; in tests we want the opposite:
    no packet to any other address, and tests that work in a network namespace with only ``lo``.
    Chromium joins in with ``--allow-loopback-in-peer-connection``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
        yield


def paced_server() -> ServerHarness:
    """The test preset served like `streamgen serve`: paced (at most 0.5 s ahead of playback), and
    unbounded streams may last a minute, far longer than any test keeps one open.

    The random weights are perturbed further than :func:`make_engine` does, so the video has visible
    texture and motion (consecutive seconds differ by ~20 levels per pixel instead of ~1.5): a
    screenshot comparison then tests playback, not codec noise."""
    engine = make_engine(max_lead_s=0.5, unbounded_max_frames=60 * FPS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, scale in ((engine.model, 0.2), (engine.vae, 0.1)):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return ServerHarness(engine)


class GatewayHarness:
    """A :class:`Gateway` on port 0 of 127.0.0.1, on its own event loop thread; ``close()`` stops it."""

    def __init__(self, grpc_target: str, **config: Any) -> None:
        defaults: dict[str, Any] = {"port": 0, "connect_timeout_s": 10.0, "end_grace_s": 0.5,
                                    "stats_interval_s": 0.25}
        defaults.update(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-gateway-loop", daemon=True)
        self._thread.start()
        self.gateway = Gateway(GatewayConfig(grpc_target=grpc_target, **defaults))
        self.run(self.gateway.start())

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def url(self) -> str:
        return self.gateway.url

    def post_offer(self, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /offer; returns (HTTP status, JSON body) for successes and errors alike."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/offer", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def num_viewers(self) -> int:
        return self.run(_count(self.gateway))

    def status(self) -> dict[str, Any]:
        """GET /status."""
        with urllib.request.urlopen(self.url + "/status", timeout=10) as res:
            return json.loads(res.read())

    def close(self) -> None:
        try:
            self.run(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


async def _count(gateway: Gateway) -> int:
    return gateway.num_viewers()


class PromptSpy:
    """Records the prompts that reach the engine, on the engine's thread: ``starts`` (new sessions) and
    ``updates`` (prompt changes), each as ``(session_id, prompt)``."""

    def __init__(self, engine: Engine) -> None:
        self.starts: list[tuple[str, str]] = []
        self.updates: list[tuple[str, str]] = []
        add_request, update_prompt = engine.add_request, engine.update_prompt

        def spy_add_request(request: GenerationRequest, session_id: str | None = None, **kw: Any) -> str:
            sid = add_request(request, session_id, **kw)
            self.starts.append((sid, request.prompt))
            return sid

        def spy_update_prompt(session_id: str, prompt: str) -> None:
            update_prompt(session_id, prompt)
            self.updates.append((session_id, prompt))

        engine.add_request = spy_add_request  # type: ignore[method-assign]
        engine.update_prompt = spy_update_prompt  # type: ignore[method-assign]

    def wait_for(self, kind: str, prompt: str, timeout_s: float = 10.0) -> str:
        """Poll until ``prompt`` is in ``starts`` or ``updates``; returns its session id."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for sid, seen in list(getattr(self, kind)):
                if seen == prompt:
                    return sid
            time.sleep(0.02)
        raise AssertionError(f"{prompt!r} not in {kind} after {timeout_s} s: {getattr(self, kind)}")


class PyViewer:
    """What the page does, in Python: recvonly video + a "control" data channel, offer over HTTP."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("control")
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.track: Any = None
        self.got_track = asyncio.Event()
        self.channel.on("message", lambda data: self.messages.put_nowait(json.loads(data)))

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self.track = track
            self.got_track.set()

    async def offer(self) -> dict[str, Any]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"sdp": self.pc.localDescription.sdp, "type": "offer"}

    async def connect(self, harness: GatewayHarness, **extra: Any) -> dict[str, Any]:
        body = {**await self.offer(), **extra}
        status, answer = await asyncio.to_thread(harness.post_offer, body)
        assert status == 200, answer
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return answer

    async def next_message(self, kind: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """The next message of type ``kind`` (earlier messages of other types are dropped)."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.messages.get()
                if message["type"] == kind:
                    return message

    async def next_message_any(self, timeout_s: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            return await self.messages.get()

    def send(self, message: dict[str, Any] | str) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def close(self) -> None:
        await self.pc.close()


def wait_idle(server: ServerHarness, gateway: GatewayHarness, timeout_s: float = 5.0) -> float:
    """Seconds until the server holds no session and no KV memory, and the gateway no viewer."""
    start = time.monotonic()
    server.wait_metric("streamgen:num_sessions_running", lambda v: v == 0, timeout_s=timeout_s)
    server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=timeout_s)
    while gateway.num_viewers():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"the gateway still holds {gateway.num_viewers()} viewer(s) after {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start
