"""Property test against a live server: random well-formed and malformed Generate request sequences
(valid and invalid StartRequests, prompt updates, stops, empty messages, corrupt bytes, bad UTF-8,
cancels at random moments) each end with a documented status, and the server stays healthy: no
`error` outcome, no ERROR log line, SERVING, and an idle KV pool once the calls are gone. The same
for the services grpc brings (health Check/Watch, reflection v1 and v1alpha): OK, NOT_FOUND (an
unknown health service) or INVALID_ARGUMENT (a malformed message), never UNKNOWN.

Bounded: 25 examples each (derandomised, so CI runs the same ones), each call under a 10 s deadline.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from streamgen.api.v1 import SERVICE_NAME, pb
from tests.server.harness import ServerHarness, make_engine, with_config

Code = grpc.StatusCode
# Documented outcomes of a Generate call whose client does not cancel it (streamgen.proto, "Errors").
DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Errors(logging.Handler):
    """Collects ERROR records (and any record with a traceback) from every thread of the process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Less one artefact of this process's clients: grpc.aio's poller calling back into an event
        # loop an earlier test's asyncio.run already closed.
        if (record.levelno >= logging.ERROR or record.exc_info) and "PollerCompletionQueue" not in record.getMessage():
            self.records.append(record)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerHarness, _Errors]]:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    engine = make_engine(max_frames=24, unbounded_max_frames=24, max_prompt_chars=60, max_sessions=2,
                         max_queue_wait_s=2.0)
    try:
        with ServerHarness(engine, with_config(max_message_bytes=64 * 1024, max_waiting=2, linger_s=0.2)) as harness:
            yield harness, errors
    finally:
        logging.getLogger().removeHandler(errors)


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNGS = [_png((8, 8)), _png((64, 40))]

texts = st.text(st.characters(codec="utf-8"), max_size=80)
starts = st.builds(
    pb.StartRequest,
    prompt=st.one_of(st.just("a red mug"), texts),
    seed=st.integers(0, 2**64 - 1),
    num_frames=st.one_of(st.integers(0, 60), st.integers(0, 2**32 - 1)),
    fps=st.one_of(st.just(0), st.integers(0, 300)),
    encoding=st.integers(0, 5),
    keyframe_interval=st.one_of(st.just(0), st.integers(0, 2000)),
    jpeg_quality=st.one_of(st.just(0), st.integers(0, 120)),
    expect_preset=st.sampled_from(["", "test", "default"]),
    start_image=st.one_of(st.just(b""), st.sampled_from(PNGS), st.binary(max_size=64)),
)
messages = st.one_of(
    starts.map(lambda s: pb.GenerateRequest(start=s).SerializeToString()),
    texts.map(lambda p: pb.GenerateRequest(prompt_update=pb.PromptUpdate(prompt=p)).SerializeToString()),
    st.just(pb.GenerateRequest(stop=pb.StopRequest()).SerializeToString()),
    st.just(b""),                                  # a GenerateRequest with nothing set
    st.binary(min_size=1, max_size=32),            # usually corrupt wire data
    st.just(b"\x0a\x04\x0a\x02\xff\xfe"),          # start { prompt: not UTF-8 }
    st.just(b"\x12\x03\x0a\x01\xc3"),              # prompt_update { prompt: a cut UTF-8 sequence }
)
# A call: a valid start first (most of the time) or anything, then more messages; maybe cancel it.
calls = st.tuples(
    st.one_of(starts.filter(lambda s: s.encoding in (1, 2, 3, 4)).map(
        lambda s: pb.GenerateRequest(start=s).SerializeToString()), messages),
    st.lists(messages, max_size=4),
    st.one_of(st.none(), st.floats(0.0, 0.3)),    # cancel after this many seconds, or never
)


def _run_call(address: str, first: bytes, later: list[bytes], cancel_after_s: float | None) -> tuple[Code, list[str]]:
    with grpc.insecure_channel(address) as channel:
        generate = channel.stream_stream(f"/{SERVICE_NAME}/Generate", request_serializer=None,
                                         response_deserializer=pb.GenerateResponse.FromString)
        call = generate(iter([first, *later]), timeout=10)
        if cancel_after_s is not None:
            timer = threading.Timer(cancel_after_s, call.cancel)
            timer.start()
        kinds: list[str] = []
        try:
            for response in call:
                kinds.append(response.WhichOneof("response"))
            code = Code.OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
        if cancel_after_s is not None:
            timer.cancel()
    return code, kinds


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=calls)
def test_random_request_sequences_end_documented_and_server_stays_healthy(
        server: tuple[ServerHarness, _Errors], call: tuple[bytes, list[bytes], float | None]) -> None:
    harness, errors = server
    first, later, cancel_after_s = call
    code, kinds = _run_call(harness.address, first, later, cancel_after_s)
    allowed = DOCUMENTED | ({Code.CANCELLED} if cancel_after_s is not None else set())
    assert code in allowed, (code, kinds)
    if code is Code.OK:  # the protocol: started, chunks, ended - exactly once each end
        assert kinds[0] == "started" and kinds[-1] == "ended" and kinds.count("ended") == 1, kinds
    assert "ended" not in kinds[:-1]
    assert not errors.records, [r.getMessage() for r in errors.records]


junk = st.one_of(st.binary(min_size=1, max_size=32), st.just(b"\x0a\x02\xff\xfe"), st.just(b"\x3a\x02\xff\xfe"))
health_requests = st.one_of(
    st.sampled_from(["", SERVICE_NAME, "no.such.Service"]).map(
        lambda name: health_pb2.HealthCheckRequest(service=name).SerializeToString()),
    texts.map(lambda name: health_pb2.HealthCheckRequest(service=name).SerializeToString()), junk)
reflection_requests = st.one_of(
    st.builds(reflection_pb2.ServerReflectionRequest, list_services=st.just("")),
    st.builds(reflection_pb2.ServerReflectionRequest, file_containing_symbol=st.one_of(st.just(SERVICE_NAME), texts)),
    st.builds(reflection_pb2.ServerReflectionRequest, file_by_filename=texts),
    st.just(reflection_pb2.ServerReflectionRequest()),
).map(lambda r: r.SerializeToString()) | junk
grpc_service_calls = st.one_of(
    st.tuples(st.sampled_from(["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]),
              health_requests.map(lambda r: [r])),
    st.tuples(st.sampled_from([f"/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"
                               for v in ("v1", "v1alpha")]),
              st.lists(reflection_requests, min_size=1, max_size=4)),
)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=grpc_service_calls)
def test_random_health_and_reflection_requests_end_documented(
        server: tuple[ServerHarness, _Errors], call: tuple[str, list[bytes]]) -> None:
    harness, errors = server
    method, requests = call
    with grpc.insecure_channel(harness.address) as channel:
        try:
            if method.endswith("/Check"):
                channel.unary_unary(method, request_serializer=None)(requests[0], timeout=10)
            elif method.endswith("/Watch"):  # never ends by itself: the first status is the answer
                watch = channel.unary_stream(method, request_serializer=None)(requests[0], timeout=10)
                next(watch)
                watch.cancel()
            else:
                list(channel.stream_stream(method, request_serializer=None)(iter(requests), timeout=10))
            code = Code.OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
    assert code in {Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT}, (method, code)
    assert not errors.records, [r.getMessage() for r in errors.records]


def test_after_the_fuzzing_the_server_is_idle_and_healthy(server: tuple[ServerHarness, _Errors]) -> None:
    harness, errors = server
    with grpc.insecure_channel(harness.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    harness.wait_metric("streamgen:num_streams_active", lambda v: v == 0, timeout_s=5.0)
    harness.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)
    assert harness.metric("streamgen:num_sessions_running") == 0
    assert harness.metric("streamgen:request_outcome_total", 'reason="error"') == 0
    assert not errors.records
