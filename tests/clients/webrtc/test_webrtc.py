"""The WebRTC gateway without a browser: offer and message checks, a Python WebRTC viewer (aiortc)
against the gateway and an in-process server on 127.0.0.1, tear-down, server down, the command line.
The page itself, in headless Chromium, is in test_webrtc_browser.py."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from clients.webrtc.__main__ import main
from clients.webrtc.protocol import MessageError, OfferError, parse_message, parse_offer
from clients.webrtc.track import VIDEO_CLOCK_HZ, VIDEO_TIME_BASE, GeneratedVideoTrack
from tests.clients.webrtc.harness import (
    FPS,
    GatewayHarness,
    PromptSpy,
    PyViewer,
    paced_server,
    wait_idle,
)
from tests.server.harness import ServerHarness

REPO = Path(__file__).resolve().parents[3]
DOWN = "127.0.0.1:1"  # nothing listens there: connections are refused at once
# A minimal offer as a browser sends it (recvonly video + a data channel), made once by aiortc.
_OFFER: dict[str, str] = {}


def browser_like_offer() -> dict[str, str]:
    if not _OFFER:
        async def make() -> dict[str, str]:
            viewer = PyViewer()
            try:
                return await viewer.offer()
            finally:
                await viewer.close()

        _OFFER.update(asyncio.run(make()))
    return dict(_OFFER)


# ---------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("body,message", [
    (b"", "not JSON"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"type": "offer"}', "\"sdp\" must be a non-empty string"),
    (b'{"sdp": 5, "type": "offer"}', "\"sdp\" must be a non-empty string"),
    (b'{"sdp": "v=0", "type": "answer"}', "\"type\" must be \"offer\""),
    (b'{"sdp": "hello", "type": "offer"}', "must start with \"v=0\""),
    (b'{"sdp": "v=0\\r\\nm=audio 9 UDP/TLS/RTP/SAVPF 111\\r\\n", "type": "offer"}', "no video section"),
    (b'{"sdp": "v=0\\r\\nm=video 9 UDP/TLS/RTP/SAVPF 96\\r\\na=sendonly\\r\\n", "type": "offer"}',
     "must be recvonly or sendrecv"),
    (b'{"sdp": "v=0\\r\\nm=video 9 X 96\\r\\n", "type": "offer", "prompt": ""}', "\"prompt\" must be a non-empty"),
    (b'{"sdp": "v=0\\r\\nm=video 9 X 96\\r\\n", "type": "offer", "seed": -1}', "\"seed\" must be an integer"),
    (b'{"sdp": "v=0\\r\\nm=video 9 X 96\\r\\n", "type": "offer", "seed": true}', "\"seed\" must be an integer"),
    (b'{"sdp": "v=0\\r\\nm=video 9 X 96\\r\\n", "type": "offer", "promt": "x"}', "unknown field(s) 'promt'"),
    (b"{" + b" " * 70_000 + b"}", "the limit is 65536"),
])
def test_parse_offer_refuses_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(OfferError) as refused:
        parse_offer(body)
    assert message in str(refused.value)


def test_parse_offer_accepts_a_browser_offer() -> None:
    offer = parse_offer(json.dumps({**browser_like_offer(), "prompt": "a red mug", "seed": 7}).encode())
    assert offer.prompt == "a red mug" and offer.seed == 7 and offer.sdp.startswith("v=0")
    assert parse_offer(json.dumps(browser_like_offer()).encode()).prompt is None
    with pytest.raises(OfferError, match="the server's limit is 5"):
        parse_offer(json.dumps({**browser_like_offer(), "prompt": "a red mug"}).encode(), max_prompt_chars=5)


@pytest.mark.parametrize("data,message", [
    ('{"type": "dance"}', "unknown message type 'dance'; valid: prompt, stop"),
    ('{"prompt": "a mug"}', "unknown message type None"),
    ("stop", "not JSON"),
    ('["stop"]', "expected a JSON object"),
    (b"\x00\x01", "binary messages are not understood"),
    ('{"type": "prompt"}', "\"prompt\" must be a non-empty string"),
    ('{"type": "prompt", "prompt": "   "}', "\"prompt\" must be a non-empty string"),
    ('{"type": "prompt", "prompt": "abcdefghijk"}', "the server's limit is 10"),
    ("x" * 20_000, "the limit is 16384"),
])
def test_parse_message_refuses_what_it_does_not_understand(data: str | bytes, message: str) -> None:
    with pytest.raises(MessageError) as refused:
        parse_message(data, max_prompt_chars=10)
    assert message in str(refused.value)


def test_parse_message_accepts_prompt_and_stop() -> None:
    assert parse_message('{"type": "prompt", "prompt": "a blue mug"}').prompt == "a blue mug"
    assert parse_message('{"type": "stop"}').type == "stop"


# ---------------------------------------------------------------------------------------- track


def test_track_paces_frames_on_the_fps_clock_and_shifts_pts_after_a_stall() -> None:
    fps = 50

    async def scenario() -> tuple[list[int], list[float], list[tuple[int, int, int]]]:
        track = GeneratedVideoTrack(fps, max_buffered_frames=8)
        frames = np.arange(12 * 4 * 4 * 3, dtype=np.uint8).reshape(12, 4, 4, 3)
        producer = asyncio.create_task(track.put(frames[:10]))  # 10 frames, more than the buffer holds
        pts, sent, shapes = [], [], []
        for i in range(12):
            if i == 10:
                await producer
                await asyncio.sleep(0.2)       # the generator stalls for 10 frame intervals
                await track.put(frames[10:])
            frame = await track.recv()
            assert frame.time_base == VIDEO_TIME_BASE
            pts.append(frame.pts)
            sent.append(time.monotonic())
            shapes.append((frame.width, frame.height, int(frame.to_ndarray(format="rgb24")[0, 0, 0])))
        track.finish()
        with pytest.raises(MediaStreamError):
            await track.recv()                 # the end
        return pts, sent, shapes

    pts, sent, shapes = asyncio.run(scenario())
    step = VIDEO_CLOCK_HZ // fps
    assert pts[:10] == [i * step for i in range(10)]           # exact spacing while on time
    assert np.diff(sent[:10]).mean() == pytest.approx(1 / fps, abs=0.004)  # paced, not a burst
    stall_ticks = pts[10] - pts[9]                               # the stall shows up in pts ...
    assert 0.2 * VIDEO_CLOCK_HZ <= stall_ticks <= 0.3 * VIDEO_CLOCK_HZ
    assert pts[11] - pts[10] == step                             # ... and spacing resumes after it
    assert [s[:2] for s in shapes] == [(4, 4)] * 12
    assert [s[2] for s in shapes] == [(i * 48) % 256 for i in range(12)]  # in order, none lost


def test_track_skips_to_the_live_edge_when_chunks_arrive_ahead_of_its_clock() -> None:
    fps, chunk = 50, 10

    async def scenario() -> tuple[GeneratedVideoTrack, list[float]]:
        track = GeneratedVideoTrack(fps, max_buffered_frames=100, max_lag_s=0.05)
        frames = np.zeros((chunk, 4, 4, 3), dtype=np.uint8)
        # A paced server's start: three chunks in a burst (each 0.2 s of video, 20 ms apart), then one
        # chunk every 0.2 s. Playing every frame on the track's clock would leave it ~0.4 s behind.
        for _ in range(3):
            await track.put(frames)
            await asyncio.sleep(0.02)
        lags = []
        for i in range(6 * chunk):
            if i and i % chunk == 0:
                await track.put(frames)
            await track.recv()
            lags.append(track.stats()["pacing_ms"])
        return track, lags

    track, lags = asyncio.run(scenario())
    assert 15 <= track.frames_skipped <= 25                 # the burst's lead, skipped once
    assert track.stats()["pacing_ms"] <= 50 + 10            # then at the live edge
    assert track.frames_sent == 6 * chunk


# ---------------------------------------------------------------------------------------- gateway


def test_malformed_offers_get_400_with_a_json_message_and_the_gateway_keeps_serving(
        gateway: GatewayHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clients.webrtc")
    garbage_sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\na=recvonly\r\nnot sdp\r\n"
    cases = [b"{not json", b"[]", json.dumps({"sdp": "v=0", "type": "answer"}).encode(),
             json.dumps({"sdp": garbage_sdp, "type": "offer"}).encode(), b"{" + b" " * 100_000 + b"}"]
    for body in cases:
        status, answer = gateway.post_offer(body)
        assert status == 400, answer
        assert isinstance(answer["error"], str) and answer["error"]
    assert "the offer could not be used" in gateway.post_offer(cases[3])[1]["error"]
    rejected = [r for r in caplog.records if r.getMessage() == "offer_rejected"]
    assert len(rejected) >= len(cases)
    assert gateway.num_viewers() == 0

    async def still_serving() -> None:
        viewer = PyViewer()
        await viewer.connect(gateway)
        await viewer.next_message("started")
        await viewer.close()

    asyncio.run(still_serving())


def test_viewer_gets_paced_video_changes_prompt_and_survives_bad_messages(
        server: ServerHarness, gateway: GatewayHarness, spy: PromptSpy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clients.webrtc")

    async def scenario() -> None:
        viewer, other = PyViewer(), PyViewer()
        answer = await viewer.connect(gateway, prompt="a glossy red bottle", seed=3)
        assert "VP8/90000" in answer["sdp"] and answer["viewer"]
        candidates = [line for line in answer["sdp"].splitlines() if line.startswith("a=candidate:")]
        assert candidates and all(" 127.0.0.1 " in line for line in candidates)  # media stays on loopback
        await other.connect(gateway)
        started = await viewer.next_message("started")
        assert (started["width"], started["height"], started["fps"], started["codec"]) == (32, 32, FPS, "vp8")
        assert spy.wait_for("starts", "a glossy red bottle") == started["session_id"]
        await asyncio.wait_for(viewer.got_track.wait(), 10)

        # Video: 32x32 frames in the 90 kHz clock, one frame interval apart, paced (not a burst).
        frames = [await asyncio.wait_for(viewer.track.recv(), 10) for _ in range(2 * FPS)]
        steps = np.diff([f.pts for f in frames])
        assert frames[0].width == 32 and frames[0].height == 32 and frames[0].time_base == VIDEO_TIME_BASE
        assert (steps >= VIDEO_CLOCK_HZ // FPS - 1).all() and np.median(steps) == VIDEO_CLOCK_HZ // FPS

        # Bad messages: an error back on the channel, and the stream (and the other viewer) go on.
        for bad, error in [('{"type": "dance"}', "unknown message type 'dance'"), ("stop please", "not JSON"),
                           (json.dumps({"type": "prompt", "prompt": "x" * 600}), "the server's limit is 500")]:
            viewer.send(bad)
            reply = await viewer.next_message("error")
            assert error in reply["message"] and reply["fatal"] is False
        await asyncio.wait_for(viewer.track.recv(), 5)
        await asyncio.wait_for(other.got_track.wait(), 10)
        await asyncio.wait_for(other.track.recv(), 5)

        # A prompt change travels to the engine's session.
        viewer.send({"type": "prompt", "prompt": "a matte blue mug"})
        assert (await viewer.next_message("prompt_sent"))["prompt"] == "a matte blue mug"
        assert await asyncio.to_thread(spy.wait_for, "updates", "a matte blue mug") == started["session_id"]
        stats = await viewer.next_message("stats")
        assert stats["frames"] > 0 and stats["fps"] > 0 and stats["ttff_ms"] > 0

        # Closing the peer connection cancels the stream: the server frees the session.
        await viewer.close()
        await other.close()

    asyncio.run(scenario())
    assert wait_idle(server, gateway) < 3.0
    logged = [r.getMessage() for r in caplog.records]
    assert logged.count("bad_message") == 3


def test_stop_message_ends_the_stream_and_every_frame_count_agrees(
        server: ServerHarness, gateway: GatewayHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clients.webrtc")

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        viewer = PyViewer()
        answer = await viewer.connect(gateway)
        await viewer.next_message("started")
        await asyncio.wait_for(viewer.got_track.wait(), 10)
        for _ in range(FPS):
            await asyncio.wait_for(viewer.track.recv(), 10)
        statuses = [await asyncio.to_thread(gateway.status)]
        viewer.send({"type": "stop"})
        messages = []
        while (message := await viewer.next_message_any()) and message["type"] != "ended":
            messages.append(message)
        statuses.append(await asyncio.to_thread(gateway.status))
        await viewer.close()
        return message | {"viewer": answer["viewer"]}, messages, statuses

    ended, before, statuses = asyncio.run(scenario())
    assert ended["reason"] == "REASON_STOPPED"
    wait_idle(server, gateway)
    # One count: frames handed to the viewer's encoder. The last stats message, the "ended" message,
    # /status at that moment and the gateway's viewer_closed log line all say the same number.
    last_stats = [m for m in before if m["type"] == "stats"][-1]
    closed = [fields for r in caplog.records if r.getMessage() == "viewer_closed"
              and (fields := r.streamgen_fields)["viewer"] == ended["viewer"]]
    assert ended["frames"] >= FPS and ended["generated"] >= ended["frames"]
    assert last_stats["frames"] == ended["frames"]
    assert [v["frames"] for v in statuses[-1]["viewers"] if v["id"] == ended["viewer"]] in ([], [ended["frames"]])
    assert [v["frames"] for v in statuses[0]["viewers"] if v["id"] == ended["viewer"]][0] <= ended["frames"]
    assert [fields["frames"] for fields in closed] == [ended["frames"]]


def test_h264_is_negotiated_on_request_and_a_missing_codec_is_a_400(server: ServerHarness) -> None:
    gateway = GatewayHarness(server.address, codec="h264")
    try:
        async def scenario() -> tuple[str, tuple[int, int]]:
            viewer = PyViewer()
            answer = await viewer.connect(gateway)
            await viewer.next_message("started")
            await asyncio.wait_for(viewer.got_track.wait(), 10)
            frame = await asyncio.wait_for(viewer.track.recv(), 10)
            await viewer.close()
            return answer["sdp"], (frame.width, frame.height)

        sdp, size = asyncio.run(scenario())
        codecs = {line.split()[1].split("/")[0] for line in sdp.splitlines() if line.startswith("a=rtpmap:")}
        assert codecs == {"H264", "rtx"} and size == (32, 32)
        vp8_only = re.sub(r"a=rtpmap:\d+ H264/90000", "a=rtpmap:120 XYZ/90000", browser_like_offer()["sdp"])
        status, answer = gateway.post_offer({"sdp": vp8_only, "type": "offer"})
        assert status == 400 and answer["error"].startswith("the browser offered no H264 video")
        wait_idle(server, gateway)
    finally:
        gateway.close()


def test_a_viewer_that_never_connects_is_dropped_and_its_server_session_freed(server: ServerHarness) -> None:
    gateway = GatewayHarness(server.address, connect_timeout_s=0.3)
    try:
        status, answer = gateway.post_offer(browser_like_offer())  # answered, but nobody completes ICE
        assert status == 200 and gateway.num_viewers() == 1
        deadline = time.monotonic() + 5
        while gateway.num_viewers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gateway.num_viewers() == 0
        # Its Generate call was opened with the answer (so that a busy server is the offer's error)
        # and is cancelled with the viewer.
        server.wait_metric("streamgen:num_streams_active", lambda v: v == 0, timeout_s=2.0)
        server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=2.0)
    finally:
        gateway.close()


def test_server_down_gives_502_with_a_clear_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="clients.webrtc")
    gateway = GatewayHarness(DOWN)
    try:
        status, answer = gateway.post_offer(browser_like_offer())
        assert status == 502
        assert answer["code"] == "UNAVAILABLE"
        assert answer["error"].startswith(f"the streamgen server at {DOWN} is unreachable: "
                                          f"is `streamgen serve` running there? (UNAVAILABLE: ")
        assert gateway.num_viewers() == 0
        with urllib.request.urlopen(gateway.url + "/", timeout=10) as page:  # still serving
            assert b"streamgen live" in page.read()
    finally:
        gateway.close()
    assert any(r.getMessage() == "offer_rejected" and r.levelno == logging.WARNING for r in caplog.records)


def test_server_going_away_mid_stream_reaches_the_viewer() -> None:
    server = paced_server()
    gateway = GatewayHarness(server.address)
    try:
        async def scenario() -> dict[str, object]:
            viewer = PyViewer()
            await viewer.connect(gateway)
            await viewer.next_message("started")
            await asyncio.to_thread(server.close)
            async with asyncio.timeout(10):
                while (message := await viewer.messages.get())["type"] not in ("ended", "error"):
                    pass
            await viewer.close()
            return message

        message = asyncio.run(scenario())
        # Either the drain's StreamEnded or the cut call's status, told to the page either way.
        if message["type"] == "ended":
            assert message["reason"] == "REASON_SERVER_SHUTDOWN"
        else:
            assert message["fatal"] is True and "the streamgen server at" in str(message["message"])
        deadline = time.monotonic() + 5
        while gateway.num_viewers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gateway.num_viewers() == 0
    finally:
        gateway.close()


# ---------------------------------------------------------------------------------------- command line


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--grpc", "--port", "--host", "--codec", "--encoding", "--prompt", "--max-viewers", "--token",
                   "/?obs=1&prompt=", "POST /offer", "OBS"):
        assert option in text
    assert main(["--grpc", "no-port-here"]) == 2
    assert "grpc_target must be HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--grpc", DOWN, "--codec", "av1"])
    assert exited.value.code == 2


def test_command_serves_the_page_reports_a_down_server_and_exits_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "clients.webrtc", "--grpc", DOWN, "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"event=serving url=(http://127\.0\.0\.1:\d+)", line)
        assert match, line
        url = match.group(1)
        with urllib.request.urlopen(url + "/?obs=1&prompt=a%20red%20mug", timeout=10) as page:
            assert b'<video id="video"' in page.read()
        with urllib.request.urlopen(url + "/viewer.js", timeout=10) as script:
            assert b"/offer" in script.read()
        req = urllib.request.Request(url + "/offer", data=json.dumps(browser_like_offer()).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 502 and "is unreachable" in json.loads(refused.value.read())["error"]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "event=offer_rejected" in stderr and "is unreachable" in stderr


def test_command_exits_1_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "clients.webrtc", "--grpc", DOWN, "--port", str(port)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"error: cannot serve on 127.0.0.1:{port}" in res.stderr and "address already in use" in res.stderr
