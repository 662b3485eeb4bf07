"""End to end over 127.0.0.1: every encoding decodes to the engine's own frames; health, reflection, info."""

from __future__ import annotations

import io
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from streamgen.api.v1 import SERVICE_NAME, pb, pb_grpc
from streamgen.server import fmp4
from streamgen.server.metrics import OUTCOMES
from tests.server.harness import PRESET, ServerHarness, psnr, reference_frames

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"

PROMPT, SEED, NUM_FRAMES = "a glossy red bottle turning", 5, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    with ServerHarness() as harness:  # unpaced: streams run as fast as the engine goes
        yield harness


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return reference_frames(PROMPT, SEED, NUM_FRAMES)


def _stream(address: str, encoding: int, **start: object) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        fields: dict[str, object] = {"prompt": PROMPT, "seed": SEED, "num_frames": NUM_FRAMES, **start}
        request = pb.StartRequest(encoding=encoding, **fields)
        return list(pb_grpc.StreamGenStub(channel).Generate(iter([pb.GenerateRequest(start=request)]), timeout=60))


def _check_envelope(responses: list[pb.GenerateResponse], num_frames: int) -> tuple[pb.StreamStarted,
                                                                                   list[pb.FrameChunk]]:
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[0] == "started" and kinds[-1] == "ended" and set(kinds[1:-1]) == {"chunk"}
    chunks = [r.chunk for r in responses[1:-1]]
    assert [c.first_frame_index for c in chunks] == list(np.cumsum([0] + [c.frame_count for c in chunks[:-1]]))
    assert sum(c.frame_count for c in chunks) == num_frames
    ended = responses[-1].ended
    assert ended.reason == pb.StreamEnded.REASON_COMPLETED and ended.frames_sent == num_frames
    started = responses[0].started
    assert (started.width, started.height, started.fps, started.preset) == (32, 32, 16, "test")
    assert started.frames_per_chunk == 12 and started.session_id
    assert all(c.timing.since_start_ms > 0 and c.timing.encode_ms >= 0 for c in chunks)
    return started, chunks


def test_h264_fmp4_decodes_to_the_engine_frames(server: ServerHarness, reference: np.ndarray) -> None:
    responses = _stream(server.address, pb.ENCODING_H264_FMP4, keyframe_interval=16)
    started, chunks = _check_envelope(responses, NUM_FRAMES)
    assert started.codec.startswith("avc1.") and started.mime_type == f'video/mp4; codecs="{started.codec}"'
    assert started.time_base_den == 90_000 and started.keyframe_interval == 16
    for c in chunks:  # each chunk is complete on its own: whole moof+mdat pairs, nothing held back
        kinds = [kind for kind, _, _ in fmp4.iter_boxes(c.payload)]
        assert kinds[0] == b"moof" and kinds[-1] == b"mdat" and len(kinds) % 2 == 0
        assert c.pts == c.first_frame_index * 90_000 // 16
    with av.open(io.BytesIO(started.init_segment + b"".join(c.payload for c in chunks))) as container:
        decoded = list(container.decode(video=0))
    frames = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    assert frames.shape == (NUM_FRAMES, 32, 32, 3)
    assert [f.pts for f in decoded] == [i * 90_000 // 16 for i in range(NUM_FRAMES)]
    assert [i for i, f in enumerate(decoded) if f.key_frame] == [0, 16, 32]
    assert reference.std() > 10  # the comparison means something: textured frames, not flat grey
    assert psnr(frames, reference) >= 30.0


def test_h264_annexb_decodes_to_the_engine_frames(server: ServerHarness, reference: np.ndarray) -> None:
    started, chunks = _check_envelope(_stream(server.address, pb.ENCODING_H264_ANNEXB), NUM_FRAMES)
    assert started.codec == "h264" and not started.init_segment
    nal_types = [nal[0] & 0x1F for nal in fmp4.split_annexb(chunks[0].payload)]
    assert nal_types[:2] == [7, 8]  # SPS, PPS in-band before the first keyframe
    codec = av.CodecContext.create("h264", "r")
    packets = list(codec.parse(b"".join(c.payload for c in chunks))) + list(codec.parse(None))
    frames = np.stack([f.to_ndarray(format="rgb24") for p in packets for f in codec.decode(p)])
    assert frames.shape == (NUM_FRAMES, 32, 32, 3)
    assert psnr(frames, reference) >= 30.0


def test_jpeg_frames_match_the_engine(server: ServerHarness, reference: np.ndarray) -> None:
    started, chunks = _check_envelope(_stream(server.address, pb.ENCODING_JPEG, jpeg_quality=95), NUM_FRAMES)
    assert started.codec == "jpeg" and started.time_base_den == 16
    frames = []
    for c in chunks:
        assert len(c.frame_sizes) == c.frame_count and sum(c.frame_sizes) == len(c.payload)
        offsets = np.cumsum([0, *c.frame_sizes])
        frames += [np.asarray(Image.open(io.BytesIO(c.payload[a:b])).convert("RGB"))
                   for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert np.stack(frames).shape == (NUM_FRAMES, 32, 32, 3)
    assert psnr(np.stack(frames), reference) >= 30.0


def test_raw_frames_equal_the_engine_exactly(server: ServerHarness, reference: np.ndarray) -> None:
    started, chunks = _check_envelope(_stream(server.address, pb.ENCODING_RAW_RGB), NUM_FRAMES)
    assert started.codec == "rgb24"
    frames = np.frombuffer(b"".join(c.payload for c in chunks), np.uint8).reshape(-1, 32, 32, 3)
    assert np.array_equal(frames, reference)
    assert [c.pts for c in chunks] == [c.first_frame_index for c in chunks]  # time base = fps


def test_health_reflection_and_model_info(server: ServerHarness) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol(SERVICE_NAME)
        assert descriptor.name == "streamgen/v1/streamgen.proto"
        assert [m.name for m in descriptor.service[0].method] == ["Generate", "GetModelInfo"]
        info = pb_grpc.StreamGenStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert (info.preset, info.width, info.height, info.fps, info.frames_per_chunk) == ("test", 32, 32, 16, 12)
    assert info.max_frames == 96 and info.max_prompt_chars == 500 and not info.paced
    assert list(info.encodings) == [pb.ENCODING_H264_FMP4, pb.ENCODING_H264_ANNEXB, pb.ENCODING_JPEG,
                                    pb.ENCODING_RAW_RGB]
    assert info.weights == "test weights" and info.version
    assert PRESET.name == info.preset


def test_metrics_count_frames_and_outcomes(server: ServerHarness) -> None:
    before = server.metric("streamgen:frames_generated_total")
    completed = server.metric("streamgen:request_outcome_total", 'reason="completed"')
    _stream(server.address, pb.ENCODING_RAW_RGB, num_frames=24)
    assert server.metric("streamgen:frames_generated_total") == before + 24
    assert server.metric("streamgen:request_outcome_total", 'reason="completed"') == completed + 1
    assert server.metric("streamgen:time_to_first_frame_seconds_count") >= 1
    assert server.metric("streamgen:kv_cache_total_bytes") > 0
    server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)


def test_unbounded_stream_ends_with_limit_reached_at_max_frames(server: ServerHarness) -> None:
    responses = _stream(server.address, pb.ENCODING_JPEG, num_frames=0)  # 0 = unbounded; the server's limit is 96
    kinds = [r.WhichOneof("response") for r in responses]
    # The first chunk arrives in two messages (its first latent frame's 4 frames, then 8), the others whole.
    assert kinds == ["started"] + ["chunk"] * 9 + ["ended"]
    assert [r.chunk.frame_count for r in responses[1:-1]] == [4, 8] + [12] * 7
    assert [r.chunk.first_frame_index for r in responses[1:-1]] == [0, 4] + list(range(12, 96, 12))
    ended = responses[-1].ended
    assert ended.reason == pb.StreamEnded.REASON_LIMIT_REACHED and ended.frames_sent == 96


def test_metrics_page_matches_the_documented_table(server: ServerHarness) -> None:
    """Every series in docs/serving.md's metrics table is exported with the documented type, and no
    undocumented ``streamgen:*`` one is (prometheus_client's ``*_created`` companions aside; the standard
    ``process_*``/``python_*`` series are tested in test_metrics.py); outcome labels likewise."""
    section = DOCS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(streamgen:[a-z_]+)(?:\{[a-z_]+\})?` \| (\w+) \|(.*)\|$", section, re.MULTILINE)
    documented = {name: kind for name, kind, _ in rows}
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    exported = {name: kind for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE)
                if name.startswith("streamgen:") and not name.endswith("_created")}
    assert documented == exported
    outcome_row = next(meaning for name, _, meaning in rows if name == "streamgen:request_outcome_total")
    assert re.findall(r"`([a-z_]+)`", outcome_row) == list(OUTCOMES)
