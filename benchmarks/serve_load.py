"""Serving under load: N concurrent streaming clients against one ``streamgen serve`` on loopback.

    python benchmarks/serve_load.py                                # 4 clients x 20 s, test preset, paced
    python benchmarks/serve_load.py --preset default --clients 4 --duration-s 30
    python benchmarks/serve_load.py --server 127.0.0.1:50051       # an already running server (no RSS)
    deploy/local/run.sh 3 -- --preset test --random-init --text-encoder hash &
    python benchmarks/serve_load.py --target 127.0.0.1:50050 --clients 9   # replicas behind a load balancer

Unless ``--server`` is given, the script starts ``streamgen serve`` itself (random weights, the
chosen preset, ``--max-sessions`` = clients, a free port), waits for health SERVING, runs every
client for ``--duration-s`` (unbounded streams ended with a StopRequest), then SIGTERMs the server
and checks it drained with exit 0. All traffic stays on 127.0.0.1 and the run is bounded in time.

Printed: one JSON document, then a short table.

* ``fps``: frames a stream received / its wall time (per stream: min, p50). Paced streams should
  sit at the playback fps (a little above: the first ``max_lead_s`` arrive at once);
  ``realtime_factor`` = p50 fps / playback fps (>= 1 means no stream fell behind).
* ``fps_spread``: (fastest - slowest stream's fps) / median; ``fair`` when <= 0.10, i.e. more
  streams than the machine can serve in real time all slow down alike.
* ``ttff_s``: StartRequest -> first chunk received, p50 / p95 over streams.
* ``inter_chunk_p95_s``: gap between consecutive chunks of a stream, p95 over all gaps.
* ``errors``: streams that did not end with REASON_STOPPED / COMPLETED / LIMIT (target: 0).
* ``per_replica_streams``: streams that ran, per replica, as the balancer names it in its
  ``x-streamgen-upstream`` header (deploy/local/nginx.conf.template); ``unknown`` without one.
* ``start_refusals``: starts a replica refused (UNAVAILABLE draining, RESOURCE_EXHAUSTED full);
  ``start_retries``: those the client retried (``clients.stream.RetryPolicy``); ``streams_refused``:
  streams still refused after every retry (they count in ``errors`` too, not in ``fps``).
* ``server_ms_per_chunk``: the server's own timing of a chunk (transformer forwards, VAE decode,
  H.264 encode), means over all chunks: where the time goes when streams fall behind.
* ``rss_mib``: the server's resident memory idle after start, idle after a short warm-up load
  (same clients, ``--warmup-s``: allocator pools, codec tables), and idle after the measured load.
  KV pool and weights are allocated at start, so growth from warm-up to the end beyond
  ``RSS_GROWTH_BOUND_MIB`` is flagged as a leak (``rss_ok``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from clients.stream import OK_REASONS, RETRYABLE_CODES, StreamClient, StreamError, StreamRequest, StreamTrace
from streamgen.api.v1 import pb
from streamgen.config import ATTENTION_CHOICES
from streamgen.device import DEVICE_HELP, resolve_device
from streamgen.server.health import check

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_trees import AVX2_CAPS, cpu_description  # noqa: E402  (a sibling script)

RSS_GROWTH_BOUND_MIB = 100.0
FAIR_SPREAD = 0.10  # issue 17: with more streams than the machine serves in real time, each within 10 % of the others
PROMPTS = ["a glossy red bottle turning slowly on a white table", "a matte blue mug on a wooden table",
           "a green can on a kitchen counter, camera zooming in", "a white box in a dark studio"]


@dataclass
class StreamStats:
    index: int
    start_s: float = 0.0
    first_chunk_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    frames: int = 0
    playback_fps: int = 0
    generate_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)
    reason: str = ""
    error: str = ""
    upstream: str = ""    # the replica, from the balancer's header ("" without one)
    retries: int = 0      # refused starts retried before this stream ran (or gave up)
    refused: bool = False  # still refused after every retry

    @property
    def fps(self) -> float:
        if not self.chunk_s:
            return 0.0
        return self.frames / (self.chunk_s[-1] - self.start_s)


async def run_client(address: str, index: int, duration_s: float, encoding: str) -> StreamStats:
    stats = StreamStats(index)
    stop = asyncio.Event()
    request = StreamRequest(PROMPTS[index % len(PROMPTS)], seed=index, num_frames=0, encoding=encoding)
    loop = asyncio.get_running_loop()
    loop.call_later(duration_s, stop.set)
    stats.start_s = time.monotonic()
    trace = StreamTrace()
    try:
        async with StreamClient(address) as client:
            async for response in client.stream(request, stop=stop, trace=trace):
                kind = response.WhichOneof("response")
                if kind == "started":
                    stats.playback_fps = response.started.fps
                elif kind == "chunk":
                    now = time.monotonic()
                    stats.first_chunk_s = stats.first_chunk_s or now
                    stats.chunk_s.append(now)
                    stats.frames += response.chunk.frame_count
                    timing = response.chunk.timing
                    stats.generate_ms.append(timing.generate_ms)
                    stats.decode_ms.append(timing.decode_ms)
                    stats.encode_ms.append(timing.encode_ms)
                elif kind == "ended":
                    stats.reason = pb.StreamEnded.Reason.Name(response.ended.reason)
                    if response.ended.reason not in OK_REASONS:
                        stats.error = f"{stats.reason}: {response.ended.message}"
    except StreamError as exc:
        stats.error = str(exc)
        stats.refused = exc.code in RETRYABLE_CODES and stats.first_chunk_s is None
    stats.upstream = trace.upstream
    stats.retries = len(trace.refusals)
    return stats


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, dict[str, Any]]:
    """Start ``streamgen serve``; its process, address and start-up choices (the ``linear`` event's fields)."""
    cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--preset", args.preset, "--random-init",
           "--text-encoder", args.text_encoder, "--port", "0", "--metrics-port", "-1",
           "--max-sessions", str(args.clients), "--kv-memory-mb", str(args.kv_memory_mb),
           "--drain-timeout-s", "5", "--dtype", args.dtype, "--device", args.device,
           "--attention", args.attention, "--linear", args.linear]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.pace:
        cmd.append("--no-pace")
    env = {**os.environ, **AVX2_CAPS} if args.emulate_avx2 else None
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    found: dict[str, Any] = {}
    choices: dict[str, Any] = {}

    def read_log() -> None:  # keeps draining stderr for the whole run, so the server never blocks on it
        assert proc.stderr is not None
        for line in proc.stderr:
            if not choices and '"event": "linear"' in line:
                event = json.loads(line)
                choices.update(linear={"kernel": event.get("kernel"), "reason": event.get("reason")})
            if not found and '"event": "serving"' in line:
                found.update(json.loads(line))

    threading.Thread(target=read_log, daemon=True).start()
    deadline = time.monotonic() + 180
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("streamgen serve did not start")
        time.sleep(0.1)
    return proc, str(found["address"]), choices


def fps_spread(fps: list[float]) -> float:
    """(fastest - slowest stream) / median stream fps: 0 when every stream got the same rate."""
    if not fps:
        return math.nan
    median = statistics.median(fps)
    return (max(fps) - min(fps)) / median if median > 0 else math.inf


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else math.nan


async def model_info(address: str) -> pb.ModelInfo:
    async with StreamClient(address) as client:
        return await client.model_info()


async def load(address: str, clients: int, duration_s: float, encoding: str) -> list[StreamStats]:
    return list(await asyncio.gather(*(run_client(address, i, duration_s, encoding) for i in range(clients))))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent streams (default: 4)")
    parser.add_argument("--duration-s", type=float, default=20.0, help="seconds each stream runs (default: 20)")
    parser.add_argument("--preset", default="test", help="server preset when the script starts it (default: test)")
    parser.add_argument("--encoding", default="h264", choices=["h264", "h264-annexb", "jpeg", "raw"])
    parser.add_argument("--pace", action=argparse.BooleanOptionalAction, default=True,
                        help="server paces streams to playback (default) or runs flat out (--no-pace)")
    parser.add_argument("--text-encoder", default="hash", choices=["hash", "minilm"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=0, help="server torch threads (0 = default)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                        help="server attention backend, as `streamgen serve --attention` (default: auto)")
    parser.add_argument("--linear", default="auto", choices=["auto", "onednn", "aten"],
                        help="server linear-layer kernel, as `streamgen serve --linear` (default: auto)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="start the server with ATen/oneDNN/MKL capped at AVX2 and --dtype auto meaning float32: "
                             "an AVX2-only CPU's kernels on this machine (as benchmarks/engine.py --emulate-avx2)")
    parser.add_argument("--device", default="auto", help="server device when the script starts it: " + DEVICE_HELP)
    parser.add_argument("--kv-memory-mb", type=float, default=256)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="warm-up load before measuring (default: 3)")
    parser.add_argument("--server", "--target", dest="server",
                        help="use this running server or load balancer instead of starting one (no RSS figures)")
    args = parser.parse_args(argv)
    if args.clients < 1 or not 0 < args.duration_s <= 600:
        parser.error("--clients must be >= 1 and --duration-s in (0, 600]")
    if args.emulate_avx2 and args.server is not None:
        parser.error("--emulate-avx2 applies to the server this script starts; drop --server/--target")
    if args.emulate_avx2 and args.dtype == "auto":
        args.dtype = "float32"  # what auto picks on an AVX2-only CPU

    proc = None
    server_choices: dict[str, Any] = {}
    address = args.server
    if address is None:
        try:  # one line and exit 2 now, rather than "did not start" after the server's own exit 2
            resolve_device(args.device)
        except ValueError as exc:
            print(f"benchmarks/serve_load.py: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        proc, address, server_choices = start_server(args)
    if check(address) != "SERVING":
        raise RuntimeError(f"{address} is not SERVING")
    info = asyncio.run(model_info(address))  # what actually serves (behind --target: the replicas' model)
    rss_start = rss_mib(proc.pid) if proc else None
    if args.warmup_s > 0:
        asyncio.run(load(address, args.clients, args.warmup_s, args.encoding))
        time.sleep(0.5)
    rss_before = rss_mib(proc.pid) if proc else None
    t0 = time.monotonic()
    streams = asyncio.run(load(address, args.clients, args.duration_s, args.encoding))
    wall_s = time.monotonic() - t0
    time.sleep(0.5)  # let the server free the sessions
    rss_after = rss_mib(proc.pid) if proc else None
    exit_code = None
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)

    ran = [s for s in streams if not s.refused] or streams  # fps per stream: of the streams that ran
    fps = [s.fps for s in ran]
    ttff = [s.first_chunk_s - s.start_s for s in streams if s.first_chunk_s is not None]
    gaps = [b - a for s in streams for a, b in zip(s.chunk_s, s.chunk_s[1:], strict=False)]
    playback_fps = max((s.playback_fps for s in streams), default=0) or math.nan
    spread = fps_spread(fps)
    report: dict[str, Any] = {
        "clients": args.clients, "duration_s": args.duration_s, "preset": info.preset, "model_id": info.model_id,
        "encoding": args.encoding,
        "paced": args.pace, "dtype": args.dtype, "attention": args.attention, "linear": args.linear,
        "server_linear": server_choices.get("linear"),  # what the server chose (its start-up log)
        "cpu_count": os.cpu_count(),
        "cpu": None if args.server is not None else (
            cpu_description() + (" (server: " + " ".join(f"{k}={v}" for k, v in AVX2_CAPS.items()) + ")"
                                 if args.emulate_avx2 else "")),
        "wall_s": round(wall_s, 2),
        "fps": {"min": round(min(fps), 2), "p50": round(statistics.median(fps), 2), "max": round(max(fps), 2),
                "per_stream": [round(f, 2) for f in fps]},
        "fps_spread": round(spread, 3),
        "fair": spread <= FAIR_SPREAD,
        "realtime_factor": round(statistics.median(fps) / playback_fps, 3),
        "aggregate_fps": round(sum(s.frames for s in streams) / wall_s, 1),
        "ttff_s": {"p50": round(percentile(ttff, 0.5), 3), "p95": round(percentile(ttff, 0.95), 3)},
        "inter_chunk_p95_s": round(percentile(gaps, 0.95), 3),
        "frames": sum(s.frames for s in streams),
        "errors": [s.error for s in streams if s.error or not s.reason],
        "per_replica_streams": dict(sorted(collections.Counter(s.upstream or "unknown" for s in ran).items())),
        "start_refusals": sum(s.retries + s.refused for s in streams),
        "start_retries": sum(s.retries for s in streams),
        "streams_refused": sum(s.refused for s in streams),
        "reasons": sorted({s.reason for s in streams}),
        "server_ms_per_chunk": {name: round(statistics.fmean(v), 1) if v else None for name, v in (
            ("generate", [x for s in streams for x in s.generate_ms]),
            ("decode", [x for s in streams for x in s.decode_ms]),
            ("encode", [x for s in streams for x in s.encode_ms]))},
        "rss_mib": None if rss_before is None else {"start": round(rss_start or 0, 1), "before": round(rss_before, 1),
                                                    "after": round(rss_after or 0, 1)},
        "rss_growth_bound_mib": RSS_GROWTH_BOUND_MIB,
        "rss_ok": None if rss_before is None else (rss_after or 0) - rss_before <= RSS_GROWTH_BOUND_MIB,
        "server_exit_code": exit_code,
    }
    print(json.dumps(report, indent=2))
    print()
    print(f"{'clients':>7} {'preset':>8} {'paced':>5} {'fps min/p50':>12} {'spread':>6} {'rt x':>5} "
          f"{'ttff p50/p95 s':>15} {'gap p95 s':>9} {'errors':>6} {'retries':>7} {'rss MiB before/after':>21}  "
          "streams per replica")
    rss = "-" if rss_before is None else f"{rss_before:.0f}/{rss_after:.0f}"
    print(f"{args.clients:>7} {info.preset:>8} {str(args.pace):>5} {min(fps):>5.1f}/{statistics.median(fps):<6.1f} "
          f"{report['fps_spread']:>6.3f} {report['realtime_factor']:>5.2f} "
          f"{report['ttff_s']['p50']:>7.3f}/{report['ttff_s']['p95']:<7.3f} "
          f"{report['inter_chunk_p95_s']:>9.3f} {len(report['errors']):>6} {report['start_retries']:>7} {rss:>21}  "
          + " ".join(f"{k}={v}" for k, v in report["per_replica_streams"].items()))
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if not result["errors"] and result["rss_ok"] is not False and result["server_exit_code"] in (0, None)
             else 1)
