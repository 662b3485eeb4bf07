"""Encoders: incremental (each chunk complete on its own), FFmpeg-decodable, exact timestamps and GOPs."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from streamgen.server import fmp4
from streamgen.server.encoders import (
    Encoding,
    H264AnnexBEncoder,
    H264FMP4Encoder,
    JpegEncoder,
    RawEncoder,
    make_encoder,
)
from tests.server.harness import psnr


def _clip(num_frames: int = 30, height: int = 32, width: int = 48) -> np.ndarray:
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    base = 128 + 60 * np.sin((x + 2 * t) / 6) + 40 * np.cos(y / 5)
    return np.stack([base, 0.5 * base + 40, 255 - base], axis=-1).clip(0, 255).astype(np.uint8)  # [N, H, W, 3]


@pytest.mark.parametrize("fps", [16, 7])
def test_fmp4_chunks_concatenate_into_a_valid_file(fps: int) -> None:
    clip = _clip()
    enc = H264FMP4Encoder(48, 32, fps, keyframe_interval=8)
    pieces = [enc.init_segment]
    for start in range(0, 30, 12):  # chunks of 12, 12, 6
        chunk = enc.encode(clip[start:start + 12])
        assert [k for k, _, _ in fmp4.iter_boxes(chunk.payload)][0] == b"moof"
        pieces.append(chunk.payload)
    with av.open(io.BytesIO(b"".join(pieces))) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (48, 32)
        decoded = list(container.decode(video=0))
    assert [f.pts for f in decoded] == [i * 90_000 // fps for i in range(30)]
    assert [i for i, f in enumerate(decoded) if f.key_frame] == [0, 8, 16, 24]
    frames = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    assert psnr(frames, clip) >= 30.0
    assert enc.mime_type == f'video/mp4; codecs="{enc.codec}"' and enc.codec.startswith("avc1.")


def test_fmp4_reader_round_trips_samples_and_codec_config() -> None:
    clip = _clip(12)
    enc = H264FMP4Encoder(48, 32, 16, keyframe_interval=4)
    payload = enc.encode(clip).payload
    samples = fmp4.fragment_samples(payload)
    assert len(samples) == 12
    assert sum(1 for kind, _, _ in fmp4.iter_boxes(payload) if kind == b"moof") == 3  # a fragment per GOP
    sps, pps = fmp4.read_avcc(enc.init_segment)
    assert sps[0] & 0x1F == 7 and pps[0] & 0x1F == 8
    decoder = av.CodecContext.create("h264", "r")
    first = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x00\x01" + pps
    frames = [f for i, s in enumerate(samples)
              for f in decoder.decode(av.Packet((first if i == 0 else b"") + fmp4.samples_to_annexb([s])))]
    assert len(frames) == 12  # zerolatency: a frame out for every sample in, nothing held back


def test_annexb_repeats_parameter_sets_on_keyframes() -> None:
    enc = H264AnnexBEncoder(48, 32, 16, keyframe_interval=6)
    payload = enc.encode(_clip(12)).payload
    types = [nal[0] & 0x1F for nal in fmp4.split_annexb(payload)]
    assert types.count(7) == 2 and types.count(8) == 2 and types.count(5) == 2  # 2 IDRs, each with SPS+PPS


def test_jpeg_and_raw() -> None:
    clip = _clip(5)
    jpeg = JpegEncoder(48, 32, 16, quality=95).encode(clip)
    assert len(jpeg.frame_sizes) == 5 and sum(jpeg.frame_sizes) == len(jpeg.payload)
    assert jpeg.payload[:2] == b"\xff\xd8"
    raw = RawEncoder(48, 32, 16).encode(clip)
    assert raw.payload == clip.tobytes() and raw.frame_sizes == ()


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="even width and height"):
        H264FMP4Encoder(33, 32, 16, keyframe_interval=8)
    with pytest.raises(ValueError, match="keyframe_interval must lie in"):
        H264FMP4Encoder(32, 32, 16, keyframe_interval=0)
    with pytest.raises(ValueError, match="jpeg_quality must lie in"):
        JpegEncoder(32, 32, 16, quality=0)
    enc = make_encoder(Encoding.RAW_RGB, 32, 32, 16, keyframe_interval=1)
    with pytest.raises(ValueError, match=r"expected uint8 frames \[N>=1, 32, 32, 3\]"):
        enc.encode(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="expected uint8 frames"):
        enc.encode(np.zeros((0, 32, 32, 3), np.uint8))
