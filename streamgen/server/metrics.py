"""Prometheus metrics with vLLM-style names (``streamgen:*``), served over HTTP at ``/metrics``.

Gauges of engine state (sessions running/waiting, KV pool usage) are refreshed from a snapshot
taken *on the engine thread* (``AsyncEngine.call``) every ``poll_interval_s``, so a scrape never
reads the pool while a step mutates it. Stream-level series (time to first frame, inter-chunk
latency, frames, bytes, outcomes) are recorded by the servicer as chunks are sent.

Each :class:`Metrics` has its own registry (several servers can live in one test process), so the
standard collectors prometheus_client puts in its global registry are added to it by hand:
``process_*`` (resident memory, CPU seconds, open file descriptors, start time), ``python_info``
and ``python_gc_*``, which dashboards and alerts expect from any Python exporter.
This module never changes engine state and never records prompts, tokens or peers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

# Outcome label values of streamgen:request_outcome_total (a fixed set: bounded cardinality).
OUTCOMES = ("completed", "stopped", "limit", "shutdown", "error", "cancelled", "stalled", "invalid_argument",
            "failed_precondition", "resource_exhausted", "unavailable", "unauthenticated")

# Path label values of streamgen:paged_attention_calls_total.
PAGED_PATHS = ("direct", "gathered", "split")

_TTFF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0)
_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class EngineSnapshot:
    num_running: int
    num_waiting: int
    kv_usage: float       # fraction of usable KV blocks handed out, 0..1
    kv_used_bytes: int
    kv_total_bytes: int
    # Cumulative paged-attention calls of the KV manager (PoolUsage.paged_direct_calls / _gathered_calls).
    paged_direct_calls: int = 0
    paged_gathered_calls: int = 0
    paged_split_calls: int = 0


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # reads /proc/self; exports nothing where there is no /proc
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.sessions_running = Gauge("streamgen:num_sessions_running", "Sessions generating in the engine",
                                      registry=r)
        self.sessions_waiting = Gauge("streamgen:num_sessions_waiting", "Sessions queued for KV-pool admission",
                                      registry=r)
        self.streams_active = Gauge("streamgen:num_streams_active", "Open Generate calls (any state)", registry=r)
        self.kv_usage = Gauge("streamgen:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)",
                              registry=r)
        self.kv_used_bytes = Gauge("streamgen:kv_cache_used_bytes", "Bytes of KV-cache blocks in use", registry=r)
        self.kv_total_bytes = Gauge("streamgen:kv_cache_total_bytes", "Bytes of the KV-cache pool", registry=r)
        self.draining = Gauge("streamgen:server_draining", "1 while the server drains after SIGTERM", registry=r)
        self.ttff = Histogram("streamgen:time_to_first_frame_seconds",
                              "From StartRequest to the first FrameChunk handed to gRPC", buckets=_TTFF_BUCKETS,
                              registry=r)
        self.inter_chunk = Histogram("streamgen:inter_chunk_latency_seconds",
                                     "Between consecutive FrameChunks of one stream", buckets=_GAP_BUCKETS, registry=r)
        self.frames = Counter("streamgen:frames_generated_total", "Pixel frames sent to clients", registry=r)
        self.bytes_sent = Counter("streamgen:stream_bytes_sent_total", "Encoded payload bytes sent",
                                  labelnames=("encoding",), registry=r)
        self.outcomes = Counter("streamgen:request_outcome_total", "Generate calls by how they ended",
                                labelnames=("reason",), registry=r)
        for outcome in OUTCOMES:  # export zeros, so rate() works from the first scrape
            self.outcomes.labels(reason=outcome)
        self.paged_calls = Counter("streamgen:paged_attention_calls_total",
                                   "Attention calls over paged K/V: direct = the kernel read the pages in place, "
                                   "gathered = they were copied into dense K/V first, split = fully visible "
                                   "pages read in place and the few partially visible ones gathered",
                                   labelnames=("path",),
                                   registry=r)
        self._paged_calls_seen = {path: 0 for path in PAGED_PATHS}
        for path in PAGED_PATHS:
            self.paged_calls.labels(path=path)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe_engine(self, snap: EngineSnapshot) -> None:
        self.sessions_running.set(snap.num_running)
        self.sessions_waiting.set(snap.num_waiting)
        self.kv_usage.set(snap.kv_usage)
        self.kv_used_bytes.set(snap.kv_used_bytes)
        self.kv_total_bytes.set(snap.kv_total_bytes)
        # The engine keeps cumulative counts; a Prometheus counter only goes up, so add what is new.
        for path, total in (("direct", snap.paged_direct_calls), ("gathered", snap.paged_gathered_calls),
                            ("split", snap.paged_split_calls)):
            delta = total - self._paged_calls_seen[path]
            if delta > 0:
                self.paged_calls.labels(path=path).inc(delta)
            self._paged_calls_seen[path] = max(total, self._paged_calls_seen[path])

    def outcome(self, reason: str) -> None:
        if reason not in OUTCOMES:
            raise ValueError(f"unknown outcome {reason!r}; valid: {', '.join(OUTCOMES)}")
        self.outcomes.labels(reason=reason).inc()

    def serve_http(self, host: str, port: int) -> int:
        """Start ``/metrics`` on ``host:port`` (0 = any free port) in a daemon thread; returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
