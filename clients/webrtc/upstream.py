"""One viewer's ``Generate`` call: start, prompt changes at any moment, stop, decoded frames out.

``clients.stream.StreamClient.stream`` sends prompt switches at video times fixed before the call
starts; a viewer types a new prompt whenever it likes, so the gateway drives its own call. It
reuses the stream client's connection (:class:`StreamClient`), request (:class:`StreamRequest`),
decoder (:class:`FrameDecoder`) and error type (:class:`StreamError`), so both clients speak the API
the same way.

Responses are read one at a time, only as fast as the consumer takes them: a viewer whose video
buffer is full stops reading, HTTP/2 flow control fills up and the server pauses that session
(backpressure, as the proto documents), instead of frames piling up in the gateway.

This module speaks only the public gRPC API; it never touches WebRTC or the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from clients.stream import FrameDecoder, StreamClient, StreamError, StreamRequest
from streamgen.api.v1 import pb, pb_grpc


@dataclass(frozen=True)
class DecodedChunk:
    """One FrameChunk, decoded: ``frames`` is ``np.uint8 [N, H, W, 3]``."""

    frames: np.ndarray
    chunk: pb.FrameChunk      # the proto (payload included) for its index, pts and timing
    received_s: float         # time.monotonic() when the chunk arrived


class Upstream(StreamClient):
    """The gateway's connection to one streamgen server (one channel, shared by every viewer): the
    stream client's channel, authentication and ``model_info``, plus calls whose prompt changes at any time."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 ca_cert: bytes | None = None) -> None:
        super().__init__(target, token=token, tls=tls, ca_cert=ca_cert)
        self.target = target

    def open(self, request: StreamRequest) -> LiveCall:
        return LiveCall(self._stub, self._metadata, request)


class LiveCall:
    """A ``Generate`` call whose prompt can change at any time. Iterate :meth:`events` once."""

    def __init__(self, stub: pb_grpc.StreamGenStub, metadata: tuple[tuple[str, str], ...],
                 request: StreamRequest) -> None:
        self._stub = stub
        self._metadata = metadata
        self._request = request
        self._call: Any = None
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight per call
        self._closed_for_writing = False

    async def events(self) -> AsyncIterator[pb.StreamStarted | DecodedChunk | pb.StreamEnded]:
        """StreamStarted, then DecodedChunk per FrameChunk, then StreamEnded. Raises :class:`StreamError`
        on a non-OK status. Leaving the loop early (or cancelling its task) cancels the call, which
        frees the session on the server."""
        call = self._call = self._stub.Generate(metadata=self._metadata)
        decoder: FrameDecoder | None = None
        try:
            async with self._write_lock:
                await call.write(self._request.to_proto())
            while (response := await call.read()) is not grpc.aio.EOF:
                kind = response.WhichOneof("response")
                if kind == "started":
                    decoder = FrameDecoder(response.started)
                    yield response.started
                elif kind == "chunk":
                    if decoder is None:
                        raise StreamError(grpc.StatusCode.INTERNAL, "FrameChunk before StreamStarted")
                    received_s = time.monotonic()
                    # H.264 / JPEG decoding releases the GIL: a worker thread keeps other viewers smooth.
                    frames = await asyncio.to_thread(decoder.decode, response.chunk)
                    yield DecodedChunk(frames, response.chunk, received_s)
                elif kind == "ended":
                    await self._close_writing()  # lets the server close the call at once
                    yield response.ended
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise StreamError(code, await call.details() or "")
        except grpc.aio.AioRpcError as exc:
            raise StreamError(exc.code(), exc.details() or "") from None
        finally:
            self._closed_for_writing = True
            if not call.done():
                call.cancel()

    async def update_prompt(self, prompt: str) -> bool:
        """Send a PromptUpdate (applied at the server's next chunk boundary). False if the call is over."""
        return await self._write(pb.GenerateRequest(prompt_update=pb.PromptUpdate(prompt=prompt)))

    async def stop(self) -> bool:
        """Send a StopRequest: the server answers StreamEnded{REASON_STOPPED}. False if the call is over."""
        return await self._write(pb.GenerateRequest(stop=pb.StopRequest()))

    async def _write(self, message: pb.GenerateRequest) -> bool:
        if self._call is None or self._closed_for_writing or self._call.done():
            return False
        async with self._write_lock:
            try:
                await self._call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return False  # the call ended meanwhile; its final status reaches events()
        return True

    async def _close_writing(self) -> None:
        if self._closed_for_writing:
            return
        self._closed_for_writing = True
        async with self._write_lock:
            with contextlib.suppress(Exception):  # the call may have ended meanwhile
                await self._call.done_writing()
