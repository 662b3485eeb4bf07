"""A WebRTC video track fed with generated frames, paced on the stream's fps.

Frames arrive from the server in chunks (12 frames at once for the 4x temporal VAE); the track
hands them to aiortc's encoder one at a time on the playback clock: frame ``n`` is due at
``t0 + n / fps`` and carries ``pts = n * 90000 / fps`` in the 90 kHz RTP video clock
(``time_base = 1/90000``), so the browser's jitter buffer sees exact spacing. When a frame is
late (generation or the network stalled for more than a frame), it goes out at once and the clock
is shifted by the delay: pts then grow by the wall time that really passed, later frames keep
their spacing from there, and a stall never turns into a burst.

The buffer in front of the clock is bounded: a full buffer makes :meth:`GeneratedVideoTrack.put`
wait, which stops the gateway reading from gRPC, which makes the server pause the session.

This module knows nothing of gRPC, the page or the data channel.
"""

from __future__ import annotations

import asyncio
import collections
import time
from fractions import Fraction

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)
_STATS_WINDOW_S = 2.0


class GeneratedVideoTrack(MediaStreamTrack):
    """``put()`` frames ``np.uint8 [N, H, W, 3]``; aiortc pulls them through ``recv()`` at ``fps``."""

    kind = "video"

    def __init__(self, fps: int, max_buffered_frames: int) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if max_buffered_frames <= 0:
            raise ValueError(f"max_buffered_frames must be > 0, got {max_buffered_frames}")
        self.fps = fps
        self.max_buffered_frames = max_buffered_frames
        # (frame, arrival time) or None at the end. Unbounded as a container; put() bounds it, so that
        # finish() can always append its end marker without waiting.
        self._queue: asyncio.Queue[tuple[np.ndarray, float] | None] = asyncio.Queue()
        self._space = asyncio.Event()
        self._t0: float | None = None          # loop time frame 0 was due
        self._frames_sent = 0
        self._stall_ticks = 0                  # 90 kHz ticks the clock was shifted by late frames
        self.created_s = time.monotonic()
        self.first_frame_s: float | None = None
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (sent_s, age_s)

    # ------------------------------------------------------------------ producer side
    async def put(self, frames: np.ndarray) -> None:
        """Queue ``frames`` (``[N, H, W, 3]`` uint8); waits while the buffer is full."""
        now = time.monotonic()
        for frame in frames:
            while self._queue.qsize() >= self.max_buffered_frames:
                self._space.clear()
                await self._space.wait()
            self._queue.put_nowait((frame, now))

    def finish(self) -> None:
        """No more frames: the track ends once the buffered ones are sent."""
        self._queue.put_nowait(None)

    # ------------------------------------------------------------------ aiortc side
    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._queue.get()
        self._space.set()
        if item is None:
            self.stop()
            raise MediaStreamError
        frame, arrived_s = item
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._frames_sent / self.fps + self._stall_ticks / VIDEO_CLOCK_HZ
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 1 / self.fps:
            self._stall_ticks += round((now - due) * VIDEO_CLOCK_HZ)
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = round(self._frames_sent * VIDEO_CLOCK_HZ / self.fps) + self._stall_ticks
        video_frame.time_base = VIDEO_TIME_BASE
        self._frames_sent += 1
        sent_s = time.monotonic()
        if self.first_frame_s is None:
            self.first_frame_s = sent_s
        self._recent.append((sent_s, sent_s - arrived_s))
        while self._recent and self._recent[0][0] < sent_s - _STATS_WINDOW_S:
            self._recent.popleft()
        return video_frame

    # ------------------------------------------------------------------ numbers for the page
    @property
    def frames_sent(self) -> int:
        return self._frames_sent

    @property
    def buffered_frames(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, float | int | None]:
        """Frames sent, send rate over the last two seconds, how long frames waited in the gateway
        (arrival from gRPC -> handed to the encoder, mean over the same window), and the time from
        the track's creation to its first frame."""
        now = time.monotonic()
        recent = [(t, age) for t, age in self._recent if t >= now - _STATS_WINDOW_S]
        fps = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            fps = (len(recent) - 1) / (recent[-1][0] - recent[0][0])
        buffer_ms = 1000 * sum(age for _, age in recent) / len(recent) if recent else None
        ttff_ms = None if self.first_frame_s is None else 1000 * (self.first_frame_s - self.created_s)
        return {"frames": self._frames_sent, "fps": round(fps, 2),
                "buffer_ms": None if buffer_ms is None else round(buffer_ms, 1),
                "ttff_ms": None if ttff_ms is None else round(ttff_ms, 1),
                "stalls_ms": round(1000 * self._stall_ticks / VIDEO_CLOCK_HZ, 1)}
