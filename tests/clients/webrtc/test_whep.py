"""WHEP (``POST /whep``) with an aiortc player, ``--ice-server`` reaching both peers' configurations,
and a viewer process that is killed (no goodbye) having its stream cancelled within 5 s."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

import clients.webrtc.gateway as gateway_module
from clients.webrtc.__main__ import build_parser, config_from
from clients.webrtc.ice import IceServer, ice_servers_from
from tests.clients.webrtc.harness import FPS, GatewayHarness, wait_idle
from tests.server.harness import ServerHarness

DOWN = "127.0.0.1:1"
TURN_ENV = {"STREAMGEN_TURN_USERNAME": "alice", "STREAMGEN_TURN_CREDENTIAL": "s3cret"}


def http(method: str, url: str, body: bytes = b"", content_type: str = "application/sdp",
         ) -> tuple[int, dict[str, Any], str]:
    """(status, headers as {name: [values]}, text) for successes and HTTP errors alike."""
    req = urllib.request.Request(url, data=body or None, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status, headers, text = res.status, res.headers, res.read().decode()
    except urllib.error.HTTPError as exc:
        status, headers, text = exc.code, exc.headers, exc.read().decode()
    return status, {k: headers.get_all(k) for k in headers}, text


class WhepPlayer:
    """A standard WHEP player in aiortc: recvonly video (and audio, as players offer), no data channel."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.track: Any = None
        self.got_track = asyncio.Event()

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "video":
                self.track = track
                self.got_track.set()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp


def test_whep_player_negotiates_receives_frames_and_delete_ends_the_stream(
        server: ServerHarness, gateway: GatewayHarness) -> None:
    async def scenario() -> tuple[int, dict[str, Any], int, int]:
        player = WhepPlayer()
        sdp = await player.offer()
        status, headers, answer = await asyncio.to_thread(
            http, "POST", gateway.url + "/whep?prompt=a%20white%20sneaker&seed=2", sdp.encode())
        assert status == 201, answer
        await player.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(player.got_track.wait(), 10)
        frames = [await asyncio.wait_for(player.track.recv(), 10) for _ in range(FPS)]
        assert {(f.width, f.height) for f in frames} == {(32, 32)}
        assert server.metric("streamgen:num_sessions_running") == 1
        location = headers["Location"][0]
        deleted, _, _ = await asyncio.to_thread(http, "DELETE", gateway.url + location)
        again, _, text = await asyncio.to_thread(http, "DELETE", gateway.url + location)
        await player.pc.close()
        return status, headers, deleted, again

    status, headers, deleted, again = asyncio.run(scenario())
    assert headers["Content-Type"] == ["application/sdp"] and headers["Location"][0].startswith("/whep/")
    assert "Link" not in headers                      # no --ice-server: nothing to tell the player
    assert deleted == 200 and again == 404
    assert wait_idle(server, gateway) < 2.0


@pytest.mark.parametrize("body,content_type,query,status,message", [
    (b"v=0\r\n", "application/json", "", 415, "Content-Type: application/sdp"),
    (b"hello", "application/sdp", "", 400, "must start with \"v=0\""),
    (b"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "application/sdp", "", 400, "no video section"),
    (b"v=0\r\nm=video 9 X 96\r\na=rtpmap:96 VP8/90000\r\n", "application/sdp", "?seed=x", 400,
     "\"seed\" must be an integer"),
    (b"v=0\r\nm=video 9 X 96\r\na=rtpmap:96 VP8/90000\r\n", "application/sdp", "?fps=3", 400,
     "unknown parameter(s) 'fps'; valid: prompt, seed"),
])
def test_whep_refuses_bad_offers_with_a_readable_body(gateway: GatewayHarness, body: bytes, content_type: str,
                                                      query: str, status: int, message: str) -> None:
    got, _, text = http("POST", gateway.url + "/whep" + query, body, content_type)
    assert got == status and message in text
    assert http("PATCH", gateway.url + "/whep/nope", b"a=candidate", "application/trickle-ice-sdpfrag")[0] == 405
    assert gateway.num_viewers() == 0


async def _offer_sdp() -> str:
    """An SDP offer from a throw-away player, for requests answered before any media flows."""
    player = WhepPlayer()
    try:
        return await player.offer()
    finally:
        await player.pc.close()


def test_whep_on_a_full_gateway_is_a_503(server: ServerHarness) -> None:
    full = GatewayHarness(server.address, max_viewers=1)
    try:
        watching = urllib.request.urlopen(full.url + "/live.ts", timeout=20)  # the one viewer allowed
        try:
            assert watching.read(188)[0] == 0x47
            status, _, text = http("POST", full.url + "/whep", asyncio.run(_offer_sdp()).encode())
            assert status == 503 and "the gateway is full (1 viewers)" in text
        finally:
            watching.close()
        wait_idle(server, full)
    finally:
        full.close()


def test_viewers_beyond_the_servers_limit_get_a_503_on_offer_and_whep(one_session_server: ServerHarness) -> None:
    gateway = GatewayHarness(one_session_server.address)
    try:
        watching = urllib.request.urlopen(gateway.url + "/live.ts", timeout=20)  # the server's one session
        try:
            assert watching.read(188)[0] == 0x47
            sdp = asyncio.run(_offer_sdp())
            status, _, text = http("POST", gateway.url + "/whep", sdp.encode())
            assert status == 503 and "RESOURCE_EXHAUSTED: server busy" in text
            status, _, text = http("POST", gateway.url + "/offer", json.dumps({"sdp": sdp, "type": "offer"}).encode(),
                                   "application/json")
            assert status == 503 and "RESOURCE_EXHAUSTED: server busy" in json.loads(text)["error"]
            assert gateway.num_viewers() == 1
        finally:
            watching.close()
        wait_idle(one_session_server, gateway)
    finally:
        gateway.close()


def test_whep_with_the_server_down_is_a_502() -> None:
    down = GatewayHarness(DOWN)
    try:
        status, _, text = http("POST", down.url + "/whep", asyncio.run(_offer_sdp()).encode())
        assert status == 502 and f"the streamgen server at {DOWN} is unreachable" in text
    finally:
        down.close()


# ---------------------------------------------------------------------------------------- ICE servers


def test_ice_server_urls_and_turn_credentials_are_checked() -> None:
    assert ice_servers_from(["stun:stun.example.org:3478"], {}) == (IceServer("stun:stun.example.org:3478"),)
    with pytest.raises(ValueError, match="needs a username and a credential: set STREAMGEN_TURN_USERNAME"):
        ice_servers_from(["turn:turn.example.org"], {})
    for bad in ("http://example.org", "stun:", "turn://x", "example.org:3478"):
        with pytest.raises(ValueError, match="must look like stun:HOST"):
            ice_servers_from([bad], TURN_ENV)
    assert "s3cret" not in repr(ice_servers_from(["turn:t.example.org"], TURN_ENV))


def test_ice_server_flag_reaches_both_peers(server: ServerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--grpc", server.address, "--port", "0", "--ice-server", "stun:stun.example.org:3478",
            "--ice-server", "turn:turn.example.org:3478?transport=udp"]
    config = config_from(build_parser().parse_args(argv), TURN_ENV)
    expected = [{"urls": "stun:stun.example.org:3478"},
                {"urls": "turn:turn.example.org:3478?transport=udp", "username": "alice", "credential": "s3cret"}]

    # The gateway's peer: the RTCConfiguration each viewer's RTCPeerConnection is built with. (Recorded,
    # then replaced by an empty one: this test has no STUN/TURN server to reach.)
    given: list[RTCConfiguration] = []

    class RecordingPeerConnection(RTCPeerConnection):
        def __init__(self, configuration: RTCConfiguration) -> None:
            given.append(configuration)
            super().__init__(RTCConfiguration(iceServers=[]))

    monkeypatch.setattr(gateway_module, "RTCPeerConnection", RecordingPeerConnection)
    fields = {k: getattr(config, k) for k in ("ice_servers", "max_lag_ms", "peer_timeout_s")}
    gateway = GatewayHarness(server.address, **fields)
    try:
        status, headers, _ = http("POST", gateway.url + "/whep", asyncio.run(_offer_sdp()).encode())
        assert status == 201
        servers = [{"urls": s.urls, **({"username": s.username, "credential": s.credential} if s.username else {})}
                   for s in given[0].iceServers]
        assert servers == expected
        # WHEP players learn them from Link headers (RFC 9725 4.4) ...
        assert headers["Link"] == ['<stun:stun.example.org:3478>; rel="ice-server"',
                                   '<turn:turn.example.org:3478?transport=udp>; rel="ice-server"; username="alice"; '
                                   'credential="s3cret"; credential-type="password"']
        http("DELETE", gateway.url + headers["Location"][0])
        # ... and the page from /config, which viewer.js passes to its RTCPeerConnection.
        with urllib.request.urlopen(gateway.url + "/config", timeout=10) as res:
            assert json.loads(res.read()) == {"iceServers": expected}
        with urllib.request.urlopen(gateway.url + "/viewer.js", timeout=10) as res:
            script = res.read().decode()
        assert 'fetch("/config")' in script and "new RTCPeerConnection({ iceServers" in script
        wait_idle(server, gateway)
    finally:
        gateway.close()


# ---------------------------------------------------------------------------------------- dead peer

# What the page does, in a process of its own (aiortc only: no torch to import), on 127.0.0.1 only.
_KILLED_VIEWER = """
import asyncio, json, sys, urllib.request
import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

async def main():
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("control")
    got = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: got.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    body = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode()
    req = urllib.request.Request(sys.argv[1] + "/offer", data=body, headers={"Content-Type": "application/json"})
    answer = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=30).read()))
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    track = await asyncio.wait_for(got, 20)
    for _ in range(8):
        await asyncio.wait_for(track.recv(), 10)
    print("playing", flush=True)
    while True:
        await track.recv()

asyncio.run(main())
"""


def test_a_killed_viewer_process_has_its_stream_cancelled_within_5_s(
        server: ServerHarness, gateway: GatewayHarness) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_VIEWER, gateway.url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "playing", proc.stderr.read() if proc.stderr else ""
        assert server.metric("streamgen:num_sessions_running") == 1
        proc.send_signal(signal.SIGKILL)                  # no DTLS close, no SCTP abort: the peer just stops
        proc.wait(timeout=10)
        killed_s = time.monotonic()
        server.wait_metric("streamgen:num_sessions_running", lambda v: v == 0, timeout_s=5.0)
        server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)
        assert time.monotonic() - killed_s < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_idle(server, gateway)
