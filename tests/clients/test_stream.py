"""``python -m clients.stream`` and the StreamClient library against an in-process server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.stream import Progress, PromptSwitch, StreamClient, StreamError, StreamRequest, main
from streamgen.video_io import read_video
from tests.server.harness import ServerHarness, make_engine, reference_frames

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    with ServerHarness() as harness:
        yield harness


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clients.stream", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("encoding,length", [("h264", ["--frames", "40"]), ("jpeg", ["--seconds", "1.5"])])
def test_cli_writes_a_playable_mp4(server: ServerHarness, tmp_path: Path, encoding: str, length: list[str]) -> None:
    out = tmp_path / "clip.mp4"
    res = _cli("--server", server.address, "--prompt", "a glossy red bottle turning", "--seed", "5", *length,
               "--encoding", encoding, "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    expected = 40 if encoding == "h264" else 24  # 1.5 s at the model's 16 fps
    assert summary["reason"] == "REASON_COMPLETED" and summary["frames"] == expected
    assert summary["ttff_s"] > 0 and summary["out"] == str(out)
    frames = read_video(out)
    assert frames.shape == (expected, 32, 32, 3)


def test_cli_switches_the_prompt_at_the_given_times(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamgen.server")  # the in-process server's structured events
    # Paced (0.5 s lead, 0.75 s per 12-frame chunk), so the stream is still running when each switch is due.
    with ServerHarness(make_engine(max_lead_s=0.5)) as paced:
        res = _cli("--server", paced.address, "--prompt", "a red bottle", "--frames", "60", "--encoding", "raw",
                   "--switch", "2:a green can", "--switch", "1:a blue bottle", "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["reason"] == "REASON_COMPLETED" and summary["frames"] == 60
    # Each switch reached the server once, in video-time order (the log keeps prompt lengths, never prompts).
    updates = [r.streamgen_fields for r in caplog.records if r.getMessage() == "prompt_update"]  # type: ignore[attr-defined]
    assert updates == [{"session": summary["session"], "prompt_chars": len(prompt)}
                       for prompt in ("a blue bottle", "a green can")]


def test_cli_reports_the_server_status_and_exits_non_zero(server: ServerHarness) -> None:
    res = _cli("--server", server.address, "--prompt", "a mug", "--frames", "12", "--expect-preset", "default")
    assert res.returncode == 1
    assert "error: FAILED_PRECONDITION: expect_preset is 'default' but this server runs preset 'test'" in res.stderr
    res = _cli("--server", server.address, "--prompt", "a mug", "--frames", "500")
    assert res.returncode == 1 and "error: INVALID_ARGUMENT: num_frames 500 exceeds the limit of 96" in res.stderr


def test_cli_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prompt", "a mug", "--frames", "0"]) == 2
    assert "--frames must be > 0" in capsys.readouterr().err
    assert main(["--prompt", "a mug", "--switch", "soon:a cup"]) == 2
    assert "--switch wants SECONDS:PROMPT" in capsys.readouterr().err
    assert main(["--prompt", "a mug", "--out", "clip.avi"]) == 2
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--server", "--prompt", "--image", "--seed", "--seconds", "--frames", "--encoding", "--switch",
                   "--token", "--tls", "--out", "exit codes"):
        assert option in text


def test_progress_line_and_summary() -> None:
    """The live line: frames (of the target), delivery fps, time to first frame, latest and p95 chunk gap."""
    # Its own clock: patching time.monotonic would reach the module's server thread, whose event loop died of
    # the exhausted iterator once (StopIteration in loop.time()) and hung the next test.
    clock = iter([10.4, 11.15, 12.15])  # three chunks after a start at 10.0
    progress = Progress(target_frames=48, started_s=10.0, clock=lambda: next(clock))
    for _ in range(3):
        progress.chunk(12, 1000)
    assert progress.line() == "frames 36/48   16.7 fps  ttff 0.40s  chunk gap 1.00s (p95 1.00s)  0.00 MB"
    assert progress.summary() == {"frames": 36, "bytes": 3000, "delivery_fps": 16.74, "ttff_s": 0.4,
                                  "inter_chunk_p50_s": 0.875, "inter_chunk_p95_s": 1.0}


def test_library_frames_equal_the_engine_and_switch_changes_them(server: ServerHarness) -> None:
    reference = reference_frames("a glossy red bottle turning", 5, 96)

    async def collect(switches: tuple[PromptSwitch, ...]) -> np.ndarray:
        async with StreamClient(server.address) as client:
            request = StreamRequest("a glossy red bottle turning", seed=5, num_frames=96, encoding="raw",
                                    switches=switches)
            return np.concatenate([frames async for frames in client.frames(request)])

    plain = asyncio.run(collect(()))
    assert np.array_equal(plain, reference)
    switched = asyncio.run(collect((PromptSwitch(0.5, "a small blue mug on a wooden table"),)))
    assert switched.shape == plain.shape
    assert np.array_equal(switched[:12], plain[:12])  # before the switch: the same video
    # The engine runs at most max_buffered_chunks (4) + 1 chunks ahead of the reader, so of 8 chunks
    # the last is generated after the switch: another prompt, other frames.
    assert not np.array_equal(switched[-12:], plain[-12:])


def test_library_errors_and_early_exit(server: ServerHarness) -> None:
    async def scenario() -> None:
        async with StreamClient(server.address) as client:
            info = await client.model_info()
            assert info.preset == "test"
            with pytest.raises(StreamError) as refused:
                async for _ in client.frames(StreamRequest("", num_frames=12)):
                    pass
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            async for frames in client.frames(StreamRequest("a mug", encoding="h264-annexb")):  # unbounded
                assert frames.shape == (4, 32, 32, 3)  # the first latent frame's frames come first
                break  # leaving the loop cancels the call

    asyncio.run(scenario())
    server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)

    async def unreachable() -> None:
        async with StreamClient("127.0.0.1:1") as client:
            await client.model_info(timeout_s=5)

    with pytest.raises(StreamError) as down:
        asyncio.run(unreachable())
    assert down.value.code == grpc.StatusCode.UNAVAILABLE


def test_ctrl_c_stops_the_stream_and_finishes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "stopped.mp4"
    with ServerHarness(make_engine(max_lead_s=0.5)) as paced:  # an unbounded stream that lasts
        client = subprocess.Popen([sys.executable, "-m", "clients.stream", "--server", paced.address, "--prompt",
                                   "a red mug", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        paced.wait_metric("streamgen:frames_generated_total", lambda v: v >= 24, timeout_s=30)
        client.send_signal(signal.SIGINT)
        stdout, stderr = client.communicate(timeout=30)
    assert client.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["reason"] == "REASON_STOPPED" and summary["frames"] >= 24
    assert read_video(out).shape == (summary["frames"], 32, 32, 3)
