"""``deploy/local/run.sh`` as a subprocess for the tests: its JSON event lines, its state file, streams
through its balancer, and counts of open TCP connections (read from /proc/net/tcp, no tools needed).

nginx comes from Debian's package (``make nginx-deps`` installs it, as ``make test`` does); without it
the tests skip saying so, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clients.stream import DEFAULT_RETRY, RetryPolicy, StreamClient, StreamError, StreamRequest, StreamTrace
from streamgen.api.v1 import pb

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "deploy" / "local" / "run.sh"
# Replicas at the test preset: one torch thread each (2 cores), paced with a short lead so a 96-frame
# stream lasts ~5 s (long enough to be cut mid-run), a 1 s drain, and a 2 s wait for a StartRequest.
SERVE_ARGS = ["--preset", "test", "--random-init", "--text-encoder", "hash", "--dtype", "float32", "--threads", "1",
              "--max-lead-s", "0.5", "--drain-timeout-s", "1", "--kv-memory-mb", "16", "--max-frames", "960",
              "--stall-timeout-s", "2"]


def nginx_or_skip() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if path is None:
        reason = "nginx not installed: run 'make nginx-deps' (apt-get install nginx) to run the load-balancer tests"
        if os.environ.get("CI"):
            pytest.fail(f"the load-balancer tests must run in CI, but {reason}")
        pytest.skip(reason)
    return path


class Pool:
    """A running ``run.sh``; ``stop()`` SIGTERMs it (drain) and returns its exit code."""

    def __init__(self, run_dir: Path, replicas: int, *extra: str, serve_args: list[str] = SERVE_ARGS) -> None:
        self.run_dir = run_dir
        cmd = [str(RUN_SH), str(replicas), "--port", "0", "--base-port", "0", "--metrics-base-port", "0",
               "--run-dir", str(run_dir), *extra, "--", *serve_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self.stderr = ""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "eof"})
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def final_stderr(self, timeout_s: float = 10.0) -> str:
        """All of run.sh's stderr once it has exited (the reader thread may still be storing it when
        ``proc.wait`` returns; reading ``stderr`` then races it)."""
        self._stderr_reader.join(timeout_s)
        return self.stderr

    def wait_event(self, name: str, timeout_s: float, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for e in self.events:
                    if e["event"] == name and all(e.get(k) == v for k, v in match.items()):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.events[-1:] == [{"event": "eof"}]:
                    raise AssertionError(f"no {name} {match} within {timeout_s} s; events: {self.events}\n"
                                         f"{self.stderr[-2000:]}")
                self._changed.wait(left)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "pool.json").read_text())

    @property
    def balancer(self) -> str:
        return str(self.state["balancer"])

    def replica(self, index: int) -> dict[str, Any]:
        return dict(self.state["replicas"][index])

    def metric(self, index: int, name: str) -> float:
        text = urllib.request.urlopen(self.replica(index)["metrics_url"], timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


def established_to(port: int) -> int:
    """Open (ESTABLISHED) TCP connections on this machine whose far end is 127.0.0.1:``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                remote, state = cols[2], cols[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@dataclass
class Result:
    """One stream through the balancer, as the client saw it."""

    index: int
    frames: int = 0
    reason: str = ""
    error: StreamError | None = None
    first_frame_s: float | None = None  # time.monotonic()
    ended_s: float | None = None        # time.monotonic() of the StreamEnded or the error
    trace: StreamTrace = field(default_factory=StreamTrace)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def upstream(self) -> str:
        return self.trace.upstream


async def run_stream(target: str, result: Result, num_frames: int, *, stop: asyncio.Event | None = None,
                     retry: RetryPolicy = DEFAULT_RETRY) -> Result:
    """Stream ``num_frames`` (0 = until ``stop``) through ``target``, filling in ``result``."""
    index = result.index
    try:
        async with StreamClient(target, retry=retry) as client:
            request = StreamRequest(f"a red mug number {index}", seed=index, num_frames=num_frames, encoding="jpeg")
            async for response in client.stream(request, stop=stop, trace=result.trace):
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    result.frames += response.chunk.frame_count
                    if result.first_frame_s is None:
                        result.first_frame_s = time.monotonic()
                        result.started.set()
                elif kind == "ended":
                    result.reason = pb.StreamEnded.Reason.Name(response.ended.reason)
                    result.ended_s = time.monotonic()
    except StreamError as exc:
        result.error = exc
        result.ended_s = time.monotonic()
    result.started.set()
    return result
