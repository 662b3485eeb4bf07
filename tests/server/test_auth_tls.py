"""Bearer-token auth (UNAUTHENTICATED without / with a wrong token, health stays open) and optional TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from streamgen.api.v1 import SERVICE_NAME, pb, pb_grpc
from streamgen.server.health import check
from tests.server.harness import ServerHarness, with_config

TOKEN = "s3cret-t0ken"
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generate(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> list[pb.GenerateResponse]:
    start = pb.StartRequest(prompt="a mug", num_frames=12, encoding=pb.ENCODING_JPEG)
    return list(pb_grpc.StreamGenStub(channel).Generate(iter([pb.GenerateRequest(start=start)]), metadata=metadata,
                                                        timeout=30))


def _list_services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> list[str]:
    """What ``grpcurl list`` asks: the reflection service's list of services."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                   metadata=metadata, timeout=5)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_token_required_except_for_health() -> None:
    with ServerHarness(config=with_config(token=TOKEN)) as harness:
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
            # Reflection is behind the token too (grpcurl -H "authorization: Bearer ..." list).
            with pytest.raises(grpc.RpcError) as refused:
                _list_services(channel, ())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert SERVICE_NAME in _list_services(channel, (("authorization", f"Bearer {TOKEN}"),))
        assert harness.metric("streamgen:request_outcome_total", 'reason="unauthenticated"') == 7


def _self_signed(key_path: Path, cert_path: Path) -> None:
    """A one-day certificate for localhost / 127.0.0.1, made with ``cryptography`` (else the openssl command)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("needs the cryptography package or the openssl command to make a test certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_path), "-out",
                        str(cert_path), "-days", "1", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    _self_signed(key, cert)
    with ServerHarness(config=with_config(tls_cert=cert, tls_key=key, token=TOKEN)) as harness:
        assert check(harness.address, tls=True, ca_cert=cert) == "SERVING"
        assert check(harness.address).startswith("UNREACHABLE")  # plaintext to a TLS port
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(harness.address, creds) as channel:
            responses = _generate(channel, (("authorization", f"Bearer {TOKEN}"),))
        assert responses[-1].ended.frames_sent == 12
        # The command-line client speaks TLS too (--tls --ca-cert), here with the token from the environment.
        res = subprocess.run([sys.executable, "-m", "clients.stream", "--server", harness.address, "--tls",
                              "--ca-cert", str(cert), "--prompt", "a mug", "--frames", "12", "--encoding", "jpeg",
                              "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "STREAMGEN_TOKEN": TOKEN})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["frames"] == 12
