"""Bearer-token auth (UNAUTHENTICATED without / with a wrong token, health stays open) and optional TLS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamgen.api.v1 import pb, pb_grpc
from streamgen.server.health import check
from tests.server.harness import ServerHarness, with_config

TOKEN = "s3cret-t0ken"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> list[pb.GenerateResponse]:
    start = pb.StartRequest(prompt="a mug", num_frames=12, encoding=pb.ENCODING_JPEG)
    return list(pb_grpc.StreamGenStub(channel).Generate(iter([pb.GenerateRequest(start=start)]), metadata=metadata,
                                                        timeout=30))


def test_token_required_except_for_health() -> None:
    harness = ServerHarness(config=with_config(token=TOKEN))
    try:
        assert TOKEN not in repr(harness.config)
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.StreamGenStub(channel)
            for metadata, message in [((), "missing bearer token"),
                                      ((("authorization", "Bearer wrong"),), "invalid bearer token"),
                                      ((("authorization", f"Basic {TOKEN}"),), "invalid bearer token")]:
                for rpc in (lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md, timeout=5),
                            lambda md: _generate(channel, md)):
                    with pytest.raises(grpc.RpcError) as refused:
                        rpc(metadata)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                    assert refused.value.details().startswith(message)  # type: ignore[attr-defined]
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            responses = _generate(channel, (("authorization", f"Bearer {TOKEN}"),))
            assert responses[-1].ended.reason == pb.StreamEnded.REASON_COMPLETED
        assert harness.metric("streamgen:request_outcome_total", 'reason="unauthenticated"') == 6
    finally:
        harness.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    harness = ServerHarness(config=with_config(tls_cert=cert, tls_key=key, token=TOKEN))
    try:
        assert check(harness.address, tls=True, ca_cert=cert) == "SERVING"
        assert check(harness.address).startswith("UNREACHABLE")  # plaintext to a TLS port
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(harness.address, creds) as channel:
            responses = _generate(channel, (("authorization", f"Bearer {TOKEN}"),))
        assert responses[-1].ended.frames_sent == 12
    finally:
        harness.close()
