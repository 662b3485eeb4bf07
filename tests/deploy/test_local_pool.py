"""Three ``streamgen serve`` replicas (test preset) behind nginx, started by ``deploy/local/run.sh``, on 127.0.0.1.

The mixed-model and dead-only balancers come first, as pools of their own. Then one pool serves the
rest of the module (a dead port is also listed as an upstream, as a misconfigured balancer would have
it); the SIGTERM test runs last because the replica it drains stays down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.stream import RetryPolicy
from streamgen.api.v1 import pb, pb_grpc
from tests.deploy.harness import REPO, Pool, Result, established_to, nginx_or_skip, run_stream

READY_TIMEOUT_S = 180  # three replicas importing torch at once on two busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    nginx_or_skip()
    dead = _free_port()
    p = Pool(tmp_path_factory.mktemp("pool"), 3, "--extra-upstream", f"127.0.0.1:{dead}", "--fail-timeout-s", "2")
    try:
        p.wait_event("pool_ready", READY_TIMEOUT_S)
        p.dead_port = dead  # type: ignore[attr-defined]
        yield p
    finally:
        code = p.stop()
    assert code == 0, p.final_stderr()[-2000:]
    stopped = p.wait_event("stopped", 1)
    assert stopped["clean"] is True


def _addresses(pool: Pool) -> list[str]:
    return [pool.replica(i)["address"] for i in range(3)]


def _wait_idle(pool: Pool, indexes: list[int], timeout_s: float = 5.0) -> None:
    """Every replica in ``indexes`` has no open Generate call (nothing stuck upstream)."""
    deadline = time.monotonic() + timeout_s
    while any(pool.metric(i, "streamgen:num_streams_active") != 0 for i in indexes):
        assert time.monotonic() < deadline, "a replica still holds open calls"
        time.sleep(0.1)


def test_run_sh_refuses_a_pool_of_mixed_models(tmp_path: Path) -> None:
    nginx_or_skip()
    p = Pool(tmp_path, 2, "--replica-args", "1=--dtype bfloat16")  # same weights, another dtype: other frames
    assert p.proc.wait(timeout=READY_TIMEOUT_S) == 3
    ids = p.wait_event("mixed_models", 1)["model_ids"]
    assert ids["0"] != ids["1"] and all(v.startswith("sha256:") for v in ids.values())
    assert "the replicas serve different models" in p.final_stderr()
    assert p.wait_event("stopped", 1)["replica_exit_codes"] == {"0": [0], "1": [0]}  # both drained, exit 0
    assert not (tmp_path / "nginx.pid").exists()  # no balancer was started


def test_a_balancer_with_only_a_dead_upstream_answers_unavailable(tmp_path: Path) -> None:
    nginx_or_skip()
    dead = _free_port()
    p = Pool(tmp_path, 0, "--extra-upstream", f"127.0.0.1:{dead}", "--client-header-timeout-s", "1")
    try:
        p.wait_event("pool_ready", 30)
        start = time.monotonic()
        r = asyncio.run(run_stream(p.balancer, Result(0), 12, retry=RetryPolicy(max_attempts=3)))
        assert r.error is not None and r.error.code == grpc.StatusCode.UNAVAILABLE, r
        assert len(r.trace.refusals) == 2 and time.monotonic() - start < 5  # retried twice, then the status
        assert established_to(dead) == 0
        # A TCP client that sends nothing is closed by nginx after client_header_timeout (1 s here).
        host, port = p.balancer.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            opened = time.monotonic()
            while s.recv(4096):  # nginx's HTTP/2 SETTINGS (and GOAWAY), then the close
                pass
            assert time.monotonic() - opened < 4
        with grpc.insecure_channel(p.balancer) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.StreamGenStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        assert p.stop() == 0


def test_nine_streams_spread_three_per_replica_and_all_complete(pool: Pool) -> None:
    async def scenario() -> list[Result]:
        return list(await asyncio.gather(*(run_stream(pool.balancer, Result(i), 48) for i in range(9))))

    results = asyncio.run(scenario())
    assert [(r.error, r.reason, r.frames) for r in results] == [(None, "REASON_COMPLETED", 48)] * 9
    counts = Counter(r.upstream for r in results)
    assert set(counts) == set(_addresses(pool)), counts  # the dead upstream served nothing
    assert all(2 <= n <= 4 for n in counts.values()), counts
    assert all(r.trace.refusals == [] for r in results)
    # Nothing stuck: no replica holds a call, no connection to the dead port, and nginx keeps at most
    # one idle upstream connection per stream it proxied (its keepalive pool).
    _wait_idle(pool, [0, 1, 2])
    assert established_to(pool.dead_port) == 0  # type: ignore[attr-defined]
    assert sum(established_to(int(a.rsplit(":", 1)[1])) for a in _addresses(pool)) <= 9


def test_load_benchmark_through_the_balancer_reports_each_replica(pool: Pool) -> None:
    res = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--target", pool.balancer, "--clients", "6",
                          "--duration-s", "2", "--warmup-s", "0", "--encoding", "jpeg"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.split("\n\n", 1)[0])  # the JSON document, then the table
    assert report["errors"] == [] and report["start_refusals"] == report["start_retries"] == 0
    assert set(report["per_replica_streams"]) == set(_addresses(pool)), report["per_replica_streams"]
    assert sorted(report["per_replica_streams"].values()) == [2, 2, 2]
    assert 0 < report["ttff_s"]["p50"] <= report["ttff_s"]["p95"] < 5 and report["fps"]["min"] > 0
    _wait_idle(pool, [0, 1, 2])


def test_a_call_that_sends_nothing_gets_a_clear_status_and_frees_the_upstream(pool: Pool) -> None:
    """A client opens Generate through the balancer and never sends its StartRequest: the replica ends
    the call with INVALID_ARGUMENT after its stall timeout (2 s here), and nothing stays open upstream."""
    release = threading.Event()

    def nothing() -> Iterator[pb.GenerateRequest]:  # a request stream that stays silent
        release.wait(30)
        yield from ()

    outcome = 'streamgen:request_outcome_total{reason="invalid_argument"}'
    before = sum(pool.metric(i, outcome) for i in range(3))
    with grpc.insecure_channel(pool.balancer) as channel:
        opened = time.monotonic()
        call = pb_grpc.StreamGenStub(channel).Generate(nothing(), timeout=20)
        with pytest.raises(grpc.RpcError) as ended:
            next(call)
        waited_s = time.monotonic() - opened
    release.set()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert ended.value.details() == "no StartRequest within 2 s of opening the call"  # type: ignore[attr-defined]
    assert 1.5 < waited_s < 6
    _wait_idle(pool, [0, 1, 2])
    assert sum(pool.metric(i, outcome) for i in range(3)) == before + 1  # the call was accounted, once
    # A TCP client that sends nothing at all never reaches a replica: nginx closes it after
    # client_header_timeout (run.sh --client-header-timeout-s, 10 s by default; not waited for here).
    before = sum(established_to(int(a.rsplit(":", 1)[1])) for a in _addresses(pool))
    host, port = pool.balancer.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        time.sleep(0.5)
        assert sum(established_to(int(a.rsplit(":", 1)[1])) for a in _addresses(pool)) <= before


def test_kill_9_ends_its_streams_quickly_the_balancer_skips_it_and_capacity_returns(pool: Pool) -> None:
    victim = pool.replica(0)

    async def scenario() -> tuple[list[Result], list[Result], float]:
        stop = asyncio.Event()
        results = [Result(i) for i in range(6)]
        tasks = [asyncio.create_task(run_stream(pool.balancer, r, 0, stop=stop)) for r in results]  # unbounded
        await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 30)
        assert sum(r.upstream == victim["address"] for r in results) >= 1
        killed_s = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*(t for r, t in zip(results, tasks, strict=True)
                                                if r.upstream == victim["address"])), 10)
        # While it is down, new streams go elsewhere without the client seeing anything.
        fresh = list(await asyncio.gather(*(run_stream(pool.balancer, Result(10 + i), 24) for i in range(3))))
        stop.set()
        await asyncio.gather(*tasks)
        return results, fresh, killed_s

    results, fresh, killed_s = asyncio.run(scenario())
    cut = [r for r in results if r.upstream == victim["address"]]
    print(f"kill -9: {len(cut)} streams cut, status "  # the figures docs/serving.md quotes (pytest -s)
          f"{sorted({str(r.error) for r in cut if r.error})} after "
          f"{max((r.ended_s or 0) - killed_s for r in cut):.3f} s at most")
    for r in results:
        if r.upstream == victim["address"]:
            # A clear status within a few seconds, and no retry: frames were already delivered.
            assert r.error is not None and r.error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), r
            assert f"the stream was cut after {r.frames} frames" in r.error.message
            assert r.ended_s is not None and r.ended_s - killed_s < 5 and r.trace.refusals == []
        else:
            assert r.error is None and r.reason == "REASON_STOPPED", r
    assert [(r.error, r.reason, r.frames) for r in fresh] == [(None, "REASON_COMPLETED", 24)] * 3
    assert all(r.upstream != victim["address"] for r in fresh)

    exited = pool.wait_event("replica_exited", 5, index=0)
    assert exited["exit_code"] == -signal.SIGKILL and exited["restarting"] is True
    pool.wait_event("replica_serving", READY_TIMEOUT_S, index=0)  # run.sh restarted it on its port
    # nginx may have tried the port while the replica was still starting; such a failure keeps it out
    # for fail_timeout (2 s in this pool) before the next request probes it again.
    time.sleep(2.5)

    async def after() -> list[Result]:
        return list(await asyncio.gather(*(run_stream(pool.balancer, Result(20 + i), 24) for i in range(6))))

    again = asyncio.run(after())
    assert all(r.error is None and r.reason == "REASON_COMPLETED" for r in again), again
    assert victim["address"] in {r.upstream for r in again}  # capacity is back
    _wait_idle(pool, [0, 1, 2])


def test_sigterm_drains_one_replica_and_new_starts_land_on_the_others(pool: Pool) -> None:
    victim = pool.replica(1)

    async def scenario() -> tuple[list[Result], list[Result]]:
        results = [Result(i) for i in range(9)]
        tasks = [asyncio.create_task(run_stream(pool.balancer, r, 96)) for r in results]  # ~5 s each, paced
        await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 30)
        os.kill(victim["pid"], signal.SIGTERM)
        fresh: list[asyncio.Task[Result]] = []
        for i in range(6):  # new starts during the drain and after the replica is gone
            fresh.append(asyncio.create_task(run_stream(pool.balancer, Result(100 + i), 24)))
            await asyncio.sleep(0.4)
        return list(await asyncio.gather(*tasks)), list(await asyncio.gather(*fresh))

    results, fresh = asyncio.run(scenario())
    drained = [r for r in results if r.upstream == victim["address"]]
    print(f"SIGTERM: {len(drained)} streams ended REASON_SERVER_SHUTDOWN; 6 new starts, "
          f"{sum(len(r.trace.refusals) for r in fresh)} refusals retried")
    assert 2 <= len(drained) <= 4, Counter(r.upstream for r in results)
    for r in results:
        expected = "REASON_SERVER_SHUTDOWN" if r in drained else "REASON_COMPLETED"
        assert r.error is None and r.reason == expected, r
        assert r.frames < 96 if r in drained else r.frames == 96
    # Every new start ran to completion on one of the other two; refusals (if any) were retried.
    assert [(r.error, r.reason, r.frames) for r in fresh] == [(None, "REASON_COMPLETED", 24)] * 6
    assert all(r.upstream in set(_addresses(pool)) - {victim["address"]} for r in fresh)
    assert all(f.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
               for r in fresh for f in r.trace.refusals)
    exited = pool.wait_event("replica_exited", 15, index=1)
    assert exited["exit_code"] == 0 and exited["restarting"] is False  # drained on purpose: stays down
