"""``GET /live.ts``: H.264 in MPEG-TS at the stream's frame rate, read by PyAV (ffmpeg's demuxer, as
OBS's Media Source, ffplay and VLC use); closing the connection frees the server session's KV pages;
bad queries, a server that is down and a full gateway or server are HTTP errors with readable bodies."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request

import av
import numpy as np
import pytest

from clients.webrtc.live_ts import QueryError, parse_query
from tests.clients.webrtc.harness import FPS, GatewayHarness, wait_idle
from tests.server.harness import ServerHarness

DOWN = "127.0.0.1:1"


def get_error(url: str, timeout_s: float = 20.0) -> tuple[int, str, float]:
    """GET ``url`` expecting an HTTP error: (status, body, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=timeout_s)
    return refused.value.code, refused.value.read().decode(), time.monotonic() - start


@pytest.mark.parametrize("query,message", [
    ({"prompt": ""}, "\"prompt\" must be a non-empty string"),
    ({"prompt": "   "}, "\"prompt\" must be a non-empty string"),
    ({"seed": "x"}, "\"seed\" must be an integer"),
    ({"seed": "-1"}, "\"seed\" must be an integer"),
    ({"seed": str(2**64)}, "\"seed\" must be an integer"),
    ({"fps": "fast"}, "\"fps\" must be an integer in [1, 240]"),
    ({"fps": "241"}, "\"fps\" must be an integer in [1, 240]"),
    ({"promt": "a mug"}, "unknown parameter(s) 'promt'; valid: prompt, seed, fps"),
    ({"prompt": "abcdefghijk"}, "the server's limit is 10"),
])
def test_parse_query_refuses_bad_parameters(query: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError) as refused:
        parse_query(query, max_prompt_chars=10)
    assert message in str(refused.value)


def test_parse_query_defaults() -> None:
    assert parse_query({}).prompt is None and parse_query({}).seed == 0 and parse_query({}).fps == 0
    assert parse_query({"prompt": "a red mug", "seed": "7"}) == parse_query({"seed": "7", "prompt": "a red mug"})


@pytest.mark.parametrize("fps", [FPS, 12])
def test_live_ts_is_h264_in_mpegts_at_the_requested_fps_and_closing_it_frees_the_kv_pages(
        server: ServerHarness, gateway: GatewayHarness, fps: int) -> None:
    query = {"prompt": "a glossy red bottle", "seed": 3, **({"fps": fps} if fps != FPS else {})}
    url = gateway.url + "/live.ts?" + urllib.parse.urlencode(query)
    container = av.open(url, timeout=20)
    try:
        stream = container.streams.video[0]
        assert container.format.name == "mpegts"
        assert stream.codec_context.name == "h264"
        assert (stream.codec_context.width, stream.codec_context.height) == (32, 32)
        assert stream.average_rate == fps
        frames, pts = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24").astype(np.int16))
            pts.append(frame.time)
            if len(frames) == 2 * fps:
                break
        assert len(frames) == 2 * fps
        assert np.diff(pts) == pytest.approx(1 / fps, abs=1e-3)          # evenly spaced at the asked rate
        assert frames[0].mean() > 10                                   # not black
        assert np.abs(frames[0] - frames[-1]).mean() > 1.0              # moving
        assert server.metric("streamgen:num_sessions_running") == 1
        assert gateway.num_viewers() == 1
    finally:
        closed = time.monotonic()
        container.close()
    server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)
    assert time.monotonic() - closed <= 1.0
    assert server.metric("streamgen:num_sessions_running") == 0
    wait_idle(server, gateway)


def test_bad_query_and_a_full_gateway_are_http_errors_with_a_readable_body(
        server: ServerHarness) -> None:
    gateway = GatewayHarness(server.address, max_viewers=1)
    try:
        status, body, _ = get_error(gateway.url + "/live.ts?seed=banana")
        assert status == 400 and "\"seed\" must be an integer" in body
        status, body, _ = get_error(gateway.url + "/live.ts?prompt=" + "x" * 600)
        assert status == 400 and "the server's limit is 500" in body
        first = http.client.HTTPConnection("127.0.0.1", gateway.gateway.port, timeout=20)
        try:
            first.request("GET", "/live.ts?prompt=a%20mug")
            response = first.getresponse()
            assert response.status == 200 and response.getheader("Content-Type") == "video/mp2t"
            assert response.read(188)[0] == 0x47                     # an MPEG-TS sync byte
            status, body, _ = get_error(gateway.url + "/live.ts")
            assert status == 503 and "the gateway is full (1 viewers)" in body
        finally:
            first.close()
        wait_idle(server, gateway)
    finally:
        gateway.close()


def test_server_down_is_a_502_at_once() -> None:
    gateway = GatewayHarness(DOWN)
    try:
        status, body, took_s = get_error(gateway.url + "/live.ts?prompt=a%20mug")
        assert status == 502 and f"the streamgen server at {DOWN} is unreachable" in body and took_s < 5
        assert gateway.num_viewers() == 0
    finally:
        gateway.close()


def test_viewers_beyond_the_servers_limit_get_a_503_naming_the_server_refusal(
        one_session_server: ServerHarness) -> None:
    gateway = GatewayHarness(one_session_server.address)
    try:
        first = http.client.HTTPConnection("127.0.0.1", gateway.gateway.port, timeout=20)
        try:
            first.request("GET", "/live.ts")
            assert first.getresponse().status == 200
            status, body, took_s = get_error(gateway.url + "/live.ts")
            assert status == 503 and "RESOURCE_EXHAUSTED" in body and took_s < 10
        finally:
            first.close()
        wait_idle(one_session_server, gateway)
    finally:
        gateway.close()
