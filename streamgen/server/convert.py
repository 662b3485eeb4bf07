"""Protos <-> engine dataclasses, and the status code of every client error.

``StartRequest`` -> :class:`GenerationRequest` (prompt, seed, frames, fps, decoded start image),
the chosen :class:`Encoding` and its parameters; :class:`ChunkOutput` / :class:`FinishReason`
-> ``FrameChunk`` / ``StreamEnded``. Every refusal is a :class:`RequestError` carrying the gRPC
status code and a message meant for the client.

Start images: PNG or JPEG only; EXIF orientation applied; transparency composited over white;
then centre-cropped to the model's aspect ratio and resized (Lanczos) to its exact size, so a
product photo of any size works and keeps its proportions.

Pure conversion: this module never calls the engine, holds no state and never logs request content.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import grpc
import numpy as np

from streamgen.api.v1 import pb
from streamgen.config import Preset
from streamgen.engine.request import ChunkOutput, FinishReason, GenerationRequest
from streamgen.server import image_decode
from streamgen.server.encoders import MAX_KEYFRAME_INTERVAL, EncodedChunk, Encoding

ENCODINGS: dict[int, Encoding] = {
    pb.ENCODING_H264_FMP4: Encoding.H264_FMP4,
    pb.ENCODING_H264_ANNEXB: Encoding.H264_ANNEXB,
    pb.ENCODING_JPEG: Encoding.JPEG,
    pb.ENCODING_RAW_RGB: Encoding.RAW_RGB,
}
ENCODING_TO_PROTO: dict[Encoding, int] = {v: k for k, v in ENCODINGS.items()}

# How a session the engine ran ends on the wire. FinishReason.REJECTED is absent: a session that was
# never admitted is refused with a status code instead (see refusal_of).
REASONS: dict[FinishReason, int] = {
    FinishReason.COMPLETED: pb.StreamEnded.REASON_COMPLETED,
    FinishReason.STOPPED: pb.StreamEnded.REASON_STOPPED,
    FinishReason.SHUTDOWN: pb.StreamEnded.REASON_SERVER_SHUTDOWN,
    FinishReason.LIMIT: pb.StreamEnded.REASON_LIMIT_REACHED,
    FinishReason.ERROR: pb.StreamEnded.REASON_ERROR,
}

class RequestError(Exception):
    """A refused request: the call ends with ``code`` and ``message`` (and no StreamEnded)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StreamPlan:
    """Everything the servicer needs to run one validated StartRequest."""

    request: GenerationRequest
    encoding: Encoding
    fps: int
    keyframe_interval: int
    jpeg_quality: int
    image_bytes: bytes = b""  # the undecoded start image, if any

    def with_image(self, image: np.ndarray) -> StreamPlan:
        return dataclasses.replace(self, request=dataclasses.replace(self.request, start_image=image), image_bytes=b"")


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def encoding_from_proto(value: int) -> Encoding:
    if value == pb.ENCODING_UNSPECIFIED:
        valid = ", ".join(pb.Encoding.Name(k) for k in ENCODINGS)
        raise invalid(f"encoding is ENCODING_UNSPECIFIED: choose one of {valid}")
    if value not in ENCODINGS:
        raise invalid(f"unknown encoding {value}; valid: {', '.join(pb.Encoding.Name(k) for k in ENCODINGS)}")
    return ENCODINGS[value]


def decode_start_image(data: bytes, width: int, height: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> ``np.uint8 [height, width, 3]`` (:func:`streamgen.server.image_decode.decode`),
    a malformed or oversized image refused as INVALID_ARGUMENT. The servicer runs the decode itself
    in worker processes; this in-process form is for tests and tools."""
    try:
        return image_decode.decode(data, width, height, max_pixels)
    except image_decode.ImageError as exc:
        raise invalid(str(exc)) from None


def clean_message(message: str) -> str:
    """A client-facing message without object reprs or memory addresses (``<_io.BytesIO object at 0x..>``)."""
    return image_decode.clean_message(message)


def plan_stream(start: pb.StartRequest, preset: Preset, *, default_keyframe_interval_s: float,
                default_jpeg_quality: int) -> StreamPlan:
    """Validate a StartRequest against the served model; raise :class:`RequestError` on any problem.

    The start image is only size-checked here; the caller decodes ``plan.image_bytes`` with
    :func:`decode_start_image` (off the event loop) and completes the plan with :meth:`StreamPlan.with_image`.

    Limits that the engine owns (prompt length, frame count, fps range, seed) are checked by
    ``Engine.add_request``; its ``ValueError`` becomes INVALID_ARGUMENT in the servicer.
    """
    video = preset.video
    if start.expect_preset and start.expect_preset != preset.name:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"expect_preset is {start.expect_preset!r} but this server runs preset {preset.name!r}")
    if (start.expect_width and start.expect_width != video.width) or \
            (start.expect_height and start.expect_height != video.height):
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"expected {start.expect_width or '*'}x{start.expect_height or '*'} but this server "
                           f"generates {video.width}x{video.height}")
    encoding = encoding_from_proto(start.encoding)
    fps = start.fps or video.fps
    if fps > 240:
        raise invalid(f"fps must be in (0, 240], got {fps}")
    keyframe_interval = start.keyframe_interval or max(1, round(default_keyframe_interval_s * fps))
    if keyframe_interval > MAX_KEYFRAME_INTERVAL:
        raise invalid(f"keyframe_interval must be <= {MAX_KEYFRAME_INTERVAL}, got {keyframe_interval}")
    if start.jpeg_quality > 100:
        raise invalid(f"jpeg_quality must lie in [1, 100] (0 = server default), got {start.jpeg_quality}")
    jpeg_quality = start.jpeg_quality or default_jpeg_quality
    request = GenerationRequest(prompt=start.prompt, seed=start.seed, num_frames=start.num_frames or None,
                                fps=float(fps))
    return StreamPlan(request, encoding, fps, keyframe_interval, jpeg_quality, start.start_image)


def stream_started(session_id: str, preset: Preset, plan: StreamPlan, *, codec: str, mime_type: str,
                   init_segment: bytes, time_base_den: int, keyframe_interval: int, paced: bool) -> pb.GenerateResponse:
    return pb.GenerateResponse(started=pb.StreamStarted(
        session_id=session_id, width=preset.video.width, height=preset.video.height, fps=plan.fps,
        encoding=ENCODING_TO_PROTO[plan.encoding], codec=codec, init_segment=init_segment,
        time_base_den=time_base_den, frames_per_chunk=preset.pixel_frames(preset.sampler.chunk_frames),
        preset=preset.name, keyframe_interval=keyframe_interval, mime_type=mime_type, paced=paced))


def frame_chunk(chunk: ChunkOutput, encoded: EncodedChunk, pts: int, *, encode_ms: float,
                since_start_ms: float) -> pb.GenerateResponse:
    t = chunk.timing
    return pb.GenerateResponse(chunk=pb.FrameChunk(
        first_frame_index=chunk.first_frame_index, frame_count=len(chunk.frames), pts=pts, payload=encoded.payload,
        frame_sizes=list(encoded.frame_sizes),
        timing=pb.ChunkTiming(generate_ms=t.generate_ms, decode_ms=t.decode_ms, encode_ms=encode_ms,
                              queue_ms=t.queue_ms, since_start_ms=since_start_ms)))


def stream_ended(reason: FinishReason, message: str, frames_sent: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(ended=pb.StreamEnded(reason=REASONS[reason], message=clean_message(message),
                                                    frames_sent=frames_sent))


def refusal_of(final: ChunkOutput) -> RequestError | None:
    """The status to end with instead of a StreamEnded: RESOURCE_EXHAUSTED for a session the engine
    never admitted (no KV room within its queue wait), the client's signal to retry elsewhere."""
    if final.finish_reason is FinishReason.REJECTED:
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, final.error or "not admitted")
    return None
