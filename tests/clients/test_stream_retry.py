"""StreamClient's start retries (clients.stream.RetryPolicy) against in-process replicas on 127.0.0.1:
a refused start goes to another replica, a stream that delivered frames is never retried."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from clients.stream import (
    NO_RETRY,
    PromptSwitch,
    RetryPolicy,
    StreamClient,
    StreamError,
    StreamRequest,
    StreamTrace,
    channel_target,
    main,
)
from streamgen.api.v1 import pb
from streamgen.server.config import ServerConfig
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
                            if frames == response.chunk.frame_count:  # after the first message: the replica stops
                                asyncio.get_running_loop().run_in_executor(
                                    None, lambda: harness.run(harness.server.stop(grace_s=0)))
            return frames, failed.value, trace

        frames, error, trace = asyncio.run(scenario())
        assert frames >= 4 and trace.refusals == []
        assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
        if error.code != grpc.StatusCode.CANCELLED:
            assert f"the stream was cut after {frames} frames" in error.message
    finally:
        harness.loop.call_soon_threadsafe(harness.loop.stop)


# --- grpc.aio's lost status ---------------------------------------------------------------------------
# When the peer closes a bidi call while a write is being handed to the transport, grpc.aio replaces the
# peer's status with INTERNAL "Internal error from Core". The race is timing-bound (nginx answers a start
# in well under a millisecond: tests/deploy/test_local_pool.py hits it about every other run), so these
# tests script the call to behave exactly as grpc.aio does when it happens.

_LOST = "Internal error from Core"


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class _ScriptedCall:
    """A Generate call: ``responses`` are read in order; writes after ``close_after_reads`` reads fail
    the way grpc.aio fails them, and then the status is INTERNAL/_LOST."""

    def __init__(self, responses: list[pb.GenerateResponse], *, fail_first_write: bool = False,
                 close_after_reads: int | None = None) -> None:
        self.responses = list(responses)
        self.fail_first_write = fail_first_write
        self.close_after_reads = close_after_reads
        self.reads = 0
        self.writes: list[pb.GenerateRequest] = []
        self.lost = False

    async def write(self, message: pb.GenerateRequest) -> None:
        if self.fail_first_write or (self.close_after_reads is not None and self.reads >= self.close_after_reads):
            self.lost = True
            raise _rpc_error(grpc.StatusCode.INTERNAL, _LOST)
        self.writes.append(message)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        if self.lost:
            raise _rpc_error(grpc.StatusCode.INTERNAL, _LOST)
        return grpc.aio.Metadata()

    async def read(self) -> object:
        await asyncio.sleep(0)
        if self.lost:
            raise _rpc_error(grpc.StatusCode.INTERNAL, _LOST)
        if not self.responses:
            return grpc.aio.EOF
        self.reads += 1
        return self.responses.pop(0)

    async def done_writing(self) -> None:
        pass

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INTERNAL if self.lost else grpc.StatusCode.OK

    async def details(self) -> str:
        return _LOST if self.lost else ""

    def done(self) -> bool:
        return self.lost or not self.responses

    def cancel(self) -> bool:
        return True


class _ScriptedStub:
    def __init__(self, calls: list[_ScriptedCall]) -> None:
        self.calls = calls
        self.made = 0

    def Generate(self, **_: object) -> _ScriptedCall:  # noqa: N802 - the gRPC method's name
        call = self.calls[self.made]
        self.made += 1
        return call


def _ok_stream(frames: int) -> list[pb.GenerateResponse]:
    return [pb.GenerateResponse(started=pb.StreamStarted(fps=16)),
            pb.GenerateResponse(chunk=pb.FrameChunk(frame_count=frames)),
            pb.GenerateResponse(ended=pb.StreamEnded(reason=pb.StreamEnded.REASON_COMPLETED, frames_sent=frames))]


def _run_scripted(calls: list[_ScriptedCall], request: StreamRequest,
                  retry: RetryPolicy) -> tuple[list[str], StreamTrace, StreamError | None, _ScriptedStub]:
    async def go() -> tuple[list[str], StreamTrace, StreamError | None, _ScriptedStub]:
        kinds: list[str] = []
        trace = StreamTrace()
        async with StreamClient("127.0.0.1:1", retry=retry) as client:
            stub = _ScriptedStub(calls)
            client._stub = stub  # type: ignore[assignment]
            try:
                async for response in client.stream(request, trace=trace):
                    kinds.append(str(response.WhichOneof("response")))
            except StreamError as exc:
                return kinds, trace, exc, stub
        return kinds, trace, None, stub
    return asyncio.run(go())


def test_a_start_closed_before_the_request_went_out_is_retried_and_reported_unavailable() -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)
    # Lost once, then the stream runs: retried like a refusal, nothing of the first attempt delivered.
    kinds, trace, error, stub = _run_scripted([_ScriptedCall([], fail_first_write=True), _ScriptedCall(_ok_stream(12))],
                                              StreamRequest("a red mug", num_frames=12), retry)
    assert error is None and kinds == ["started", "chunk", "ended"] and stub.made == 2
    assert [r.code for r in trace.refusals] == [grpc.StatusCode.UNAVAILABLE]
    assert "closed the call before the start request could be sent" in trace.refusals[0].message
    # Lost every time: UNAVAILABLE after max_attempts calls, never INTERNAL.
    kinds, trace, error, stub = _run_scripted([_ScriptedCall([], fail_first_write=True) for _ in range(3)],
                                              StreamRequest("a red mug", num_frames=12), retry)
    assert kinds == [] and stub.made == 3 and len(trace.refusals) == 2
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE


def test_writes_that_could_race_the_end_are_not_sent_and_a_lost_status_after_the_end_is_not_an_error() -> None:
    # Bounded stream, the switch falls due with its last chunk: the server is closing, nothing is written.
    request = StreamRequest("a red mug", num_frames=12, switches=(PromptSwitch(0.5, "a blue mug"),))
    call = _ScriptedCall(_ok_stream(12), close_after_reads=2)
    kinds, _, error, _ = _run_scripted([call], request, NO_RETRY)
    assert error is None and kinds == ["started", "chunk", "ended"]
    assert not call.lost and [w.WhichOneof("request") for w in call.writes] == ["start"]
    # Unbounded stream: the reader has already read StreamEnded when the switch is written (the caller
    # is slow), the write loses the status: the stream still ended as the server said.
    request = StreamRequest("a red mug", num_frames=0, switches=(PromptSwitch(1.0, "a blue mug"),))
    responses = _ok_stream(12)[:2] + [
        pb.GenerateResponse(chunk=pb.FrameChunk(frame_count=12)),  # the switch falls due with this one
        pb.GenerateResponse(ended=pb.StreamEnded(reason=pb.StreamEnded.REASON_STOPPED, frames_sent=24))]
    call = _ScriptedCall(responses, close_after_reads=4)

    async def slow() -> tuple[list[str], StreamError | None]:
        kinds: list[str] = []
        async with StreamClient("127.0.0.1:1", retry=NO_RETRY) as client:
            client._stub = _ScriptedStub([call])  # type: ignore[assignment]
            try:
                async for response in client.stream(request):
                    kinds.append(str(response.WhichOneof("response")))
                    await asyncio.sleep(0.05)  # the reader runs ahead
            except StreamError as exc:
                return kinds, exc
        return kinds, None

    kinds, error = asyncio.run(slow())
    assert call.lost and error is None and kinds == ["started", "chunk", "chunk", "ended"]
    # The same lost status before StreamEnded was read is a real failure, reported as one.
    call = _ScriptedCall(_ok_stream(12)[:2] + [pb.GenerateResponse(chunk=pb.FrameChunk(frame_count=12))],
                         close_after_reads=2)
    kinds, _, error, _ = _run_scripted([call], request, NO_RETRY)
    assert call.lost and error is not None and error.code == grpc.StatusCode.INTERNAL
    assert "the stream was cut after 24 frames" in error.message


def test_a_start_refused_by_a_full_replica_is_retried_on_another() -> None:
    """A replica whose places are all taken refuses a start with RESOURCE_EXHAUSTED at once; the
    client retries it, landing on the replica with room, and every stream completes."""
    full_engine = make_engine(max_sessions=1, max_lead_s=0.5)  # paced: the holder stays for seconds
    with ServerHarness(full_engine, ServerConfig(port=0, metrics_port=0, max_waiting=0)) as full, \
            ServerHarness() as roomy:
        target = f"{full.address},{roomy.address}"

        async def scenario() -> list[tuple[int, str, StreamTrace]]:
            async with StreamClient(full.address, retry=NO_RETRY) as holder_client:
                holder = holder_client.stream(StreamRequest("a blue can", encoding="raw"))
                first = await anext(holder)  # started: the full replica's one place is taken
                assert first.WhichOneof("response") in ("started", "chunk")
                async with StreamClient(target, retry=RetryPolicy(initial_backoff_s=0.01)) as client:
                    results = [await _run(client, 12) for _ in range(4)]
                await holder.aclose()
                return results

        results = asyncio.run(scenario())
        assert [(f, r) for f, r, _ in results] == [(12, "REASON_COMPLETED")] * 4
        refusals = [x for _, _, t in results for x in t.refusals]
        # Round robin sends some starts to the full replica first: each is refused and retried.
        assert refusals and all(x.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in x.message
                                for x in refusals)
