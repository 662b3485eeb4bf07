"""Video files: tensor <-> uint8 conversion, H.264 MP4 round trip, incremental writer, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamgen.video_io import Mp4Writer, frames_to_uint8, read_video, uint8_to_frames, write_mp4

FPS = 16


def _smooth_clip(num_frames: int = 24, height: int = 48, width: int = 64) -> np.ndarray:
    """A moving colour gradient with a soft blob: smooth, so H.264 at crf 18 should be near-lossless."""
    t = np.arange(num_frames)[:, None, None] / num_frames
    y = np.linspace(0.0, 1.0, height)[None, :, None]
    x = np.linspace(0.0, 1.0, width)[None, None, :]
    blob = np.exp(-(((x - 0.3 - 0.4 * t) ** 2) + (y - 0.5) ** 2) / 0.02)
    rgb = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (x + t)) * np.ones_like(y),
                    0.2 + 0.6 * y * np.ones_like(x + t),
                    0.3 + 0.6 * blob], axis=-1)  # [N, H, W, 3] in [0, 1]
    return (rgb * 255).round().astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_frames_to_uint8_exact_values() -> None:
    video = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 5, 1, 1).expand(3, 5, 2, 2)  # [3, N, H, W]
    frames = frames_to_uint8(video)
    assert frames.dtype == np.uint8 and frames.shape == (5, 2, 2, 3)
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    np.testing.assert_array_equal(frames_to_uint8(video[None]), frames)
    np.testing.assert_array_equal(frames_to_uint8(uint8_to_frames(frames)), frames)


def test_frames_to_uint8_bad_shapes() -> None:
    with pytest.raises(ValueError, match="batch of 2"):
        frames_to_uint8(torch.zeros(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[3, N, H, W\]"):
        frames_to_uint8(torch.zeros(4, 4, 8, 8))


def test_round_trip_size_count_and_quality(tmp_path: Path) -> None:
    clip = _smooth_clip()
    path = tmp_path / "clip.mp4"
    write_mp4(path, clip, FPS)
    decoded = read_video(path)
    assert decoded.shape == clip.shape and decoded.dtype == np.uint8
    assert _psnr(decoded, clip) >= 30.0


def test_incremental_writer_matches_one_shot(tmp_path: Path) -> None:
    clip = _smooth_clip(num_frames=20)
    write_mp4(tmp_path / "one.mp4", clip, FPS)
    with Mp4Writer(tmp_path / "inc.mp4", None, None, FPS) as writer:  # size from the first chunk
        for chunk in np.split(clip, [4, 12, 13]):  # chunks of 4, 8, 1 and 7 frames
            writer.write(chunk)
        assert writer.num_frames == len(clip)
    one, inc = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "inc.mp4")
    assert inc.shape == one.shape == clip.shape
    np.testing.assert_array_equal(inc, one)  # x264 is deterministic: the same frames give the same file


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even width and height"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), np.uint8), FPS)
    with pytest.raises(ValueError, match="np.uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32), FPS)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        write_mp4(tmp_path / "g.mp4", np.zeros((2, 32, 32, 4), np.uint8), FPS)
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "h.mp4", 32, 32, 0)
    with Mp4Writer(tmp_path / "i.mp4", 32, 32, FPS) as writer:
        with pytest.raises(ValueError, match="differs"):
            writer.write(np.zeros((1, 16, 16, 3), np.uint8))
        writer.write(np.zeros((32, 32, 3), np.uint8))  # a single [H, W, 3] frame is accepted
    with pytest.raises(ValueError, match="closed"):
        writer.write(np.zeros((1, 32, 32, 3), np.uint8))
    assert read_video(tmp_path / "i.mp4").shape == (1, 32, 32, 3)


def test_read_video_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
