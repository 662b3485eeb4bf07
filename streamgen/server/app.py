"""Assemble and run the server: engine + servicer + health + reflection + auth + TLS + /metrics + drain.

:class:`StreamGenServer` owns one ``grpc.aio`` server around an :class:`AsyncEngine` (tests build
it in-process with their own tiny engine); :func:`run` is ``streamgen serve``: build the engine
from checkpoints (or random weights), serve, and on SIGTERM/SIGINT drain - health NOT_SERVING,
refuse new streams (UNAVAILABLE), let running ones go on for ``drain_timeout_s``, end the rest
with REASON_SERVER_SHUTDOWN, stop, exit 0.

This module wires components together; it must never hold per-stream logic (servicer) or
generation behaviour (engine), and it never loads a model: :mod:`streamgen.engine.factory` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from streamgen.api.v1 import SERVICE_NAME, pb, pb_grpc
from streamgen.engine.engine import AsyncEngine, EngineConfig
from streamgen.engine.factory import ModelSource, build_engine
from streamgen.server import logs
from streamgen.server.auth import BearerTokenInterceptor
from streamgen.server.config import ServerConfig
from streamgen.server.logs import event
from streamgen.server.metrics import EngineSnapshot, Metrics
from streamgen.server.reflection import enable_server_reflection, reflection_services
from streamgen.server.servicer import StreamGenServicer
from streamgen.server.wire import TolerantDeserializers, request_type_names

log = logging.getLogger("streamgen.server")

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class StreamGenServer:
    """One gRPC server process-worth of serving around ``engine`` (start, drain, stop)."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, weights: str = "unknown",
                 poll_interval_s: float = 0.1) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self.servicer = StreamGenServicer(engine, config, self.metrics, weights)
        self.health = health.aio.HealthServicer()
        self.poll_interval_s = poll_interval_s
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._poll: asyncio.Task[None] | None = None
        self._warm: asyncio.Task[bool] | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return _hostport(self.config.host, self.port)

    async def start(self) -> None:
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            # Find clients that vanished without a TCP reset (a cable pull) so their pages come back.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if cfg.token is not None:
            interceptors.append(BearerTokenInterceptor(cfg.token, on_refused=lambda: self.metrics.outcome(
                "unauthenticated")))
        # A request that does not parse reaches the servicer as a value (INVALID_ARGUMENT there), not
        # as an exception inside grpc (UNKNOWN, "Unexpected <class ...>", ERROR tracebacks); health
        # and reflection, which are not ours, are refused with INVALID_ARGUMENT before they see it.
        foreign = (health_pb2.DESCRIPTOR.services_by_name["Health"], *reflection_services())
        type_names = request_type_names(pb.DESCRIPTOR.services_by_name["StreamGen"])
        for service in foreign:
            type_names.update(request_type_names(service))
        interceptors.append(TolerantDeserializers((f"/{SERVICE_NAME}/",), type_names,
                                                  guarded=tuple(f"/{s.full_name}/" for s in foreign)))
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_StreamGenServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME], server)
        address = _hostport(cfg.host, cfg.port)
        try:
            if cfg.tls:
                assert cfg.tls_cert is not None and cfg.tls_key is not None
                creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise ValueError(f"cannot listen on {address} (in use?)")
        self.port = port
        self._server = server
        await server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.host, cfg.metrics_port)
        self._poll = asyncio.create_task(self._poll_engine(), name="streamgen-metrics-poll")
        # Start the image-decoding processes now, in the background: the first upload finds them up.
        self._warm = asyncio.create_task(asyncio.to_thread(self.servicer.images.start), name="streamgen-image-warm")
        e = self.engine.engine
        event(log, "serving", address=self.address, tls=cfg.tls, auth=cfg.token is not None,
              metrics=None if self.metrics_port is None else f"http://{_hostport(cfg.host, self.metrics_port)}/metrics",
              preset=e.preset.name, weights=self.servicer.weights, max_sessions=e.config.max_sessions,
              kv_bytes=e.kv.usage().total_bytes, paced=e.config.max_lead_s != float("inf"))
        for name in ("", SERVICE_NAME):  # last: a probe that sees SERVING finds the log line above
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _poll_engine(self) -> None:
        e = self.engine.engine

        def snapshot() -> EngineSnapshot:
            u = e.kv.usage()
            return EngineSnapshot(e.num_running, e.num_waiting, u.usage, u.used_bytes, u.total_bytes,
                                  u.paged_direct_calls, u.paged_gathered_calls, u.paged_split_calls)

        while True:
            self.metrics.observe_engine(await self.engine.call(snapshot))
            await asyncio.sleep(self.poll_interval_s)

    async def drain_and_stop(self) -> None:
        """Graceful shutdown (see the module docstring); returns when everything is stopped."""
        start = time.monotonic()
        event(log, "draining", timeout_s=self.config.drain_timeout_s, streams=len(self.servicer._calls))
        await self.health.enter_graceful_shutdown()
        ended = await self.servicer.drain(self.config.drain_timeout_s)
        # Every call has ended or been cancelled by now: the grace only lets their statuses go out.
        await self.stop(grace_s=0.25)
        event(log, "stopped", ended_early=ended, drain_s=round(time.monotonic() - start, 3))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving now (``grace_s`` for in-flight RPCs), then the engine and /metrics."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
            self._poll = None
        self.servicer.close()
        if self._warm is not None:  # returns False at once once the pool is closed
            await self._warm
            self._warm = None
        await asyncio.to_thread(self.engine.shutdown)
        self.metrics.stop_http()


# ---------------------------------------------------------------------------------------- streamgen serve


async def serve_until_signal(server: StreamGenServer) -> None:
    """Start, wait for SIGTERM or SIGINT, drain. A second signal during the drain kills the process."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.drain_and_stop()


def run(source: ModelSource, engine_config: EngineConfig, server_config: ServerConfig, *, log_format: str = "json",
        log_level: str = "info") -> int:
    """``streamgen serve``: serves until SIGTERM/SIGINT, drains, then ends the process with exit code 0.

    After a clean drain everything is stopped and flushed, so the process exits at once instead of
    returning: the interpreter's teardown of torch and grpc takes ~0.5 s of CPU (seconds on a busy
    machine), and it would count against the orchestrator's grace period for nothing.
    """
    logs.configure(log_format, log_level)
    t0 = time.monotonic()
    engine, weights = build_engine(source, engine_config, lambda name, **fields: event(log, name, **fields))
    event(log, "engine_ready", preset=engine.preset.name, weights=weights, load_s=round(time.monotonic() - t0, 2))
    if server_config.warm_up_chunks:  # before SERVING: the first client does not pay the one-time costs
        event(log, "warm_up", chunks=server_config.warm_up_chunks,
              seconds=round(engine.warm_up(server_config.warm_up_chunks), 2))
    async_engine = AsyncEngine(engine, max_buffered_chunks=server_config.max_buffered_chunks)
    server = StreamGenServer(async_engine, server_config, weights)
    asyncio.run(serve_until_signal(server))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
