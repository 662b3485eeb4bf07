"""StreamClient's start retries (clients.stream.RetryPolicy) against in-process replicas on 127.0.0.1:
a refused start goes to another replica, a stream that delivered frames is never retried."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from clients.stream import (
    NO_RETRY,
    RetryPolicy,
    StreamClient,
    StreamError,
    StreamRequest,
    StreamTrace,
    channel_target,
    main,
)
from streamgen.api.v1 import pb
from tests.server.harness import ServerHarness, make_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2.0)
    rng = random.Random(0)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3), (9, 0.3)]:
        samples = [policy.backoff_s(retry, rng) for _ in range(50)]
        assert all(cap / 2 <= s <= cap for s in samples) and max(samples) - min(samples) > 0
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff_s"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)


def test_cli_start_attempts_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prompt", "a mug", "--start-attempts", "0"]) == 2
    assert "--start-attempts must be >= 1" in capsys.readouterr().err


def test_channel_target_turns_a_list_into_a_round_robin_target() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("10.0.0.5:1,10.0.0.6:2") == "ipv4:10.0.0.5:1,10.0.0.6:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///streamgen.default.svc:50051") == "dns:///streamgen.default.svc:50051"


async def _run(client: StreamClient, num_frames: int) -> tuple[int, str, StreamTrace]:
    trace = StreamTrace()
    frames, reason = 0, ""
    async for response in client.stream(StreamRequest("a red mug", num_frames=num_frames, encoding="raw"),
                                        trace=trace):
        kind = response.WhichOneof("response")
        if kind == "chunk":
            frames += response.chunk.frame_count
        elif kind == "ended":
            reason = pb.StreamEnded.Reason.Name(response.ended.reason)
    return frames, reason, trace


def test_a_refused_start_is_retried_on_another_replica() -> None:
    with ServerHarness() as draining, ServerHarness() as serving:
        draining.server.servicer.draining = True  # refuses every start with UNAVAILABLE, as after SIGTERM
        target = f"{draining.address},{serving.address}"

        async def six() -> list[tuple[int, str, StreamTrace]]:
            async with StreamClient(target, retry=RetryPolicy(initial_backoff_s=0.01)) as client:
                return [await _run(client, 12) for _ in range(6)]

        results = asyncio.run(six())
        # One channel, round robin over both: some starts go to the draining replica first; each is
        # retried (on the other) and completes.
        assert [(f, r) for f, r, _ in results] == [(12, "REASON_COMPLETED")] * 6
        refusals = [x for _, _, t in results for x in t.refusals]
        assert refusals and all(x.code == grpc.StatusCode.UNAVAILABLE and "draining" in x.message for x in refusals)

        # Without retries the same refusal reaches the caller.
        async def once_each() -> list[StreamError | None]:
            errors: list[StreamError | None] = []
            async with StreamClient(target, retry=NO_RETRY) as client:
                for _ in range(6):
                    try:
                        await _run(client, 12)
                        errors.append(None)
                    except StreamError as exc:
                        errors.append(exc)
            return errors

        errors = asyncio.run(once_each())
        assert any(e is not None and e.code == grpc.StatusCode.UNAVAILABLE for e in errors)


def test_a_stream_that_delivered_frames_is_not_retried() -> None:
    """The replica goes away mid-stream: the error reaches the caller at once, with no new start
    (frames would restart from another session)."""
    harness = ServerHarness(make_engine(max_lead_s=0.5))
    try:
        async def scenario() -> tuple[int, StreamError, StreamTrace]:
            trace = StreamTrace()
            frames = 0
            async with StreamClient(harness.address, retry=RetryPolicy(initial_backoff_s=0.01)) as client:
                with pytest.raises(StreamError) as failed:
                    async for response in client.stream(StreamRequest("a red mug", encoding="raw"), trace=trace):
                        if response.WhichOneof("response") == "chunk":
                            frames += response.chunk.frame_count
                            if frames == response.chunk.frame_count:  # after the first chunk: the replica stops
                                asyncio.get_running_loop().run_in_executor(
                                    None, lambda: harness.run(harness.server.stop(grace_s=0)))
            return frames, failed.value, trace

        frames, error, trace = asyncio.run(scenario())
        assert frames >= 12 and trace.refusals == []
        assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
        if error.code != grpc.StatusCode.CANCELLED:
            assert f"the stream was cut after {frames} frames" in error.message
    finally:
        harness.loop.call_soon_threadsafe(harness.loop.stop)
