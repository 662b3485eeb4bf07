"""trainer.eval.motion on constructed clips: camera moves read by caption, judder told from smooth motion,
bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.data.attributes import ClipSpec
from trainer.data.captions import caption
from trainer.eval import motion

SIZE, FRAMES = 64, 24


def square_clip(sizes: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """A red square of side ``sizes[t]`` centred at column ``centres[t]`` on a grey ground, uint8 [F, S, S, 3]."""
    clip = np.full((len(sizes), SIZE, SIZE, 3), 128, np.uint8)
    for t, (side, cx) in enumerate(zip(sizes, centres, strict=True)):
        half = side / 2
        r0, r1 = int(round(SIZE / 2 - half)), int(round(SIZE / 2 + half))
        c0, c1 = int(round(cx - half)), int(round(cx + half))
        clip[t, r0:r1, c0:c1] = (220, 30, 30)
    return clip


def moves() -> dict[str, np.ndarray]:
    t = np.arange(FRAMES, dtype=np.float64)
    still = np.full(FRAMES, 16.0)
    centre = np.full(FRAMES, SIZE / 2)
    return {"static": square_clip(still, centre),
            "zoom_in": square_clip(14 + 0.5 * t, centre),    # grows: area x ~2.2
            "zoom_out": square_clip(26 - 0.5 * t, centre),   # shrinks
            "pan_left": square_clip(still, centre + 0.4 * t),   # the camera pans left: the scene moves right
            "pan_right": square_clip(still, centre - 0.4 * t)}


def test_camera_moves_are_read_per_caption() -> None:
    clips = moves()
    prompts = [caption(ClipSpec(kind="box", colour="red", camera=cam)) for cam in clips]
    result = motion.camera_moves(np.stack(list(clips.values())), prompts, window=6)
    assert {cam: result[cam]["clips"] for cam in motion.CAMERAS} == dict.fromkeys(motion.CAMERAS, 1)
    ratio = {cam: result[cam]["area_ratio"]["median"] for cam in motion.CAMERAS}
    shift = {cam: result[cam]["centroid_shift"] for cam in motion.CAMERAS}
    assert ratio["static"] == pytest.approx(1.0, abs=0.02)
    assert ratio["zoom_in"] > 1.6 and ratio["zoom_out"] < 0.6
    assert shift["pan_left"] > 0.08 and shift["pan_right"] < -0.08 and abs(shift["static"]) < 0.01
    # A caption that cannot be parsed is skipped, not guessed.
    skipped = motion.camera_moves(np.stack([clips["zoom_in"]]), ["a box that zooms"], window=6)
    assert skipped["skipped"]["clips"] == 1 and skipped["zoom_in"]["clips"] == 0


def test_judder_tells_held_frames_from_smooth_motion() -> None:
    t = np.arange(FRAMES, dtype=np.float64)
    smooth = square_clip(np.full(FRAMES, 16.0), SIZE / 2 - 12 + t)  # one column a frame
    held = square_clip(np.full(FRAMES, 16.0), SIZE / 2 - 12 + (t // 4) * 4)  # still 3 frames, then 4 columns
    p_smooth = motion.phase_profile(np.stack([smooth] * 3), group=4)
    p_held = motion.phase_profile(np.stack([held] * 3), group=4)
    assert p_smooth["judder"] == pytest.approx(1.0)
    assert p_held["judder"] > 3.5
    assert p_held["judder_interval"][0] > p_smooth["judder_interval"][1]  # identical clips: degenerate intervals
    # Clips that disagree give an interval that holds the point and has width.
    mixed = motion.phase_profile(np.stack([smooth, held, smooth, held, held, smooth]), group=4)
    low, high = mixed["judder_interval"]
    assert low <= mixed["judder"] <= high and high - low > 0.1
    assert sum(v == 0 for v in p_held["phase_median_change"]) == 3  # three phases hold, one jumps
    with pytest.raises(ValueError, match="more than 4 frames"):
        motion.phase_profile(np.stack([smooth[:4]]), group=4)


def test_cli_reports_a_stored_set_and_refuses_bad_windows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clips = moves()
    prompts = [caption(ClipSpec(kind="box", colour="red", camera=cam)) for cam in clips]
    set_dir = tmp_path / "set"
    set_dir.mkdir()
    np.savez(set_dir / "clips.npz", frames=np.stack(list(clips.values())))
    (set_dir / "clips.json").write_text(json.dumps({"names": list(clips), "prompts": prompts, "fps": 16.0}))
    out = tmp_path / "motion.json"
    assert motion.main([str(set_dir), "--frames", "24", "--window", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())[str(set_dir)]
    assert report["clips"] == 5 and report["camera"]["zoom_in"]["area_ratio"]["median"] > 1.6
    assert "| zoom_out | 1 |" in capsys.readouterr().out
    assert motion.main([str(set_dir), "--frames", "24", "--window", "13"]) == 2
    assert "--frames >= 2 x --window" in capsys.readouterr().err
    assert motion.main([str(set_dir), "--frames", "24", "--window", "5"]) == 2  # could never hold 6 reliable frames
    assert "--window >= 6" in capsys.readouterr().err
    assert motion.main([str(set_dir), "--frames", "30", "--window", "6"]) == 2
    assert "clips shorter than --frames 30" in capsys.readouterr().err
