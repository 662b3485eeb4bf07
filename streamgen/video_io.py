"""Video files with PyAV: model output -> uint8 frames -> H.264 MP4, and back for tests and evaluation.

H.264 is written as libx264, yuv420p, ``tune=zerolatency`` and no B-frames, so every frame
is emitted as soon as it is encoded (a streaming generation appends chunks with
:class:`Mp4Writer` as they are decoded) and any player can open the file. yuv420p stores
colour at half resolution, so width and height must be even; odd sizes raise
``ValueError`` rather than being silently padded or cropped (the caller decides which).

This module only converts and moves pixels to and from files. It must never run a model,
hold generation state, or serve network streams (the server's fMP4/JPEG encoders live in
``streamgen.server``).
"""

from __future__ import annotations

import os
from fractions import Fraction
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import av

__all__ = ["Mp4Writer", "frames_to_uint8", "read_video", "uint8_to_frames", "write_mp4"]

# x264 defaults for our use: near-transparent quality at 128x128 (crf 18) and fast enough to
# never slow a real-time stream ("veryfast").
DEFAULT_CRF = 18
DEFAULT_PRESET = "veryfast"


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[3, N, H, W]`` or ``[1, 3, N, H, W]`` in [-1, 1] -> ``np.uint8`` ``[N, H, W, 3]`` (clamped, rounded)."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"frames_to_uint8 takes one video; got a batch of {video.shape[0]}: pass video[i]")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"frames_to_uint8 expects [3, N, H, W] or [1, 3, N, H, W], got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # [3, N, H, W] in [0, 255]
    return pixels.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()  # [N, H, W, 3]


def uint8_to_frames(frames: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`frames_to_uint8`: ``np.uint8 [N, H, W, 3]`` -> float ``[3, N, H, W]`` in [-1, 1]."""
    _check_frames(frames)
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, N, H, W]


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a np.uint8 array, got {type(frames).__name__} "
                         f"{getattr(frames, 'dtype', '')}".rstrip())
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got shape {frames.shape}")


class Mp4Writer:
    """Append RGB frames to an H.264 MP4 as they are produced; close (or leave the ``with`` block) to finish.

    The frame size is fixed by ``width``/``height`` or, if both are ``None``, by the first :meth:`write`.
    Frames are numbered 0, 1, 2... at ``fps``, so timestamps are exact whatever the chunking.
    """

    def __init__(self, path: str | os.PathLike[str], width: int | None, height: int | None, fps: int | Fraction, *,
                 crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET) -> None:
        if Fraction(fps) <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if (width is None) != (height is None):
            raise ValueError("give both width and height, or neither (size taken from the first frames)")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must lie in [0, 51], got {crf}")
        self.path = os.fspath(path)
        self.fps = Fraction(fps)
        self.crf = crf
        self.preset = preset
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (height, width)
        import av  # here, not at import: the engine needs frames_to_uint8 only, and GPU images may lack PyAV

        self._container = av.open(self.path, mode="w", format="mp4")
        self._stream: av.VideoStream | None = None
        self._closed = False
        if width is not None and height is not None:
            try:
                self._open_stream(height, width)
            except BaseException:
                self._container.close()
                raise

    def _open_stream(self, height: int, width: int) -> None:
        if height <= 0 or width <= 0 or height % 2 or width % 2:
            raise ValueError(f"H.264 yuv420p needs a positive, even width and height, got {width}x{height}: "
                             f"crop or pad the frames first")
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        stream.codec_context.max_b_frames = 0
        stream.options = {"crf": str(self.crf), "preset": self.preset, "tune": "zerolatency", "bf": "0"}
        self._stream = stream
        self._size = (height, width)

    def write(self, frames: np.ndarray) -> None:
        """Encode ``np.uint8`` frames ``[N, H, W, 3]`` (or one ``[H, W, 3]`` frame) and append them."""
        if self._closed:
            raise ValueError(f"Mp4Writer for {self.path} is closed")
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            frames = frames[None]  # [1, H, W, 3]
        _check_frames(frames)
        _, h, w, _ = frames.shape
        if self._stream is None:
            self._open_stream(h, w)
        if (h, w) != self._size:
            raise ValueError(f"frame size {w}x{h} differs from the stream's {self._size[1]}x{self._size[0]}")
        assert self._stream is not None
        import av

        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.num_frames
            frame.time_base = 1 / self.fps
            self._container.mux(self._stream.encode(frame))
            self.num_frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._stream is not None:
                self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int | Fraction, *, crf: int = DEFAULT_CRF,
              preset: str = DEFAULT_PRESET) -> None:
    """Write ``np.uint8`` frames ``[N, H, W, 3]`` (N >= 1, even H and W) to an H.264 MP4 at ``fps``."""
    _check_frames(frames)
    if frames.shape[0] == 0:
        raise ValueError("write_mp4 needs at least one frame")
    _, h, w, _ = frames.shape
    with Mp4Writer(path, w, h, fps, crf=crf, preset=preset) as writer:
        writer.write(frames)


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode the first video stream of a file to ``np.uint8`` RGB frames ``[N, H, W, 3]``."""
    if not os.path.exists(path):
        raise ValueError(f"video file {os.fspath(path)} does not exist")
    import av

    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{os.fspath(path)} has no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{os.fspath(path)} holds no decodable video frames")
    return np.stack(frames)  # [N, H, W, 3]
