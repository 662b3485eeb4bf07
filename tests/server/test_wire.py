"""Malformed requests to the services grpc brings (grpc.health.v1, reflection v1 and v1alpha), over 127.0.0.1:
INVALID_ARGUMENT with a clean message and one WARNING line each, no ERROR or traceback, valid requests
still answered, the server SERVING after. (StreamGen's own methods: tests/server/test_reliability.py.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from streamgen.api.v1 import SERVICE_NAME
from tests.server.harness import ServerHarness, make_engine

Code = grpc.StatusCode
CORRUPT = b"\xff\xff\xff"
BAD_UTF8_SERVICE = b"\x0a\x02\xff\xfe"     # HealthCheckRequest { service: bytes ff fe }
BAD_UTF8_LIST = b"\x3a\x02\xff\xfe"        # ServerReflectionRequest { list_services: bytes ff fe }
HEALTH = "/grpc.health.v1.Health"
REFLECTION = [f"/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo" for v in ("v1", "v1alpha")]
LIST_SERVICES = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    with ServerHarness(make_engine()) as harness:
        yield harness


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """ERROR records and tracebacks, less one artefact of this process's clients (see test_reliability)."""
    return [r for r in caplog.records if (r.levelno >= logging.ERROR or r.exc_info)
            and "PollerCompletionQueue" not in r.getMessage()]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(getattr(r, "streamgen_fields", {}), level=r.levelname) for r in caplog.records
            if r.getMessage() == "malformed_request"]


def _call(channel: grpc.Channel, method: str, kind: str, request: Any) -> tuple[int, Code, str]:
    """(responses received, status, details) of one call with raw request bytes."""
    stub = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    received = 0
    try:
        if kind == "unary_unary":
            stub(request, timeout=5)
            return 1, Code.OK, ""
        call = stub(request, timeout=5)
        for _ in call:
            received += 1
            if kind == "unary_stream":  # Watch never ends by itself: its first status is the answer
                call.cancel()
    except grpc.RpcError as exc:
        return received, exc.code(), exc.details()  # type: ignore[attr-defined]
    return received, Code.OK, ""


def test_malformed_health_and_reflection_requests_are_invalid_argument_with_one_warning(
        server: ServerHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cases = [
        (f"{HEALTH}/Check", "unary_unary", CORRUPT, 0, "malformed HealthCheckRequest: Wire format was corrupt"),
        (f"{HEALTH}/Check", "unary_unary", BAD_UTF8_SERVICE, 0,
         "malformed HealthCheckRequest: String field had bad UTF-8"),
        (f"{HEALTH}/Watch", "unary_stream", CORRUPT, 0, "malformed HealthCheckRequest: Wire format was corrupt"),
        (f"{HEALTH}/Watch", "unary_stream", BAD_UTF8_SERVICE, 0,
         "malformed HealthCheckRequest: String field had bad UTF-8"),
    ]
    for method in REFLECTION:
        cases += [
            (method, "stream_stream", iter([CORRUPT]), 0, "malformed ServerReflectionRequest: Wire format was corrupt"),
            (method, "stream_stream", iter([BAD_UTF8_LIST]), 0,
             "malformed ServerReflectionRequest: String field had bad UTF-8"),
            # A valid request is answered; the malformed one after it ends the call.
            (method, "stream_stream", iter([LIST_SERVICES, CORRUPT]), 1,
             "malformed ServerReflectionRequest: Wire format was corrupt"),
        ]
    with grpc.insecure_channel(server.address) as channel:
        for method, kind, request, num_answered, details in cases:
            assert _call(channel, method, kind, request) == (num_answered, Code.INVALID_ARGUMENT, details), method
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    warnings = _warnings(caplog)
    assert [w["method"] for w in warnings] == [method for method, *_ in cases]
    assert all(w["level"] == "WARNING" and w["peer"].startswith("ipv") for w in warnings)
    assert not _errors(caplog), [r.getMessage() for r in _errors(caplog)]


def test_valid_health_and_reflection_requests_are_answered_as_before(
        server: ServerHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        check = channel.unary_unary(f"{HEALTH}/Check", request_serializer=None, response_deserializer=None)
        assert check(health_pb2.HealthCheckRequest(service=SERVICE_NAME).SerializeToString(), timeout=5) == serving
        with pytest.raises(grpc.RpcError) as unknown:
            check(health_pb2.HealthCheckRequest(service="no.such.Service").SerializeToString(), timeout=5)
        assert unknown.value.code() == Code.NOT_FOUND  # type: ignore[attr-defined]
        watch = channel.unary_stream(f"{HEALTH}/Watch", request_serializer=None, response_deserializer=None)
        call = watch(b"", timeout=5)
        assert next(call) == serving
        call.cancel()
        for method in REFLECTION:
            info = channel.stream_stream(method, request_serializer=None,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            (listed,) = info(iter([LIST_SERVICES]), timeout=5)
            assert SERVICE_NAME in [s.name for s in listed.list_services_response.service]
    assert not _warnings(caplog) and not _errors(caplog)
