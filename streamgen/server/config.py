"""The server's own settings (network, auth, encodings, drain), as one frozen, self-validating dataclass.

Engine limits (sessions, KV memory, prompt length, frames, queue wait, pacing) live in
:class:`streamgen.engine.engine.EngineConfig`; this holds only what the gRPC layer decides.
The bearer token is kept out of ``repr`` so that no log line or traceback can print it.
This module never imports grpc, torch or the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from streamgen.server.encoders import DEFAULT_CRF, DEFAULT_JPEG_QUALITY, MAX_KEYFRAME_INTERVAL


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                    # 0 = any free port (reported in the "serving" log line)
    metrics_port: int | None = 9090      # Prometheus /metrics over HTTP on ``host``; 0 = any free; None = off
    max_message_bytes: int = 8 * 2**20   # largest request message (a start image must fit)
    max_waiting: int = 16                # streams allowed to queue for admission beyond the running ones
    token: str | None = field(default=None, repr=False)  # bearer token; None = no auth
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_timeout_s: float = 20.0        # SIGTERM: how long running streams may go on before SERVER_SHUTDOWN
    stall_timeout_s: float = 60.0        # a stream whose client reads nothing for this long is cancelled
    linger_s: float = 1.0                # after StreamEnded, wait this long for the client to half-close
    max_buffered_chunks: int = 4         # per stream, between engine and network (backpressure beyond)
    keyframe_interval_s: float = 2.0     # default H.264 GOP, in seconds of video
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    h264_crf: int = DEFAULT_CRF
    max_image_pixels: int = 40_000_000   # start images larger than this are refused before decoding
    image_decode_workers: int = 2        # processes decoding start images (off the loop and the GIL); bounds their CPU
    warm_up_chunks: int = 2              # chunks of a throwaway stream run before SERVING (Engine.warm_up); 0 = none

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must lie in [0, 65535] (or be disabled), got {self.metrics_port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.warm_up_chunks < 0:
            raise ValueError(f"warm_up_chunks must be >= 0, got {self.warm_up_chunks}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("the bearer token must be non-empty and contain no whitespace")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both a TLS certificate and key, or neither")
        for name in ("drain_timeout_s", "stall_timeout_s", "linger_s", "keyframe_interval_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_buffered_chunks < 1:
            raise ValueError(f"max_buffered_chunks must be >= 1, got {self.max_buffered_chunks}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if not 0 <= self.h264_crf <= 51:
            raise ValueError(f"h264_crf must lie in [0, 51], got {self.h264_crf}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be > 0, got {self.max_image_pixels}")
        if self.image_decode_workers < 1:
            raise ValueError(f"image_decode_workers must be >= 1, got {self.image_decode_workers}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def default_keyframe_interval(self, fps: int) -> int:
        return max(1, min(MAX_KEYFRAME_INTERVAL, round(self.keyframe_interval_s * fps)))
