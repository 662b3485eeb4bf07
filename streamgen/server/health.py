"""A tiny grpc.health.v1 probe: ``python -m streamgen.server.health --address 127.0.0.1:50051 [--wait 60]``.

Exit 0 when the server reports SERVING, 1 otherwise (NOT_SERVING, unreachable, or still not
serving when ``--wait`` runs out). Used by ``make demo`` and the Docker HEALTHCHECK, in place
of downloading ``grpc_health_probe``. It imports grpc only (no torch, no engine), so it is fast
enough to run every few seconds, and it never changes server state.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", *, timeout_s: float = 2.0, tls: bool = False,
          ca_cert: Path | None = None) -> str:
    """The server's status name for ``service`` ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE: ..."."""
    if tls:
        creds = grpc.ssl_channel_credentials(ca_cert.read_bytes() if ca_cert else None)
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name}"  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamgen.server.health",
                                     description="Ask a streamgen server (grpc.health.v1) whether it is SERVING.")
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port (default: 127.0.0.1:50051)")
    parser.add_argument("--service", default="", help="service name; '' = the whole server (default)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking until SERVING or this many seconds passed (default: ask once)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-cert", type=Path, help="CA certificate (PEM) to verify the server with")
    parser.add_argument("--quiet", action="store_true", help="print nothing; use the exit code")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        status = check(args.address, args.service, tls=args.tls, ca_cert=args.ca_cert)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if not args.quiet:
        print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
