"""Proto -> request conversion: start-image fitting (centre crop + resize, alpha over white), defaults."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from streamgen.api.v1 import pb
from streamgen.engine.request import ChunkOutput, FinishReason
from streamgen.server.convert import REASONS, RequestError, decode_start_image, plan_stream, refusal_of
from streamgen.server.encoders import Encoding
from tests.server.harness import PRESET


def _png(array: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_start_image_is_centre_cropped_then_resized() -> None:
    wide = np.zeros((40, 120, 3), np.uint8)  # [H, W, 3]: green | red | blue thirds
    wide[:, :40] = (0, 255, 0)
    wide[:, 40:80] = (255, 0, 0)
    wide[:, 80:] = (0, 0, 255)
    fitted = decode_start_image(_png(wide), 32, 32, max_pixels=10**6)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    # Only the centre square survives (Lanczos may blend a pixel of the neighbours in at the very edge).
    assert np.abs(fitted[:, 1:-1].astype(int) - (255, 0, 0)).max() <= 2


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    fitted = decode_start_image(_png(rgba, "RGBA"), 32, 32, max_pixels=10**6)
    assert (fitted == 255).all()


def test_image_over_the_pixel_limit_is_refused_before_decoding() -> None:
    with pytest.raises(RequestError, match="limit is 100 pixels") as refused:
        decode_start_image(_png(np.zeros((20, 20, 3), np.uint8)), 32, 32, max_pixels=100)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_plan_defaults() -> None:
    start = pb.StartRequest(prompt="a mug", encoding=pb.ENCODING_H264_FMP4)
    plan = plan_stream(start, PRESET, default_keyframe_interval_s=2.0,
                       default_jpeg_quality=90)
    assert plan.request.num_frames is None and plan.request.start_image is None  # 0 frames = unbounded
    assert (plan.encoding, plan.fps, plan.keyframe_interval, plan.jpeg_quality) == (Encoding.H264_FMP4, 16, 32, 90)


def test_every_engine_outcome_maps_to_a_reason_or_a_status() -> None:
    # A session the engine ran ends with a StreamEnded reason; one it never admitted is refused.
    assert set(REASONS) == set(FinishReason) - {FinishReason.REJECTED}
    empty = np.zeros((0, 32, 32, 3), np.uint8)

    def final(reason: FinishReason, error: str | None = None) -> ChunkOutput:
        return ChunkOutput("s", 0, empty, finished=True, finish_reason=reason, error=error)

    refused = refusal_of(final(FinishReason.REJECTED, "not admitted within 0.3 s: pool exhausted"))
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.message == "not admitted within 0.3 s: pool exhausted"
    # The message alone decides nothing: an engine error that happens to read alike is still an error.
    for reason in REASONS:
        assert refusal_of(final(reason, "not admitted within 0.3 s")) is None
