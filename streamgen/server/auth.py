"""Bearer-token authentication for every RPC except health checking (``authorization: Bearer <token>``).

Health checks stay open so that load balancers, Kubernetes probes and the Docker HEALTHCHECK
need no secret. Tokens are compared in constant time. This module must never log, echo or
store anything but the configured token: refusals say *that* the token is missing or wrong,
never what was sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _token_from(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, credential = text.strip().partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else ""
    return None


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
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
        return _refusing(handler, message)
