"""Bad input -> the documented status code and message; the server stays healthy and other streams finish.

Also: a full KV pool past the queue wait and too many waiting streams -> RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from streamgen.api.v1 import pb, pb_grpc
from tests.server.harness import ServerHarness, make_engine, with_config

Code = grpc.StatusCode
MAX_MESSAGE_BYTES = 64 * 1024


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    # Paced (0.5 s lead), so a stream lives long enough for mid-stream mistakes to reach it.
    with ServerHarness(make_engine(max_prompt_chars=100, max_lead_s=0.5),
                       with_config(max_message_bytes=MAX_MESSAGE_BYTES)) as harness:
        yield harness


def start(**fields: object) -> pb.GenerateRequest:
    base: dict[str, object] = {"prompt": "a red mug", "num_frames": 24, "encoding": pb.ENCODING_RAW_RGB}
    base.update(fields)
    return pb.GenerateRequest(start=pb.StartRequest(**base))


def exchange(address: str, first: pb.GenerateRequest | None, later: Sequence[pb.GenerateRequest] = (),
             ) -> tuple[list[pb.GenerateResponse], grpc.StatusCode, str]:
    """Send ``first``; once StreamStarted arrives send ``later``; return (responses, code, details)."""
    started = threading.Event()

    def requests() -> Iterator[pb.GenerateRequest]:
        if first is not None:
            yield first
        if later:
            started.wait(10)
            yield from later

    responses: list[pb.GenerateResponse] = []
    with grpc.insecure_channel(address) as channel:
        try:
            for response in pb_grpc.StreamGenStub(channel).Generate(requests(), timeout=30):
                responses.append(response)
                if response.WhichOneof("response") == "started":
                    started.set()
        except grpc.RpcError as exc:
            return responses, exc.code(), exc.details()  # type: ignore[attr-defined]
    return responses, Code.OK, ""


def _image(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8).squeeze(), mode=mode).save(
        buf, format=fmt)
    return buf.getvalue()


CASES = [
    ("empty prompt", start(prompt=""), (), Code.INVALID_ARGUMENT, "prompt must be a non-empty string"),
    ("blank prompt", start(prompt="   "), (), Code.INVALID_ARGUMENT, "prompt must be a non-empty string"),
    ("over-long prompt", start(prompt="x" * 101), (), Code.INVALID_ARGUMENT, "101 characters; the limit is 100"),
    ("frames over the limit", start(num_frames=97), (), Code.INVALID_ARGUMENT, "num_frames 97 exceeds the limit of 96"),
    ("unspecified encoding", start(encoding=pb.ENCODING_UNSPECIFIED), (), Code.INVALID_ARGUMENT,
     "encoding is ENCODING_UNSPECIFIED: choose one of ENCODING_H264_FMP4"),
    ("unknown encoding", start(encoding=42), (), Code.INVALID_ARGUMENT, "unknown encoding 42"),
    ("malformed image", start(start_image=b"\x89PNG\r\n\x1a\nnot really"), (), Code.INVALID_ARGUMENT,
     "start_image is not a decodable PNG or JPEG"),
    ("truncated jpeg", start(start_image=_image("JPEG")[:200]), (), Code.INVALID_ARGUMENT,
     "start_image is not a decodable PNG or JPEG"),
    ("gif image", start(start_image=_image("GIF", mode="L")), (), Code.INVALID_ARGUMENT,
     "start_image must be PNG or JPEG, got GIF"),
    ("jpeg quality", start(jpeg_quality=101), (), Code.INVALID_ARGUMENT, "jpeg_quality must lie in [1, 100]"),
    ("fps", start(fps=500), (), Code.INVALID_ARGUMENT, "fps must be in (0, 240], got 500"),
    ("no message at all", None, (), Code.INVALID_ARGUMENT, "the request stream ended before a StartRequest"),
    ("empty message", pb.GenerateRequest(), (), Code.INVALID_ARGUMENT, "empty GenerateRequest"),
    ("prompt update before start", pb.GenerateRequest(prompt_update=pb.PromptUpdate(prompt="a mug")), (),
     Code.FAILED_PRECONDITION, "the first message must be a StartRequest, got prompt_update"),
    ("stop before start", pb.GenerateRequest(stop=pb.StopRequest()), (), Code.FAILED_PRECONDITION,
     "the first message must be a StartRequest, got stop"),
    ("second start", start(num_frames=96), [start()], Code.FAILED_PRECONDITION,
     "this stream has already started: send one StartRequest per call"),
    ("over-long prompt update", start(num_frames=96), [pb.GenerateRequest(prompt_update=pb.PromptUpdate(
        prompt="y" * 101))], Code.INVALID_ARGUMENT, "prompt_update: prompt has 101 characters; the limit is 100"),
    ("empty message mid-stream", start(num_frames=96), [pb.GenerateRequest()], Code.INVALID_ARGUMENT,
     "empty GenerateRequest"),
    ("preset mismatch", start(expect_preset="default"), (), Code.FAILED_PRECONDITION,
     "expect_preset is 'default' but this server runs preset 'test'"),
    ("resolution mismatch", start(expect_width=128, expect_height=128), (), Code.FAILED_PRECONDITION,
     "expected 128x128 but this server generates 32x32"),
    ("oversize message", start(start_image=bytes(MAX_MESSAGE_BYTES + 1)), (), Code.RESOURCE_EXHAUSTED,
     "Received message larger than max"),
]


def test_bad_input_matrix_then_still_healthy(server: ServerHarness) -> None:
    # A good stream runs through the whole matrix and must complete untouched.
    good: dict[str, object] = {}
    thread = threading.Thread(target=lambda: good.update(result=exchange(server.address, start(num_frames=36))))
    thread.start()
    failures = []
    for name, first, later, code, message in CASES:
        responses, got_code, details = exchange(server.address, first, later)
        if got_code != code or message not in details:
            failures.append(f"{name}: got {got_code.name} {details!r}, want {code.name} containing {message!r}")
        if code != Code.RESOURCE_EXHAUSTED:  # streams refused mid-way got StreamStarted, never StreamEnded
            assert all(r.WhichOneof("response") != "ended" for r in responses), name
    assert not failures, "\n".join(failures)

    thread.join(timeout=30)
    responses, code, _ = good["result"]  # type: ignore[misc]
    assert code == Code.OK and responses[-1].ended.reason == pb.StreamEnded.REASON_COMPLETED
    assert responses[-1].ended.frames_sent == 36
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.metric("streamgen:request_outcome_total", 'reason="invalid_argument"') >= 13
    assert server.metric("streamgen:request_outcome_total", 'reason="failed_precondition"') >= 5
    server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)


def test_start_image_of_another_size_is_fitted_and_streams(server: ServerHarness) -> None:
    for image in (_image("PNG", (64, 48)), _image("JPEG", (20, 40)), _image("PNG", (50, 50), mode="RGBA")):
        responses, code, details = exchange(server.address, start(start_image=image, num_frames=12))
        assert code == Code.OK, details
        assert responses[-1].ended.reason == pb.StreamEnded.REASON_COMPLETED
        assert responses[-1].ended.frames_sent == 12


def test_pool_exhausted_and_too_many_waiting_are_resource_exhausted() -> None:
    probe = make_engine()
    per_session = probe.kv.blocks_for_frames(probe.kv.worst_case_frames(3, 12))  # a 48-frame stream
    budget = (per_session + 1) * probe.kv.pool.bytes_per_block  # + the null block: room for exactly one
    engine = make_engine(kv_memory_bytes=budget, max_queue_wait_s=0.3, max_sessions=2, max_lead_s=0.5)
    assert engine.kv.can_admit(engine.kv.worst_case_frames(3, 12))
    with ServerHarness(engine, with_config(max_waiting=0)) as harness:
        first: dict[str, object] = {}
        holder = threading.Thread(target=lambda: first.update(result=exchange(harness.address, start(num_frames=48))))
        holder.start()
        harness.wait_metric("streamgen:num_sessions_running", lambda v: v == 1, timeout_s=10)
        queued: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: queued.update(result=exchange(harness.address, start(num_frames=48))))
        waiter.start()
        harness.wait_metric("streamgen:num_sessions_waiting", lambda v: v == 1, timeout_s=5)
        _, code, details = exchange(harness.address, start(num_frames=48))  # 2 sessions + 0 allowed waiting
        assert code == Code.RESOURCE_EXHAUSTED and "server busy: 2 streams running and 0 waiting" in details
        # A bad request is told what is wrong with it even when the server is full (only a start image, which
        # must be decoded to be judged, waits for a place).
        _, code, details = exchange(harness.address, start(prompt="x" * 10_000))
        assert code == Code.INVALID_ARGUMENT and "characters; the limit is" in details
        waiter.join(timeout=10)
        responses, code, details = queued["result"]  # type: ignore[misc]
        assert code == Code.RESOURCE_EXHAUSTED and details.startswith("not admitted within 0.3 s: pool exhausted")
        assert responses[0].WhichOneof("response") == "started"  # accepted into the queue, then refused
        holder.join(timeout=30)
        responses, code, _ = first["result"]  # type: ignore[misc]
        assert code == Code.OK and responses[-1].ended.frames_sent == 48
        assert harness.metric("streamgen:request_outcome_total", 'reason="resource_exhausted"') == 2
