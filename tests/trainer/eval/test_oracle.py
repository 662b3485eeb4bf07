"""Oracle metrics: a normal rendered clip is clean; frozen, over-exposed, recoloured and moved clips are caught."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.data.attributes import COLOURS, ClipSpec, attribute_dict
from trainer.data.renderer import RenderedClip, render_clip
from trainer.eval.oracle import (
    COLOUR_NAMES,
    OracleConfig,
    camera_path,
    named_colour_residuals,
    oracle_metrics,
    rgb_to_lab,
    window_bounds,
    window_means,
)

from .conftest import FPS, SIZE, brighten


def _flags(frames: np.ndarray, attrs: dict[str, str] | None) -> dict[str, bool]:
    results, _ = oracle_metrics(frames, FPS, attrs)
    return {name: r.flagged for name, r in results.items()}


def test_normal_rendered_clip_is_not_flagged(normal_clip: RenderedClip) -> None:
    results, _ = oracle_metrics(normal_clip.frames, FPS, attribute_dict(normal_clip.spec))
    assert not any(r.flagged for r in results.values()), {n: r.note for n, r in results.items()}
    colour = results["colour_drift"].summary
    assert colour["prompt_match_rate"] > 0.9 and colour["chroma_delta_end"] < 5.0
    assert results["motion"].summary["frozen_fraction"] == 0.0
    assert results["subject_drift"].summary["shift_end"] < 0.02


def test_frozen_clip_scores_as_frozen(normal_clip: RenderedClip) -> None:
    frozen = np.repeat(normal_clip.frames[:1], normal_clip.num_frames, axis=0)
    results, _ = oracle_metrics(frozen, FPS, attribute_dict(normal_clip.spec))
    assert results["motion"].flagged
    assert results["motion"].summary["frozen_fraction"] == 1.0
    assert results["motion"].summary["motion_mean"] == 0.0


def test_clip_that_freezes_after_a_second_is_flagged(normal_clip: RenderedClip) -> None:
    frames = normal_clip.frames.copy()
    frames[16:] = frames[16]
    assert _flags(frames, attribute_dict(normal_clip.spec))["motion"]


def test_freeze_is_not_flagged_when_the_prompt_asks_for_a_still_product(normal_clip: RenderedClip) -> None:
    frozen = np.repeat(normal_clip.frames[:1], normal_clip.num_frames, axis=0)
    attrs = attribute_dict(normal_clip.spec) | {"motion": "still"}
    results, _ = oracle_metrics(frozen, FPS, attrs)
    assert not results["motion"].flagged and "still" in results["motion"].note


def test_overexposed_clip_scores_as_overexposed(normal_clip: RenderedClip) -> None:
    results, _ = oracle_metrics(brighten(normal_clip.frames, 2.5), FPS, attribute_dict(normal_clip.spec))
    over = results["overexposure"]
    assert over.flagged, over.note
    assert over.summary["clipped_rise"] > 0.3 and over.summary["luma_slope_per_s"] > 0


def test_colour_shifted_clip_scores_as_drifted(normal_clip: RenderedClip) -> None:
    """After the first second the product's pixels drift from red to blue (channels swapped, blended in)."""
    frames = normal_clip.frames.astype(np.float64)
    n = normal_clip.num_frames
    weight = np.clip((np.arange(n) - 16) / (n - 1 - 16), 0.0, 1.0)[:, None]
    obj = normal_clip.mask
    frames[obj] = (1 - np.repeat(weight, obj.sum(axis=(1, 2)), axis=0)) * frames[obj] \
        + np.repeat(weight, obj.sum(axis=(1, 2)), axis=0) * frames[obj][:, ::-1]
    results, _ = oracle_metrics(frames.round().astype(np.uint8), FPS, attribute_dict(normal_clip.spec))
    colour = results["colour_drift"]
    assert colour.flagged, colour.note
    assert colour.summary["prompt_match_start"] == 1.0 and colour.summary["prompt_match_end"] < 0.5
    assert not results["overexposure"].flagged


def test_subject_sliding_down_the_frame_is_flagged(normal_clip: RenderedClip) -> None:
    """After the first second the picture rolls down by 0.3 of its height within half a second and stays
    there (rows wrap around, which the per-row palette does not mind)."""
    t = np.arange(normal_clip.num_frames)
    shift = (np.clip((t - 16) / 8, 0.0, 1.0) * 0.3 * SIZE).round().astype(int)
    frames = np.stack([np.roll(f, s, axis=0) for f, s in zip(normal_clip.frames, shift, strict=True)])
    subject = oracle_metrics(frames, FPS, attribute_dict(normal_clip.spec))[0]["subject_drift"]
    assert subject.flagged and "centre moved" in subject.note, subject.note
    assert 0.2 < subject.summary["shift_end"] < 0.3


@pytest.mark.parametrize("camera", ["pan_left", "pan_right", "zoom_in"])
def test_camera_path_matches_the_renderer_ground_truth(camera: str) -> None:
    """The closed-form camera shift equals the renderer's true object centre (exact up to float32)."""
    spec = ClipSpec(kind="box", colour="green", camera=camera, motion="still")
    clip = render_clip(spec, 40, 32, 32, FPS, seed=0)
    zoom, shift_x = camera_path(camera, 40, FPS)
    np.testing.assert_allclose(clip.center[:, 0] - clip.center[0, 0], shift_x, atol=1e-5)
    np.testing.assert_allclose(clip.center[:, 1], clip.center[0, 1], atol=1e-5)
    assert zoom[0] == pytest.approx({"pan_left": 1.0, "pan_right": 1.0, "zoom_in": 0.9}[camera])


def test_rgb_to_lab_reference_values() -> None:
    lab = rgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.02)


def test_named_colours_explain_themselves_under_shading_and_tint() -> None:
    palette = np.array([COLOURS[c] for c in COLOUR_NAMES]) / 255.0
    for scale in (0.45, 1.0, 1.3):
        residuals = named_colour_residuals(palette * scale)
        np.testing.assert_array_equal(residuals.argmin(axis=1), np.arange(len(COLOUR_NAMES)))
    warm = palette * np.array([1.08, 0.98, 0.80])  # the renderer's warm tint
    np.testing.assert_array_equal(named_colour_residuals(warm, "warm").argmin(axis=1), np.arange(len(COLOUR_NAMES)))


def test_windows_exact() -> None:
    assert window_bounds(10, 4) == [(0, 4), (4, 8)]
    assert window_bounds(3, 4) == [(0, 3)]
    np.testing.assert_array_equal(window_means(np.arange(8.0), 4), [1.5, 5.5])
    means = window_means(np.array([np.nan, np.nan, 1.0, 3.0]), 2)
    assert math.isnan(means[0]) and means[1] == 2.0


def test_config_and_input_validation() -> None:
    with pytest.raises(ValueError, match="clip_level"):
        OracleConfig(clip_level=0)
    with pytest.raises(ValueError, match="uint8"):
        oracle_metrics(np.zeros((2, 8, 8, 3), dtype=np.float32), FPS)
    with pytest.raises(ValueError, match="unknown camera"):
        camera_path("dolly", 4, FPS)
