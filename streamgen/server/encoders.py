"""Per-stream incremental encoders: one chunk of uint8 RGB frames in, that chunk's bytes out.

Four encodings, one class each behind :class:`ChunkEncoder`:

* ``h264-fmp4``: libx264 (PyAV) packaged as fragmented MP4 by :mod:`streamgen.server.fmp4`;
  ``init_segment`` (ftyp+moov) goes into StreamStarted, each chunk is one or more moof+mdat.
* ``h264-annexb``: the same encoder as an Annex-B byte stream, SPS/PPS repeated on each keyframe.
* ``jpeg``: one JPEG per frame (Pillow's libjpeg: direct quality 1..100, no YUV setup), with sizes.
* ``raw``: RGB24 bytes, frames back to back (exact; for tests and lossless pipelines).

H.264 runs with ``tune=zerolatency``, no B-frames, no scene-cut keyframes and one thread, so
every frame leaves the encoder as soon as it goes in (a chunk is complete when ``encode``
returns) and keyframes fall exactly every ``keyframe_interval`` frames. Timestamps are exact
at any fps: frame ``i`` has pts ``i * time_base_den // fps``.

Encoders hold only codec state. They never talk to the engine or the network, and they are not
thread-safe: each stream owns one and calls it from one task at a time.
"""

from __future__ import annotations

import abc
import enum
import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from streamgen.server import fmp4

H264_TIMESCALE = 90_000  # the MPEG/RTP clock, so pts never needs rounding beyond 1/90 ms
DEFAULT_CRF = 18         # near-transparent at small sizes; the same as streamgen.video_io
DEFAULT_JPEG_QUALITY = 90
MAX_KEYFRAME_INTERVAL = 3600


class Encoding(enum.StrEnum):
    H264_FMP4 = "h264-fmp4"
    H264_ANNEXB = "h264-annexb"
    JPEG = "jpeg"
    RAW_RGB = "raw"


@dataclass(frozen=True)
class EncodedChunk:
    payload: bytes
    frame_sizes: tuple[int, ...] = ()  # JPEG only: byte length of each frame in ``payload``


class ChunkEncoder(abc.ABC):
    """Stream-level facts (for StreamStarted) plus :meth:`encode` for each chunk, in order."""

    encoding: Encoding
    codec: str = ""
    mime_type: str = ""
    init_segment: bytes = b""
    keyframe_interval: int = 0

    def __init__(self, width: int, height: int, fps: int) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.width, self.height, self.fps = width, height, fps
        self.num_frames = 0  # frames encoded so far = index of the next frame

    @property
    def time_base_den(self) -> int:
        return self.fps

    def pts(self, frame_index: int) -> int:
        """Presentation time of frame ``frame_index`` in ``1 / time_base_den`` units."""
        return frame_index * self.time_base_den // self.fps

    def encode(self, frames: np.ndarray) -> EncodedChunk:
        """Encode the next ``np.uint8 [N, H, W, 3]`` frames (N >= 1); returns the complete chunk."""
        if (not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4
                or frames.shape[1:] != (self.height, self.width, 3) or len(frames) == 0):
            raise ValueError(f"expected uint8 frames [N>=1, {self.height}, {self.width}, 3], got "
                             f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', None)}")
        chunk = self._encode(frames)
        self.num_frames += len(frames)
        return chunk

    @abc.abstractmethod
    def _encode(self, frames: np.ndarray) -> EncodedChunk: ...

    def close(self) -> None:  # noqa: B027 - optional hook; only codec-backed encoders free anything
        """Release codec resources (safe to call twice)."""


class _H264(ChunkEncoder):
    """libx264 through a bare PyAV codec context (no muxer: packaging is the subclass's job)."""

    def __init__(self, width: int, height: int, fps: int, *, keyframe_interval: int, crf: int,
                 global_header: bool) -> None:
        super().__init__(width, height, fps)
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs an even width and height, got {width}x{height}")
        if not 1 <= keyframe_interval <= MAX_KEYFRAME_INTERVAL:
            raise ValueError(f"keyframe_interval must lie in [1, {MAX_KEYFRAME_INTERVAL}], got {keyframe_interval}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must lie in [0, 51], got {crf}")
        self.keyframe_interval = keyframe_interval
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, H264_TIMESCALE)
        ctx.framerate = Fraction(fps)
        ctx.max_b_frames = 0
        if global_header:  # SPS/PPS once, in extradata (-> avcC), instead of in-band
            ctx.flags |= av.codec.context.Flags.global_header
        k = keyframe_interval
        ctx.options = {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf), "threads": "1",
                       "x264-params": f"keyint={k}:min-keyint={k}:scenecut=0:bframes=0"}
        ctx.open()
        self._ctx: av.VideoCodecContext | None = ctx

    @property
    def time_base_den(self) -> int:
        return H264_TIMESCALE

    def _packets(self, frames: np.ndarray) -> list[av.Packet]:
        ctx = self._ctx  # one reference for the whole chunk: close() may run meanwhile on another thread
        if ctx is None:
            raise ValueError("encoder is closed")
        packets: list[av.Packet] = []
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.pts(self.num_frames + i)
            frame.time_base = Fraction(1, H264_TIMESCALE)
            packets.extend(ctx.encode(frame))
        if len(packets) != len(frames):  # zerolatency guarantees 1:1; anything else is a config bug
            raise RuntimeError(f"H.264 encoder returned {len(packets)} packets for {len(frames)} frames")
        return packets

    def close(self) -> None:
        self._ctx = None  # PyAV frees the codec with the object; x264's delayed frames are none (zerolatency)


class H264FMP4Encoder(_H264):
    encoding = Encoding.H264_FMP4

    def __init__(self, width: int, height: int, fps: int, *, keyframe_interval: int, crf: int = DEFAULT_CRF) -> None:
        super().__init__(width, height, fps, keyframe_interval=keyframe_interval, crf=crf, global_header=True)
        assert self._ctx is not None
        nals = fmp4.split_annexb(bytes(self._ctx.extradata or b""))
        sps = next((n for n in nals if n[0] & 0x1F == 7), None)
        pps = next((n for n in nals if n[0] & 0x1F == 8), None)
        if sps is None or pps is None:
            raise RuntimeError("libx264 produced no SPS/PPS in its global header")
        self.codec = fmp4.codec_string(sps)
        self.mime_type = f'video/mp4; codecs="{self.codec}"'
        self.init_segment = fmp4.init_segment(width, height, H264_TIMESCALE, sps, pps)
        self._sequence = 0

    def _encode(self, frames: np.ndarray) -> EncodedChunk:
        packets = self._packets(frames)
        samples = [fmp4.Sample(fmp4.annexb_to_avcc_sample(bytes(p)),
                               self.pts(self.num_frames + i + 1) - self.pts(self.num_frames + i), p.is_keyframe)
                   for i, p in enumerate(packets)]
        # frag_keyframe: a new fragment at every keyframe; and the chunk's last fragment ends here.
        out = bytearray()
        start = 0
        for end in range(1, len(samples) + 1):
            if end == len(samples) or samples[end].keyframe:
                self._sequence += 1
                out += fmp4.fragment(self._sequence, self.pts(self.num_frames + start), samples[start:end])
                start = end
        return EncodedChunk(bytes(out))


class H264AnnexBEncoder(_H264):
    encoding = Encoding.H264_ANNEXB
    codec = "h264"
    mime_type = "video/h264"

    def __init__(self, width: int, height: int, fps: int, *, keyframe_interval: int, crf: int = DEFAULT_CRF) -> None:
        super().__init__(width, height, fps, keyframe_interval=keyframe_interval, crf=crf, global_header=False)

    def _encode(self, frames: np.ndarray) -> EncodedChunk:
        return EncodedChunk(b"".join(bytes(p) for p in self._packets(frames)))


class JpegEncoder(ChunkEncoder):
    encoding = Encoding.JPEG
    codec = "jpeg"
    mime_type = "image/jpeg"

    def __init__(self, width: int, height: int, fps: int, *, quality: int = DEFAULT_JPEG_QUALITY) -> None:
        super().__init__(width, height, fps)
        if not 1 <= quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {quality}")
        self.quality = quality

    def _encode(self, frames: np.ndarray) -> EncodedChunk:
        parts = []
        for rgb in frames:
            buf = io.BytesIO()
            Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=self.quality)
            parts.append(buf.getvalue())
        return EncodedChunk(b"".join(parts), tuple(len(p) for p in parts))


class RawEncoder(ChunkEncoder):
    encoding = Encoding.RAW_RGB
    codec = "rgb24"
    mime_type = "video/x-raw; format=RGB"

    def _encode(self, frames: np.ndarray) -> EncodedChunk:
        return EncodedChunk(np.ascontiguousarray(frames).tobytes())


def make_encoder(encoding: Encoding, width: int, height: int, fps: int, *, keyframe_interval: int,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY, crf: int = DEFAULT_CRF) -> ChunkEncoder:
    """The encoder for ``encoding``; raises ``ValueError`` for bad parameters."""
    if encoding is Encoding.H264_FMP4:
        return H264FMP4Encoder(width, height, fps, keyframe_interval=keyframe_interval, crf=crf)
    if encoding is Encoding.H264_ANNEXB:
        return H264AnnexBEncoder(width, height, fps, keyframe_interval=keyframe_interval, crf=crf)
    if encoding is Encoding.JPEG:
        return JpegEncoder(width, height, fps, quality=jpeg_quality)
    if encoding is Encoding.RAW_RGB:
        return RawEncoder(width, height, fps)
    raise ValueError(f"unknown encoding {encoding!r}; valid: {', '.join(e.value for e in Encoding)}")
