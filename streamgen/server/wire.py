"""Request deserialisation that never raises: a malformed message reaches the handler as a value.

grpc.aio deserialises each request message inside its own machinery; a ``DecodeError`` there (bad
wire data, a string field that is not UTF-8) ends the call with UNKNOWN, a message naming Python
internals and two ERROR tracebacks in the log. :class:`TolerantDeserializers` wraps the request
deserialiser of the chosen services so that such a message arrives as a :class:`MalformedMessage`
instead, and the servicer answers INVALID_ARGUMENT with a clean message and one WARNING line.

This module must never log or keep request content.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class MalformedMessage:
    """Stands in for a request message that could not be parsed."""

    type_name: str
    reason: str   # client-facing, e.g. "String field had bad UTF-8"

    @property
    def message(self) -> str:
        return f"malformed {self.type_name}: {self.reason}"


def tolerant(deserializer: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            # upb says "Error parsing message with type 'streamgen.v1.X': <why>"; keep the why.
            reason = str(exc).rpartition("': ")[2] or "not a valid protobuf encoding"
            return MalformedMessage(type_name, reason)
        except (UnicodeDecodeError, ValueError, TypeError):
            return MalformedMessage(type_name, "not a valid protobuf encoding")

    return deserialize


class TolerantDeserializers(grpc.aio.ServerInterceptor):
    """Wraps the request deserialiser of every method under ``prefixes`` (e.g. ``/streamgen.v1.StreamGen/``)."""

    def __init__(self, prefixes: tuple[str, ...], type_names: dict[str, str]) -> None:
        self._prefixes = prefixes
        self._type_names = type_names  # method -> request message name, for the client's message

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith(self._prefixes):
            return handler
        name = self._type_names.get(method, "request")
        return handler._replace(request_deserializer=tolerant(handler.request_deserializer, name))
