"""A WebRTC video track fed with generated frames, played at the live edge on the stream's fps.

Frames arrive from the server in chunks (12 frames at once for the 4x temporal VAE). Frame ``i`` of
a chunk that arrived at ``t`` is *ready* at ``t + i / fps``: the earliest moment it can be shown
while the chunk plays at its rate. The track hands frames to aiortc's encoder one at a time, each
at ``max(ready, previous + 1 / fps)``, and stamps it with the 90 kHz RTP video clock
(``time_base = 1/90000``): one frame interval after the previous frame when on time, the wall
time that really passed after a stall, so the browser's jitter buffer sees exact spacing and a
stall never turns into a burst.

Live edge. A paced server still runs up to its ``max_lead_s`` ahead of real time (2 s by default,
to absorb generation hiccups), and its first chunks come in a burst; a player that plays every
frame on its own clock inherits that lead as delay (the server pacing, then the gateway pacing
again). Here a frame that would go out more than ``max_lag_s`` after it was ready, while a newer
frame is already waiting, is skipped instead: the track catches up with what the server sends
and stays there. Skips happen at the start (the burst) and after a stall, and are counted.

The buffer is bounded: a full buffer makes :meth:`GeneratedVideoTrack.put` wait, which stops the
gateway reading from gRPC, which makes an unpaced server pause the session (backpressure).

This module knows nothing of gRPC, the page or the data channel.
"""

from __future__ import annotations

import asyncio
import collections
import math
import statistics
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)
DEFAULT_MAX_LAG_S = 0.1
_STATS_WINDOW_S = 2.0


@dataclass(frozen=True)
class SentFrame:
    """One frame handed to the encoder: its RTP pts and when it was ready / sent (Unix time, ms)."""

    pts: int
    ready_ms: float
    sent_ms: float


class GeneratedVideoTrack(MediaStreamTrack):
    """``put()`` frames ``np.uint8 [N, H, W, 3]``; aiortc pulls them through ``recv()`` at ``fps``."""

    kind = "video"

    def __init__(self, fps: int, max_buffered_frames: int, max_lag_s: float = DEFAULT_MAX_LAG_S) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if max_buffered_frames <= 0:
            raise ValueError(f"max_buffered_frames must be > 0, got {max_buffered_frames}")
        if not max_lag_s >= 0:
            raise ValueError(f"max_lag_s must be >= 0, got {max_lag_s}")
        self.fps = fps
        self.max_buffered_frames = max_buffered_frames
        self.max_lag_s = max_lag_s
        # (frame, ready time) in time.monotonic() seconds, or None at the end.
        self._queue: collections.deque[tuple[np.ndarray, float] | None] = collections.deque()
        self._changed = asyncio.Event()        # something was put or taken
        self._next_due: float | None = None    # the earliest the next frame may go out
        self._pts = 0
        self._frames_sent = 0
        self._frames_skipped = 0
        self._stall_ticks = 0                  # 90 kHz ticks the clock was shifted by late frames
        self.created_s = time.monotonic()
        self.first_frame_s: float | None = None
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (sent_s, lag_s)
        self._log: list[SentFrame] = []

    # ------------------------------------------------------------------ producer side
    async def put(self, frames: np.ndarray, arrived_s: float | None = None) -> None:
        """Queue ``frames`` (``[N, H, W, 3]`` uint8) that arrived at ``arrived_s`` (time.monotonic(),
        default now); waits while the buffer is full."""
        arrived_s = time.monotonic() if arrived_s is None else arrived_s
        for i, frame in enumerate(frames):
            while self._buffered() >= self.max_buffered_frames:
                self._changed.clear()
                await self._changed.wait()
            self._queue.append((frame, arrived_s + i / self.fps))
            self._changed.set()

    def finish(self) -> None:
        """No more frames: the track ends once the buffered ones are sent."""
        self._queue.append(None)
        self._changed.set()

    def _buffered(self) -> int:
        return len(self._queue) - (1 if self._queue and self._queue[-1] is None else 0)

    # ------------------------------------------------------------------ aiortc side
    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        item = self._take()
        if item is None:
            self.stop()
            raise MediaStreamError
        frame, ready_s = item
        now = time.monotonic()
        if self._next_due is None:
            self._next_due = now
        due = max(self._next_due, ready_s)
        if due > now:
            await asyncio.sleep(due - now)
        now = time.monotonic()
        step_ticks = VIDEO_CLOCK_HZ / self.fps
        if self._frames_sent:
            late_ticks = max(0.0, (due - self._next_due) * VIDEO_CLOCK_HZ)
            if now - due > 1 / self.fps:          # the loop itself was late: the wall time passed counts
                late_ticks += (now - due) * VIDEO_CLOCK_HZ
                due = now
            self._stall_ticks += round(late_ticks)
            self._pts += round(step_ticks + late_ticks)
        self._next_due = due + 1 / self.fps
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self._pts
        video_frame.time_base = VIDEO_TIME_BASE
        self._frames_sent += 1
        if self.first_frame_s is None:
            self.first_frame_s = now
        lag_s = now - ready_s
        self._recent.append((now, lag_s))
        while self._recent and self._recent[0][0] < now - _STATS_WINDOW_S:
            self._recent.popleft()
        wall_ms = 1000 * time.time()
        self._log.append(SentFrame(self._pts, wall_ms - 1000 * lag_s, wall_ms))
        return video_frame

    def _take(self) -> tuple[np.ndarray, float] | None:
        """The next frame to send: the head of the queue, unless it is over ``max_lag_s`` behind and a
        newer frame waits behind it (then the head is skipped)."""
        item = self._queue.popleft()
        while item is not None and len(self._queue) >= 1 and self._queue[0] is not None:
            due = max(self._next_due if self._next_due is not None else time.monotonic(), item[1])
            if due - item[1] <= self.max_lag_s:
                break
            self._frames_skipped += 1
            item = self._queue.popleft()
        self._changed.set()
        return item

    # ------------------------------------------------------------------ numbers for the page
    @property
    def frames_sent(self) -> int:
        """Frames handed to the encoder: *the* frame count of a viewer (stats, status, logs)."""
        return self._frames_sent

    @property
    def frames_skipped(self) -> int:
        return self._frames_skipped

    @property
    def buffered_frames(self) -> int:
        return self._buffered()

    def take_log(self) -> list[SentFrame]:
        """The frames sent since the last call (for the page's latency measurement)."""
        log, self._log = self._log, []
        return log

    def stats(self) -> dict[str, float | int | None]:
        """Frames sent and skipped, send rate over the last two seconds, how long frames waited in the
        gateway past their ready time (median over the same window), and the time from the track's
        creation to its first frame."""
        now = time.monotonic()
        recent = [(t, lag) for t, lag in self._recent if t >= now - _STATS_WINDOW_S]
        fps = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            fps = (len(recent) - 1) / (recent[-1][0] - recent[0][0])
        lag_ms = 1000 * statistics.median(lag for _, lag in recent) if recent else None
        ttff_ms = None if self.first_frame_s is None else 1000 * (self.first_frame_s - self.created_s)
        return {"frames": self._frames_sent, "skipped": self._frames_skipped, "fps": round(fps, 2),
                "pacing_ms": None if lag_ms is None or not math.isfinite(lag_ms) else round(lag_ms, 1),
                "ttff_ms": None if ttff_ms is None else round(ttff_ms, 1),
                "stalls_ms": round(1000 * self._stall_ticks / VIDEO_CLOCK_HZ, 1)}
