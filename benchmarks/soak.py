"""Soak: many mixed clients against one ``streamgen serve`` for N minutes, watching for anything that leaks.

    python benchmarks/soak.py --minutes 3                      # test preset, 6 clients
    python benchmarks/soak.py --minutes 30 --clients 8 --preset default

The script starts ``streamgen serve`` (random weights, hash prompt encoder, paced, /metrics on a
free port), runs ``--clients`` concurrent loops on 127.0.0.1, each drawing call after call from a
mix of scenarios, then stops them, checks the server is idle again and SIGTERMs it:

* ``complete``: 12-96 frames read to the end (any encoding; 1 in 3 switches prompt mid-stream);
* ``image``: the same with a PNG or JPEG start image of random size (up to 2 Mpx);
* ``stop``: unbounded, StopRequest after 0.2-2 s;
* ``cancel``: unbounded, cancelled 0-10 ms (half of them) or 0.1-2 s after the StartRequest;
* ``invalid``: a bad request (empty / over-long prompt, bad encoding or fps, corrupt protobuf,
  invalid UTF-8, an undecodable image, a PromptUpdate first; a corrupt health check or reflection
  request).

Anomalies (target 0): a call ending otherwise than its scenario allows (RESOURCE_EXHAUSTED refusals
of a full server are counted apart, not as anomalies), a completed stream with the wrong frame count,
engine sessions with no call behind them (zombies: ``running + waiting > streams_active`` on two
samples in a row), KV bytes or sessions left when idle at the end, RSS growth beyond
``RSS_GROWTH_BOUND_MIB`` or thread / fd growth beyond their bounds between the first sample after
warm-up and the end, ERROR lines or tracebacks in the server log, a drain that does not exit 0.

Printed: one JSON document (every sample: RSS, threads, fds, KV bytes, sessions), then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from PIL import Image

from streamgen.api.v1 import SERVICE_NAME, pb, pb_grpc
from streamgen.server.health import check

RSS_GROWTH_BOUND_MIB = 100.0
THREAD_GROWTH_BOUND = 8
FD_GROWTH_BOUND = 32
PROMPTS = ["a glossy red bottle turning slowly", "a matte blue mug on a wooden table", "a green can, camera zooming in"]
SCENARIOS = {"complete": 4, "image": 2, "stop": 2, "cancel": 3, "invalid": 2}
ENCODINGS = [pb.ENCODING_H264_FMP4, pb.ENCODING_H264_ANNEXB, pb.ENCODING_JPEG, pb.ENCODING_RAW_RGB]
Code = grpc.StatusCode


@dataclass
class Tally:
    calls: collections.Counter[str] = field(default_factory=collections.Counter)  # "scenario outcome"
    frames: int = 0
    refused: int = 0
    anomalies: list[str] = field(default_factory=list)

    def anomaly(self, text: str) -> None:
        self.anomalies.append(f"{time.strftime('%H:%M:%S')} {text}")


def _image(rng: random.Random) -> bytes:
    w, h = rng.randint(16, 1600), rng.randint(16, 1200)
    pixels = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=rng.choice(["PNG", "JPEG"]))
    return buf.getvalue()


def _start(rng: random.Random, **fields: Any) -> pb.GenerateRequest:
    base: dict[str, Any] = {"prompt": rng.choice(PROMPTS), "seed": rng.randint(0, 2**64 - 1),
                            "encoding": rng.choice(ENCODINGS)}
    base.update(fields)
    return pb.GenerateRequest(start=pb.StartRequest(**base))


GENERATE = f"/{SERVICE_NAME}/Generate"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def _invalid(rng: random.Random) -> tuple[str, list[bytes], set[Code]]:
    """The method and raw request bytes of one bad call, and the statuses it may end with."""
    bad = Code.INVALID_ARGUMENT
    choices: list[tuple[str, list[bytes], set[Code]]] = [
        (GENERATE, [_start(rng, prompt="").SerializeToString()], {bad}),
        (GENERATE, [_start(rng, prompt="x" * 10_000).SerializeToString()], {bad}),
        (GENERATE, [_start(rng, encoding=0).SerializeToString()], {bad}),
        (GENERATE, [_start(rng, fps=1000).SerializeToString()], {bad}),
        # An image is judged only once decoded, which needs a place: a full server refuses it as busy first.
        (GENERATE, [_start(rng, start_image=b"\x89PNG\r\n\x1a\n" + bytes(rng.randbytes(64))).SerializeToString()],
         {bad, Code.RESOURCE_EXHAUSTED}),
        (GENERATE, [bytes(rng.randbytes(rng.randint(1, 64)))], {bad, Code.FAILED_PRECONDITION}),  # corrupt (or parses)
        (GENERATE, [b"\x0a\x04\x0a\x02\xff\xfe"], {bad}),  # start { prompt: not UTF-8 }
        (GENERATE, [pb.GenerateRequest(prompt_update=pb.PromptUpdate(prompt="a mug")).SerializeToString()],
         {Code.FAILED_PRECONDITION}),
        (HEALTH_CHECK, [b"\xff\xff\xff"], {bad}),  # corrupt HealthCheckRequest
        (REFLECTION, [b"\x3a\x02\xff\xfe"], {bad}),  # list_services: not UTF-8
    ]
    return rng.choice(choices)


async def _one_call(channel: grpc.aio.Channel, rng: random.Random, tally: Tally) -> None:
    scenario = rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()))[0]
    stub = pb_grpc.StreamGenStub(channel)
    if scenario == "invalid":
        method, messages, allowed = _invalid(rng)
        if method == HEALTH_CHECK:
            try:
                await channel.unary_unary(method, request_serializer=None)(messages[0], timeout=30)
                code = Code.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        else:
            call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(timeout=30)
            for m in messages:
                await call.write(m)
            await call.done_writing()
            code = await _drain_status(call)
        tally.calls[f"invalid {code.name}"] += 1
        if code not in allowed:
            tally.anomaly(f"invalid request to {method} ended {code.name}, "
                          f"expected {sorted(c.name for c in allowed)}")
        return

    num_frames = rng.randint(12, 96) if scenario in ("complete", "image") else 0
    # Encoded off the loop: the clients share one event loop, and a 2-Mpx PNG takes up to ~0.1 s of CPU
    # (more on a loaded machine), which would delay every other client's reads and writes.
    extra = {"start_image": await asyncio.to_thread(_image, rng)} if scenario == "image" else {}
    call = stub.Generate(timeout=120)
    await call.write(_start(rng, num_frames=num_frames, **extra))
    if scenario == "cancel":
        await asyncio.sleep(rng.uniform(0, 0.01) if rng.random() < 0.5 else rng.uniform(0.1, 2.0))
        call.cancel()
        tally.calls["cancel CANCELLED"] += 1
        return
    stop_at = time.monotonic() + rng.uniform(0.2, 2.0) if scenario == "stop" else None
    switch = scenario == "complete" and rng.random() < 1 / 3
    frames, ended = 0, None
    try:
        while True:
            if stop_at is not None and time.monotonic() >= stop_at:
                await call.write(pb.GenerateRequest(stop=pb.StopRequest()))
                stop_at = None
            response = await asyncio.wait_for(call.read(), timeout=30)
            if response is grpc.aio.EOF:
                break
            kind = response.WhichOneof("response")
            if kind == "chunk":
                frames += response.chunk.frame_count
                # Not after the last frame: the server closes then, and a write racing the close makes
                # grpc.aio replace the call's status with INTERNAL (clients/stream.py, _LOST_STATUS_DETAILS).
                if switch and frames < num_frames:
                    await call.write(pb.GenerateRequest(prompt_update=pb.PromptUpdate(prompt=rng.choice(PROMPTS))))
                    switch = False
            elif kind == "ended":
                ended = response.ended
                await call.done_writing()
        code, details = await call.code(), await call.details()
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details()
    except TimeoutError:
        call.cancel()
        tally.anomaly(f"{scenario}: no message for 30 s")
        return
    tally.frames += frames
    if code == Code.RESOURCE_EXHAUSTED:
        tally.refused += 1
        tally.calls[f"{scenario} RESOURCE_EXHAUSTED"] += 1
        return
    reason = pb.StreamEnded.Reason.Name(ended.reason) if ended is not None else "none"
    tally.calls[f"{scenario} {code.name} {reason}"] += 1
    want = "REASON_STOPPED" if scenario == "stop" else "REASON_COMPLETED"
    if code != Code.OK or ended is None or pb.StreamEnded.Reason.Name(ended.reason) != want:
        tally.anomaly(f"{scenario} ended {code.name} {reason} after {frames} frames: {details!r}"[:300])
    elif scenario != "stop" and (frames != num_frames or ended.frames_sent != num_frames):
        tally.anomaly(f"{scenario}: {frames} frames received, {ended.frames_sent} sent, {num_frames} asked")


async def _drain_status(call: Any) -> Code:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def _client_loop(address: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        while time.monotonic() < until:
            try:
                await _one_call(channel, rng, tally)
            except Exception as exc:  # the soak must report, not die
                tally.anomaly(f"client error: {type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(rng.uniform(0, 0.2))


# ------------------------------------------------------------------------------------------ server side


def _proc_stats(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names = {"kv_used_bytes": "streamgen:kv_cache_used_bytes", "running": "streamgen:num_sessions_running",
             "waiting": "streamgen:num_sessions_waiting", "streams": "streamgen:num_streams_active"}
    out = {}
    for key, name in names.items():
        match = re.search(re.escape(name) + r" ([0-9.e+-]+)$", text, re.MULTILINE)
        out[key] = float(match.group(1)) if match else float("nan")
    return out


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, int, list[str]]:
    cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--preset", args.preset, "--random-init",
           "--text-encoder", "hash", "--port", "0", "--metrics-port", "0", "--max-sessions", str(args.max_sessions),
           "--max-waiting", str(args.max_waiting), "--dtype", args.dtype, "--drain-timeout-s", "2",
           "--max-queue-wait-s", "10", "--kv-memory-mb", str(args.kv_memory_mb)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    ready = threading.Event()
    found: dict[str, Any] = {}

    def read_log() -> None:  # drains stderr for the whole run, so the server never blocks on it
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not found and '"event": "serving"' in line:
                found.update(json.loads(line))
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        raise RuntimeError("streamgen serve did not start: " + "".join(lines[-5:]))
    port = int(str(found["metrics"]).rsplit(":", 1)[1].split("/")[0])
    return proc, str(found["address"]), port, lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    proc, address, metrics_port, log_lines = _start_server(args)
    tally = Tally()
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    stop_sampling = threading.Event()
    zombie_streak = 0

    def sample() -> None:
        nonlocal zombie_streak
        while not stop_sampling.wait(args.sample_s):
            point = {"t_s": round(time.monotonic() - t0, 1), **_proc_stats(proc.pid), **_metrics(metrics_port)}
            samples.append(point)
            time.sleep(0.5)  # the engine gauges lag the call count by up to 0.1 s: look twice
            again = _metrics(metrics_port)
            zombies = [p["running"] + p["waiting"] - p["streams"] for p in (point, again)]
            zombie_streak = zombie_streak + 1 if min(zombies) > 0 else 0
            if zombie_streak == 2:
                tally.anomaly(f"zombie sessions: {point}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def clients() -> None:
        await asyncio.gather(*(_client_loop(address, args.seed + i, until, tally) for i in range(args.clients)))

    asyncio.run(clients())
    stop_sampling.set()
    sampler.join(timeout=30)
    # Idle: every call is over, so within a second nothing may hold a session or a page.
    deadline = time.monotonic() + 2.0
    idle = _metrics(metrics_port)
    while (idle["kv_used_bytes"] or idle["running"] or idle["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        idle = _metrics(metrics_port)
    if idle["kv_used_bytes"] or idle["running"] or idle["waiting"] or idle["streams"]:
        tally.anomaly(f"not idle after the clients stopped: {idle}")
    final = {"t_s": round(time.monotonic() - t0, 1), **_proc_stats(proc.pid), **idle}
    samples.append(final)
    healthy = check(address)
    if healthy != "SERVING":
        tally.anomaly(f"health after the soak: {healthy}")
    # Resource trend: from the first sample after warm-up to the idle end.
    base = next((s for s in samples if s["t_s"] >= args.warmup_s), samples[0])
    growth = {k: round(final[k] - base[k], 1) for k in ("rss_mib", "threads", "fds")}
    for key, bound in (("rss_mib", RSS_GROWTH_BOUND_MIB), ("threads", THREAD_GROWTH_BOUND), ("fds", FD_GROWTH_BOUND)):
        if growth[key] > bound:
            tally.anomaly(f"{key} grew by {growth[key]} (bound {bound})")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        exit_code: int | None = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = None
    drain_s = round(time.monotonic() - sent, 2)
    if exit_code != 0:
        tally.anomaly(f"server exit code {exit_code} after SIGTERM")
    time.sleep(0.2)
    if args.server_log:
        with open(args.server_log, "w") as f:
            f.writelines(log_lines)
    bad_lines = [line.strip()[:300] for line in log_lines if '"level": "error"' in line or "Traceback" in line]
    for line in bad_lines[:10]:
        tally.anomaly(f"server log: {line}")
    return {
        "minutes": args.minutes, "clients": args.clients, "preset": args.preset, "max_sessions": args.max_sessions,
        "calls_total": sum(tally.calls.values()), "calls": dict(sorted(tally.calls.items())),
        "frames_received": tally.frames, "refused_busy": tally.refused,
        "server_warnings": sum('"level": "warning"' in line for line in log_lines),
        "server_error_lines": len(bad_lines),
        "growth_after_warmup": growth, "server_exit_code": exit_code, "drain_s": drain_s,
        "anomaly_count": len(tally.anomalies), "anomalies": tally.anomalies[:50], "samples": samples,
    }


def table(report: dict[str, Any]) -> str:
    rows = ["| t (s) | RSS MiB | threads | fds | KV used MiB | running | waiting | streams |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in report["samples"]:
        rows.append(f"| {s['t_s']:.0f} | {s['rss_mib']:.0f} | {s['threads']:.0f} | {s['fds']:.0f} | "
                    f"{s['kv_used_bytes'] / 2**20:.1f} | {s['running']:.0f} | {s['waiting']:.0f} | "
                    f"{s['streams']:.0f} |")
    rows.append("")
    rows.append(f"calls {report['calls_total']}, frames {report['frames_received']}, refused (busy) "
                f"{report['refused_busy']}, growth after warm-up {report['growth_after_warmup']}, drain "
                f"{report['drain_s']} s exit {report['server_exit_code']}, anomalies {report['anomaly_count']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--preset", default="test")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (0 = its default)")
    parser.add_argument("--max-sessions", type=int, default=4)
    parser.add_argument("--max-waiting", type=int, default=4)
    parser.add_argument("--kv-memory-mb", type=int, default=64, help="the server's KV pool")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between resource samples")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="growth is measured from the first sample after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", help="write the server's log (JSON lines) to this file")
    args = parser.parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=1))
    print()
    print(table(report))
    return 0 if report["anomaly_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
