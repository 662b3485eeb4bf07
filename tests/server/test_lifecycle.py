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
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamgen.api.v1 import pb, pb_grpc
from streamgen.engine.engine import AsyncEngine
from streamgen.engine.request import FinishReason, GenerationRequest
from tests.server.harness import ServerHarness, make_engine

REPO = Path(__file__).resolve().parents[2]
KV_USED = "streamgen:kv_cache_used_bytes"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    harness = ServerHarness(make_engine(max_lead_s=0.5, max_frames=960, unbounded_max_frames=960))  # paced
    yield harness
    harness.close()


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
    assert indices == list(range(0, 96, 12)) and reason is FinishReason.COMPLETED


def _read_serving_line(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, object]:
    assert proc.stderr is not None
    found: dict[str, object] = {}

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"event": "serving"' in line:
                found.update(json.loads(line))
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not found:
        proc.kill()
        raise AssertionError(f"server did not report serving within {timeout_s} s")
    return found


def test_sigterm_drains_running_streams_and_exits_0() -> None:
    drain_timeout_s = 1.0
    cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--preset", "test", "--random-init", "--text-encoder",
           "hash", "--dtype", "float32", "--port", "0", "--metrics-port", "-1", "--max-lead-s", "0.5",
           "--drain-timeout-s", str(drain_timeout_s), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "STREAMGEN_TOKEN": ""})
    try:
        address = str(_read_serving_line(proc, timeout_s=60)["address"])
        with grpc.insecure_channel(address) as channel:
            call = pb_grpc.StreamGenStub(channel).Generate(iter([_start()]), timeout=30)
            assert next(call).WhichOneof("response") == "started"
            assert next(call).WhichOneof("response") == "chunk"
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + drain_timeout_s
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never went NOT_SERVING"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.StreamGenStub(channel).Generate(iter([_start(24)]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "draining" in refused.value.details()  # type: ignore[attr-defined]
            rest = list(call)
        ended = rest[-1].ended
        assert ended.reason == pb.StreamEnded.REASON_SERVER_SHUTDOWN
        assert ended.frames_sent == 12 + sum(r.chunk.frame_count for r in rest if r.WhichOneof("response") == "chunk")
        assert proc.wait(timeout=drain_timeout_s + 10) == 0
        assert time.monotonic() - sent < drain_timeout_s + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert np.isfinite(drain_timeout_s)
