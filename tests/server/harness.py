"""Test harness: tiny engines and an in-process server on 127.0.0.1 (free ports), shared by tests/server
and tests/clients.

The server runs on its own event loop in a background thread, as it would in ``streamgen serve``;
tests talk to it over real loopback sockets with the sync gRPC API, the async client library,
or a client subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from streamgen.config import Preset, get_preset
from streamgen.engine.engine import AsyncEngine, Engine
from streamgen.engine.request import GenerationRequest
from streamgen.server.app import StreamGenServer
from streamgen.server.config import ServerConfig
from tests.conftest import make_tiny_engine

T = TypeVar("T")
PRESET: Preset = get_preset("test")


def make_engine(**config: Any) -> Engine:
    """The test preset with seeded random weights (the zero-initialised head perturbed, so frames carry
    texture instead of flat grey); float32 so two engines built alike produce identical frames."""
    defaults: dict[str, Any] = {"max_frames": 96, "unbounded_max_frames": 96}
    return make_tiny_engine(PRESET, **{**defaults, **config})


def reference_frames(prompt: str, seed: int, num_frames: int) -> np.ndarray:
    """What the engine alone generates for this request: ``np.uint8 [num_frames, H, W, 3]``."""
    engine = make_engine()
    sid = engine.add_request(GenerationRequest(prompt, seed=seed, num_frames=num_frames))
    chunks = engine.run_until_done()[sid]
    return np.concatenate([c.frames for c in chunks])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class ServerHarness:
    """A :class:`StreamGenServer` on a background event loop; ``close()`` (or leaving ``with``) stops it.

    A module's server fixture is then three lines::

        @pytest.fixture(scope="module")
        def server() -> Iterator[ServerHarness]:
            with ServerHarness(make_engine(max_lead_s=0.5)) as harness:
                yield harness
    """

    def __init__(self, engine: Engine | None = None, config: ServerConfig | None = None,
                 max_buffered_chunks: int = 4) -> None:
        self.engine = engine if engine is not None else make_engine()
        self.config = config if config is not None else ServerConfig(port=0, metrics_port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.async_engine = AsyncEngine(self.engine, max_buffered_chunks=max_buffered_chunks)
        self.server = StreamGenServer(self.async_engine, self.config, weights="test weights",
                                      poll_interval_s=0.05)
        self.run(self.server.start())

    def __enter__(self) -> ServerHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the /metrics page, e.g. ``metric("streamgen:kv_cache_used_bytes")``."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise KeyError(f"{name}{{{labels}}} not on /metrics")
        return float(match.group(1))

    def wait_metric(self, name: str, predicate: Any, timeout_s: float, labels: str = "") -> float:
        """Poll /metrics until ``predicate(value)``; returns the seconds it took (raises on timeout)."""
        start = time.monotonic()
        while True:
            value = self.metric(name, labels)
            if predicate(value):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"{name} = {value} after {timeout_s} s")
            time.sleep(0.02)

    def close(self) -> None:
        try:
            self.run(self.server.stop(grace_s=0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


def with_config(**changes: Any) -> ServerConfig:
    return dataclasses.replace(ServerConfig(port=0, metrics_port=0), **changes)


class ServeLog:
    """The stderr of a ``streamgen serve`` subprocess (JSON logs), drained on a thread from the start so the
    server never blocks on a full pipe. ``wait_serving()`` returns the "serving" event (its bound address);
    ``join()`` after the process ended makes ``lines`` complete."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None, "start the server with stderr=subprocess.PIPE, text=True"
        self.proc = proc
        self.lines: list[str] = []
        self._serving: dict[str, object] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"event": "serving"' in line and not self._ready.is_set():
                self._serving = json.loads(line)
                self._ready.set()

    def wait_serving(self, timeout_s: float) -> dict[str, object]:
        if not self._ready.wait(timeout_s):
            self.proc.kill()
            raise AssertionError(f"server did not report serving within {timeout_s} s: {''.join(self.lines[-10:])}")
        return self._serving

    def join(self, timeout_s: float = 10.0) -> None:
        self._thread.join(timeout_s)
