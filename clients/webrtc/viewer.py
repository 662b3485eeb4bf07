"""One WebRTC viewer (the page, or a WHEP player): its peer connection, video track, data channel and
``Generate`` call, and every way it ends.

    offer answered only once the server started the stream (a refusal is the offer's HTTP error)
      -> Generate (unbounded): decode chunks, feed the live-edge track
    peer connection "connected" -> the track plays; stats on the data channel
    data channel (the page only): {"type": "prompt"} -> PromptUpdate, {"type": "stop"} -> StopRequest
    tab closed / pc closed or failed / data channel closed / stream over / never connected /
    peer silent (no RTCP receiver report for ``peer_timeout_s``: a killed browser, a dead network)
      -> cancel the Generate call (the server frees the session's pages at once), close the pc

A viewer has one frame count: the frames its track handed to the encoder. The stats messages, the
``ended`` message, ``/status`` and the ``viewer_closed`` log line all report that number (the
server's own count, which includes frames the live edge skipped, is logged as ``generated``).

Every viewer runs in its own tasks: a viewer's error is logged and reported to that viewer only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCRtpSender

from clients.stream import OK_REASONS, StreamError, StreamRequest
from clients.webrtc.protocol import MessageError, parse_message, to_page
from clients.webrtc.track import GeneratedVideoTrack
from clients.webrtc.upstream import DecodedChunk, LiveCall
from streamgen.api.v1 import pb
from streamgen.server.logs import event

if TYPE_CHECKING:
    from clients.webrtc.gateway import Gateway

log = logging.getLogger("clients.webrtc")
_PEER_CHECK_S = 0.5


def buffer_frames(info: pb.ModelInfo) -> int:
    """The track's bound: two chunks, plus the paced server's lead (so that a paced stream never
    waits on it and chunks are timed when they really arrive); backpressure beyond."""
    frames = 2 * max(1, info.frames_per_chunk)
    if info.paced and math.isfinite(info.max_lead_s):
        frames += math.ceil(info.max_lead_s * info.fps)
    return frames


class Viewer:
    """One WebRTC peer: its pc, video track, data channel (if the peer opens one) and Generate call."""

    kind = "webrtc"

    def __init__(self, gateway: Gateway, viewer_id: str, pc: RTCPeerConnection, info: pb.ModelInfo,
                 request: StreamRequest, kind: str = "webrtc") -> None:
        self.gateway = gateway
        self.id = viewer_id
        self.kind = kind
        self.pc = pc
        self.info = info
        self.request = request
        self.track = GeneratedVideoTrack(info.fps, max_buffered_frames=buffer_frames(info),
                                         max_lag_s=gateway.config.max_lag_ms / 1000)
        self.sender: RTCRtpSender | None = None
        self.created_s = time.monotonic()
        self.session_id: str | None = None
        self.end_reason: str | None = None
        self.closed = False
        self._channel: RTCDataChannel | None = None
        self._outbox: list[str] = []
        self._call: LiveCall | None = None
        self._started = False
        self._last_timing: pb.ChunkTiming | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._admitted: asyncio.Future[None] | None = None

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                self.start()
            elif state in ("failed", "closed"):
                await self.close(f"peer connection {state}")

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            self.attach(channel)

        self.spawn(self._close_unless_connected())

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            event(log, "viewer_failed", logging.ERROR, viewer=self.id, error=f"{type(exc).__name__}: {exc}")
            self.send("error", message=f"gateway error: {type(exc).__name__}: {exc}", fatal=True)
            self.spawn(self.close("gateway error"))

    # ------------------------------------------------------------------ data channel
    def attach(self, channel: RTCDataChannel) -> None:
        self._channel = channel

        @channel.on("open")
        def on_open() -> None:
            self._flush()

        @channel.on("message")
        def on_message(data: str | bytes) -> None:
            self.on_message(data)

        @channel.on("close")
        def on_close() -> None:
            self.spawn(self.close("data channel closed"))

        self._flush()

    def send(self, kind: str, **fields: Any) -> None:
        """To the page over the data channel; queued until the channel opens (WHEP players have none)."""
        if self.closed:
            return
        self._outbox.append(to_page(kind, **fields))
        del self._outbox[:-64]  # a peer without a channel never reads them
        self._flush()

    def _flush(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        while self._outbox:
            channel.send(self._outbox.pop(0))

    def on_message(self, data: str | bytes) -> None:
        try:
            message = parse_message(data, self.info.max_prompt_chars or None)
        except MessageError as exc:
            event(log, "bad_message", logging.WARNING, viewer=self.id, error=str(exc))
            self.send("error", message=str(exc), fatal=False)
            return
        if message.type == "prompt":
            self.spawn(self._update_prompt(message.prompt))
        else:
            self.spawn(self._stop())

    async def _update_prompt(self, prompt: str) -> None:
        if self._call is None or not await self._call.update_prompt(prompt):
            self.send("error", message="no stream is running: the prompt was not sent", fatal=False)
            return
        event(log, "prompt_sent", viewer=self.id, session=self.session_id, prompt_chars=len(prompt))
        self.send("prompt_sent", prompt=prompt)

    async def _stop(self) -> None:
        event(log, "stop_requested", viewer=self.id, session=self.session_id)
        if self._call is None or not await self._call.stop():
            await self.close("stopped before the stream started")

    # ------------------------------------------------------------------ the stream
    async def open_stream(self, timeout_s: float) -> None:
        """Open the Generate call before the offer is answered, so that a server that refuses (busy:
        its sessions and queue are full; down) is the offer's HTTP error rather than a stream that
        never starts. Returns once the server started the stream, or after ``timeout_s`` (a server
        that queues the stream answers later); raises :class:`StreamError` on a refusal. A viewer
        that then never connects holds its server session for ``connect_timeout_s`` at most."""
        self._admitted = asyncio.get_running_loop().create_future()
        self.spawn(self._run_stream())
        try:
            await asyncio.wait_for(asyncio.shield(self._admitted), timeout_s)
        except TimeoutError:
            self._admitted.cancel()

    def start(self) -> None:
        """The peer connection is up: the track starts playing; the stats loop and the peer watch."""
        if self._started or self.closed:
            return
        self._started = True
        self.spawn(self._send_stats())
        self.spawn(self._watch_peer())

    def _admit(self, error: StreamError | None = None) -> bool:
        """Settle the offer's wait; True if it was still waiting."""
        if self._admitted is None or self._admitted.done():
            return False
        if error is None:
            self._admitted.set_result(None)
        else:
            self._admitted.set_exception(error)
        return True

    async def _run_stream(self) -> None:
        call = self._call = self.gateway.upstream.open(self.request)
        ended: pb.StreamEnded | None = None
        try:
            async with contextlib.aclosing(call.events()) as events:  # aclosing: cancel the call on any exit
                async for item in events:
                    if isinstance(item, DecodedChunk):
                        self._last_timing = item.chunk.timing
                        await self.track.put(item.frames, item.received_s)
                    elif isinstance(item, pb.StreamStarted):
                        self._on_started(item)
                        self._admit()
                    else:
                        ended = item
        except StreamError as exc:
            if self._admit(exc):
                return  # the offer is refused with it; the gateway closes this viewer
            self.end_reason = f"error {exc.code.name}"
            message = self.gateway.describe_error(exc)
            event(log, "stream_failed", logging.WARNING, viewer=self.id, session=self.session_id,
                  code=exc.code.name, error=exc.message)
            self.send("error", message=message, fatal=True)
        self.track.finish()
        if ended is not None:
            # The frames already here still play; then every count is final and the page is told.
            await self._drained(self.gateway.config.end_grace_s)
            self._on_ended(ended)
        await asyncio.sleep(self.gateway.config.end_grace_s)  # the page closes first when it can
        await self.close(self.end_reason or "stream over")

    async def _drained(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.track.readyState == "live" and self.track.buffered_frames and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _on_started(self, started: pb.StreamStarted) -> None:
        self.session_id = started.session_id
        if started.fps and started.fps != self.track.fps and self.track.frames_sent == 0:
            self.track.fps = started.fps
        event(log, "stream_started", viewer=self.id, session=started.session_id, width=started.width,
              height=started.height, fps=started.fps, preset=started.preset)
        self.send("started", session_id=started.session_id, width=started.width, height=started.height,
                  fps=started.fps, preset=started.preset, codec=self.gateway.config.codec)

    def _on_ended(self, ended: pb.StreamEnded) -> None:
        reason = pb.StreamEnded.Reason.Name(ended.reason)
        self.end_reason = reason
        level = logging.INFO if ended.reason in OK_REASONS else logging.WARNING
        event(log, "stream_ended", level, viewer=self.id, session=self.session_id, reason=reason,
              frames=self.track.frames_sent, generated=ended.frames_sent, message=ended.message)
        self._send_stats_now()
        self.send("ended", reason=reason, message=ended.message, frames=self.track.frames_sent,
                  generated=ended.frames_sent)

    async def _send_stats(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.gateway.config.stats_interval_s)
            self._send_stats_now()

    def _send_stats_now(self) -> None:
        timing = self._last_timing
        chunk_ms = None if timing is None else round(timing.generate_ms + timing.decode_ms + timing.encode_ms, 1)
        queue_ms = None if timing is None else round(timing.queue_ms, 1)
        # "sent": [pts, ready, sent] per frame (Unix ms): the page matches them to the frames it
        # receives (RTP timestamp = pts + the sender's random offset) to time the gateway's share.
        sent = [[f.pts, round(f.ready_ms, 1), round(f.sent_ms, 1)] for f in self.track.take_log()]
        self.send("stats", **self.track.stats(), chunk_ms=chunk_ms, queue_ms=queue_ms,
                  buffered_frames=self.track.buffered_frames, sent=sent)

    async def _watch_peer(self) -> None:
        """Close the viewer when the peer stops sending RTCP receiver reports (every ~1 s from a
        live browser or aiortc): a killed browser or a cut network, which ICE consent alone would
        notice only after ~30 s."""
        timeout_s = self.gateway.config.peer_timeout_s
        last_heard = time.monotonic()
        last_stamp: datetime.datetime | None = None
        while not self.closed:
            await asyncio.sleep(_PEER_CHECK_S)
            if self.sender is None:
                continue
            stats = await self.sender.getStats()
            stamps = [s.timestamp for s in stats.values() if s.type == "remote-inbound-rtp"]
            if stamps and stamps[0] != last_stamp:
                last_stamp, last_heard = stamps[0], time.monotonic()
            silent_s = time.monotonic() - last_heard
            if silent_s > timeout_s and self.track.frames_sent:
                event(log, "peer_lost", logging.WARNING, viewer=self.id, session=self.session_id,
                      silent_s=round(silent_s, 2))
                await self.close(f"peer silent for {silent_s:.1f} s")
                return

    async def _close_unless_connected(self) -> None:
        await asyncio.sleep(self.gateway.config.connect_timeout_s)
        if not self._started:
            await self.close(f"not connected within {self.gateway.config.connect_timeout_s:g} s")

    # ------------------------------------------------------------------ tear-down
    async def close(self, reason: str) -> None:
        """Cancel the Generate call (frees the server session), close the pc; idempotent."""
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()
        self.gateway.viewers.pop(self.id, None)
        event(log, "viewer_closed", viewer=self.id, session=self.session_id, reason=reason,
              frames=self.track.frames_sent, skipped=self.track.frames_skipped,
              duration_s=round(time.monotonic() - self.created_s, 3))

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "connection": self.pc.connectionState,
                "session_id": self.session_id, "frames": self.track.frames_sent,
                "skipped": self.track.frames_skipped, "end_reason": self.end_reason}
