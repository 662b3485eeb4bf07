"""Bearer-token authentication for every RPC except health checking (``authorization: Bearer <token>``).

Health checks stay open so that load balancers, Kubernetes probes and the Docker HEALTHCHECK
need no secret. Tokens are compared in constant time. This module must never log, echo or
store anything but the configured token: refusals say *that* the token is missing or wrong,
never what was sent. Each refusal is a WARNING line with the peer and the method (rate-limited,
so a flood of bad tokens cannot flood the log).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from streamgen.server.logs import event

log = logging.getLogger("streamgen.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _token_from(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, credential = text.strip().partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else ""
    return None


class RefusalLog:
    """``auth_refused`` WARNING lines, at most ``max_lines`` per ``window_s``; the next line after a
    quiet spell says how many refusals were left out (``suppressed``)."""

    def __init__(self, max_lines: int = 5, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_lines = max_lines
        self.window_s = window_s
        self._clock = clock
        self._window_start = -float("inf")
        self._lines = 0
        self._suppressed = 0

    def record(self, peer: str, method: str, reason: str) -> None:
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self._window_start, self._lines = now, 0
        if self._lines >= self.max_lines:
            self._suppressed += 1
            return
        self._lines += 1
        event(log, "auth_refused", logging.WARNING, peer=peer, method=method, reason=reason,
              suppressed=self._suppressed)
        self._suppressed = 0


def _refusing(handler: grpc.RpcMethodHandler, message: str,
              on_call: Callable[[str], None] | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with UNAUTHENTICATED
    (``on_call(peer)`` first: the peer is known only inside the call)."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        if on_call is not None:
            on_call(context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_refused: Callable[[], None] | None = None,
                 exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode()
        self._on_refused = on_refused
        self._exempt = exempt_prefixes
        self.refusals = RefusalLog()

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}(exempt={self._exempt})"

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(self._exempt):
            return await continuation(handler_call_details)
        sent = _token_from(handler_call_details.invocation_metadata)
        if sent and hmac.compare_digest(sent.encode(), self._token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return handler
        if self._on_refused is not None:
            self._on_refused()
        message = ("missing bearer token: send metadata 'authorization: Bearer <token>'" if sent is None
                   else "invalid bearer token")
        method, reason = handler_call_details.method, "missing token" if sent is None else "invalid token"
        return _refusing(handler, message, lambda peer: self.refusals.record(peer, method, reason))
