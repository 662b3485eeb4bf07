"""Request deserialisation that never raises: a malformed message reaches the handler as a value.

grpc.aio deserialises each request message inside its own machinery; a ``DecodeError`` there (bad
wire data, a string field that is not UTF-8) ends the call with UNKNOWN, a message naming Python
internals and ERROR tracebacks in the log. :class:`TolerantDeserializers` wraps the request
deserialiser of the chosen services so that such a message arrives as a :class:`MalformedMessage`
instead:

- our own services (``prefixes``) see the value and answer for themselves (the servicer
  answers INVALID_ARGUMENT, counts the outcome and logs one WARNING line);
- services we do not own (``guarded`` prefixes: grpc.health.v1, reflection) cannot know the value,
  so their handler is wrapped too: a malformed request ends the call here with INVALID_ARGUMENT, a
  clean message and one WARNING line before the service ever sees it.

This module must never log or keep request content: a WARNING names the method, the peer and
the parser's reason only.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from streamgen.server.logs import event

log = logging.getLogger("streamgen.server.wire")


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


def request_type_names(service: ServiceDescriptor) -> dict[str, str]:
    """``{"/pkg.Service/Method": "RequestMessageName"}`` for every method of ``service``."""
    return {f"/{service.full_name}/{m.name}": m.input_type.name for m in service.methods}


async def _refuse(message: MalformedMessage, method: str, context: grpc.aio.ServicerContext) -> None:
    event(log, "malformed_request", logging.WARNING, method=method, peer=context.peer(), error=message.reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.message)


async def _checked(requests: AsyncIterator[Any], method: str,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, MalformedMessage):
            await _refuse(request, method, context)
        yield request


def _guard(behaviour: Callable[..., Any], method: str, request_streaming: bool) -> Callable[..., Any]:
    """``behaviour`` that never sees a :class:`MalformedMessage`: the call is refused first.

    grpc.aio tells a generator handler (responses yielded) from a coroutine one (responses written
    with ``context.write``) by the function's kind, so the wrapper keeps the kind of ``behaviour``.
    A handler that reads its requests with ``context.read()`` is not covered; grpc's own services
    take them as an argument or an iterator.
    """
    async def arguments(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request_streaming:
            return _checked(request, method, context)
        if isinstance(request, MalformedMessage):
            await _refuse(request, method, context)
        return request

    if inspect.isasyncgenfunction(behaviour):
        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(await arguments(request, context), context):
                yield response
        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(await arguments(request, context), context)
    return coroutine


_BEHAVIOURS = {(False, False): "unary_unary", (False, True): "unary_stream",
               (True, False): "stream_unary", (True, True): "stream_stream"}


class TolerantDeserializers(grpc.aio.ServerInterceptor):
    """Wraps the request deserialiser of every method under the given prefixes (e.g. ``/streamgen.v1.StreamGen/``).

    ``prefixes``: the handler receives a :class:`MalformedMessage` and answers it itself.
    ``guarded``: the handler is wrapped as well and never sees one (see the module docstring).
    ``type_names`` maps a method to its request message name, for the client's message.
    """

    def __init__(self, prefixes: tuple[str, ...], type_names: dict[str, str], guarded: tuple[str, ...] = ()) -> None:
        self._prefixes = prefixes
        self._guarded = guarded
        self._type_names = type_names

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None:
            return handler
        guard = method.startswith(self._guarded)
        if not guard and not method.startswith(self._prefixes):
            return handler
        name = self._type_names.get(method, "request")
        handler = handler._replace(request_deserializer=tolerant(handler.request_deserializer, name))
        if guard:
            kind = _BEHAVIOURS[(handler.request_streaming, handler.response_streaming)]
            handler = handler._replace(**{kind: _guard(getattr(handler, kind), method, handler.request_streaming)})
        return handler
