"""Stream lifecycle: stop, cancel and a killed client free the KV pool within 1 s (read from /metrics);
backpressure pauses a session instead of buffering without bound; SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamgen.api.v1 import pb, pb_grpc
from streamgen.engine.engine import AsyncEngine
from streamgen.engine.request import FinishReason, GenerationRequest
from tests.server.harness import ServeLog, ServerHarness, make_engine, reference_frames, with_config

REPO = Path(__file__).resolve().parents[2]
KV_USED = "streamgen:kv_cache_used_bytes"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    with ServerHarness(make_engine(max_lead_s=0.5, max_frames=960, unbounded_max_frames=960)) as harness:  # paced
        yield harness


def _start(num_frames: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(start=pb.StartRequest(prompt="a turning bottle", num_frames=num_frames,
                                                    encoding=pb.ENCODING_H264_FMP4))


def test_stop_request_ends_with_stopped(server: ServerHarness) -> None:
    sent_stop = threading.Event()

    def requests() -> Iterator[pb.GenerateRequest]:
        yield _start()
        sent_stop.wait(10)
        yield pb.GenerateRequest(stop=pb.StopRequest())

    with grpc.insecure_channel(server.address) as channel:
        responses = []
        for response in pb_grpc.StreamGenStub(channel).Generate(requests(), timeout=30):
            responses.append(response)
            if response.WhichOneof("response") == "chunk":
                sent_stop.set()
    ended = responses[-1].ended
    assert ended.reason == pb.StreamEnded.REASON_STOPPED
    assert ended.frames_sent == sum(r.chunk.frame_count for r in responses if r.WhichOneof("response") == "chunk")
    server.wait_metric(KV_USED, lambda v: v == 0, timeout_s=1.0)


def test_cancel_mid_stream_frees_the_pool_within_1s(server: ServerHarness) -> None:
    cancelled = server.metric("streamgen:request_outcome_total", 'reason="cancelled"')
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.StreamGenStub(channel).Generate(iter([_start()]), timeout=30)
        assert next(call).WhichOneof("response") == "started"
        assert next(call).WhichOneof("response") == "chunk"
        server.wait_metric(KV_USED, lambda v: v > 0, timeout_s=2.0)
        call.cancel()
        took = server.wait_metric(KV_USED, lambda v: v == 0, timeout_s=1.0)
    assert took < 1.0
    server.wait_metric("streamgen:request_outcome_total", lambda v: v == cancelled + 1, timeout_s=2.0,
                       labels='reason="cancelled"')


def test_killed_client_process_frees_the_pool_within_1s(server: ServerHarness) -> None:
    client = subprocess.Popen([sys.executable, "-m", "clients.stream", "--server", server.address, "--prompt",
                               "a red bottle on a table", "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        server.wait_metric("streamgen:num_sessions_running", lambda v: v == 1, timeout_s=30)
        server.wait_metric(KV_USED, lambda v: v > 0, timeout_s=5)
        time.sleep(0.3)  # mid-stream: chunks are flowing
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
    took = server.wait_metric(KV_USED, lambda v: v == 0, timeout_s=1.0)
    assert took < 1.0
    server.wait_metric("streamgen:num_sessions_running", lambda v: v == 0, timeout_s=1.0)


def test_slow_consumer_pauses_its_session_instead_of_buffering() -> None:
    """AsyncEngine backpressure: an unread queue stops growing at the bound; every frame still arrives."""
    engine = make_engine()  # unpaced: only backpressure can hold it back

    async def scenario() -> tuple[int, bool, list[int], FinishReason | None]:
        async_engine = AsyncEngine(engine, max_buffered_chunks=2)
        try:
            sid, queue = await async_engine.start(GenerationRequest("a can", seed=3, num_frames=96))
            await asyncio.sleep(0.5)  # 8 chunks would be done by now without backpressure
            peak = queue.qsize()
            paused = await async_engine.call(lambda: engine.scheduler.get(sid).paused)
            indices, reason = [], None
            while True:
                chunk = await queue.get()
                if chunk.finished:
                    reason = chunk.finish_reason
                    break
                indices.append(chunk.first_frame_index)
                await asyncio.sleep(0.02)  # a slow reader
            return peak, paused, indices, reason
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    peak, paused, indices, reason = asyncio.run(scenario())
    assert paused and peak <= 3  # the bound, plus at most the chunk of a forward already running
    assert indices == [0, 4, *range(12, 96, 12)] and reason is FinishReason.COMPLETED  # the first chunk in two parts


# A client channel without HTTP/2 BDP probing keeps the 64 KiB default receive window, so a reader that
# stops reading blocks the server's writes after a chunk or two instead of after megabytes.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


@pytest.fixture(scope="module")
def impatient() -> Iterator[ServerHarness]:
    """Unpaced, a short stall timeout and a small per-stream buffer: only the reader holds a stream back."""
    with ServerHarness(make_engine(max_frames=960, unbounded_max_frames=960), with_config(stall_timeout_s=1.0),
                       max_buffered_chunks=2) as harness:
        yield harness


def test_slow_reader_gets_every_frame_in_order(impatient: ServerHarness) -> None:
    """Backpressure, never drops: a reader slower than the engine still receives the exact video."""
    start = pb.StartRequest(prompt="a red mug", seed=4, num_frames=96, encoding=pb.ENCODING_RAW_RGB)
    payloads, ended = [], None
    with grpc.insecure_channel(impatient.address, options=SMALL_WINDOW) as channel:
        for response in pb_grpc.StreamGenStub(channel).Generate(iter([pb.GenerateRequest(start=start)]), timeout=60):
            if response.WhichOneof("response") == "chunk":
                payloads.append(response.chunk.payload)
                time.sleep(0.15)  # ~80 frames/s: slower than this unpaced engine, faster than the stall timeout
            ended = response.ended if response.WhichOneof("response") == "ended" else ended
    assert ended is not None and ended.reason == pb.StreamEnded.REASON_COMPLETED and ended.frames_sent == 96
    frames = np.frombuffer(b"".join(payloads), np.uint8).reshape(-1, 32, 32, 3)
    assert np.array_equal(frames, reference_frames("a red mug", 4, 96))


def test_client_that_stops_reading_is_cancelled_and_its_pages_freed(impatient: ServerHarness) -> None:
    """Stall policy: nothing read for stall_timeout_s -> the session ends and its pages are freed at once;
    the client sees RESOURCE_EXHAUSTED with the reason as soon as it reads again."""
    stalled = impatient.metric("streamgen:request_outcome_total", 'reason="stalled"')

    async def scenario() -> tuple[list[str], grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(impatient.address, options=SMALL_WINDOW) as channel:
            call = pb_grpc.StreamGenStub(channel).Generate(timeout=60)
            await call.write(pb.GenerateRequest(start=pb.StartRequest(prompt="a mug", encoding=pb.ENCODING_RAW_RGB)))
            # Read nothing: the server must notice on its own (its writes stop completing).
            await asyncio.to_thread(impatient.wait_metric, "streamgen:request_outcome_total",
                                    lambda v: v == stalled + 1, 10.0, 'reason="stalled"')
            await asyncio.to_thread(impatient.wait_metric, KV_USED, lambda v: v == 0, 1.0)
            assert impatient.metric("streamgen:num_sessions_running") == 0
            kinds = []
            try:
                async for response in call:
                    kinds.append(response.WhichOneof("response"))
            except grpc.aio.AioRpcError as exc:
                return kinds, exc.code(), exc.details() or ""
            return kinds, grpc.StatusCode.OK, ""

    kinds, code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "the client read nothing for 1 s; stream cancelled"
    assert kinds[0] == "started" and "ended" not in kinds  # the chunks already on the wire, then the status


def test_sigterm_drains_running_streams_and_exits_0_without_logging_the_token() -> None:
    drain_timeout_s = 1.0
    token, wrong = "tok-3f9a1c77e2", "guess-51d0b4a8"
    cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--preset", "test", "--random-init", "--text-encoder",
           "hash", "--dtype", "float32", "--port", "0", "--metrics-port", "-1", "--max-lead-s", "0.5",
           "--drain-timeout-s", str(drain_timeout_s), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "STREAMGEN_TOKEN": token})
    log = ServeLog(proc)
    auth = (("authorization", f"Bearer {token}"),)
    try:
        serving = log.wait_serving(timeout_s=60)
        assert serving["auth"] is True
        # A throwaway stream ran before SERVING (--warm-up-chunks, default 2), after the engine was built.
        events = [json.loads(line)["event"] for line in log.lines if line.startswith("{")]
        assert events.index("engine_ready") < events.index("warm_up") < events.index("serving")
        warm = json.loads(next(line for line in log.lines if '"event": "warm_up"' in line))
        assert warm["chunks"] == 2 and warm["seconds"] > 0
        address = str(serving["address"])
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.StreamGenStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {wrong}"),))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            call = stub.Generate(iter([_start()]), metadata=auth, timeout=30)
            assert next(call).WhichOneof("response") == "started"
            first = next(call)
            assert first.WhichOneof("response") == "chunk"
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() - sent < 0.5, "health did not turn NOT_SERVING within 0.5 s of SIGTERM"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(iter([_start(24)]), metadata=auth, timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "draining" in refused.value.details()  # type: ignore[attr-defined]
            rest = list(call)
        ended_s = time.monotonic()
        ended = rest[-1].ended
        assert ended.reason == pb.StreamEnded.REASON_SERVER_SHUTDOWN
        chunks_during_drain = sum(r.chunk.frame_count for r in rest if r.WhichOneof("response") == "chunk")
        assert chunks_during_drain > 0 and ended.frames_sent == first.chunk.frame_count + chunks_during_drain  # ran on
        assert ended_s - sent >= drain_timeout_s * 0.9
        assert proc.wait(timeout=drain_timeout_s + 10) == 0
        assert time.monotonic() - sent < drain_timeout_s + 5
        log.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in log.lines]  # structured: every line is one JSON object
    assert [e["event"] for e in events if e["event"] in ("serving", "draining", "stream_end", "stopped")] == \
        ["serving", "draining", "stream_end", "stream_end", "stopped"]
    assert sorted(e["outcome"] for e in events if e["event"] == "stream_end") == ["shutdown", "unavailable"]
    log_text = "".join(log.lines)
    assert token not in log_text and wrong not in log_text
