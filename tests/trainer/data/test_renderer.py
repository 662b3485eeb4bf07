"""Renderer: determinism, exact ground truth, long-clip consistency, colours, motion."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from trainer.data.attributes import CAMERAS, COLOURS, KINDS, ClipSpec, sample_clip_spec
from trainer.data.renderer import RenderedClip, mask_bbox, masked_mean_rgb, mean_luminance, render_clip, render_frames

SIZE = 64  # small frames keep the suite fast; geometry is resolution independent


def _spec(kind: str = "mug", **kw: str) -> ClipSpec:
    base = {"colour": "blue", "material": "glossy", "background": "wooden_table", "motion": "fast",
            "camera": "zoom_in", "lighting": "soft", "tint": "neutral"}
    base.update(kw)
    return ClipSpec(kind=kind, **base)


def _assert_same(a: RenderedClip, b: RenderedClip) -> None:
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.mask, b.mask)
    for name in ("center", "bbox", "object_rgb", "body_rgb", "exposure"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_shapes_and_dtypes() -> None:
    clip = render_clip(_spec(), 5, height=48, width=80, seed=1)
    assert clip.frames.shape == (5, 48, 80, 3) and clip.frames.dtype == np.uint8
    assert clip.mask.shape == (5, 48, 80) and clip.mask.dtype == bool
    assert clip.center.shape == (5, 2) and clip.bbox.shape == (5, 4)
    assert clip.object_rgb.shape == (5, 3) and clip.body_rgb.shape == (5, 3) and clip.exposure.shape == (5,)
    assert clip.mask.any(axis=(1, 2)).all()
    assert ((clip.exposure > 0) & (clip.exposure < 1)).all()
    with pytest.raises(ValueError):
        render_clip(_spec(), 0)


def test_same_seed_identical_different_seed_different() -> None:
    spec = sample_clip_spec(11)
    _assert_same(render_clip(spec, 6, SIZE, SIZE, seed=4), render_clip(spec, 6, SIZE, SIZE, seed=4))
    a = render_clip(spec, 6, SIZE, SIZE, seed=4).frames
    b = render_clip(spec, 6, SIZE, SIZE, seed=5).frames
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0
    other = render_clip(sample_clip_spec(12), 6, SIZE, SIZE, seed=4).frames
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_drawn_pixels(kind: str) -> None:
    """Render over two different flat backgrounds: a pixel belongs to the object iff it is the
    same in both. Object pixels must also be identical to the real render (they never depend
    on the background), and background pixels must not be."""
    for camera, seed in zip(("static", "zoom_in", "pan_left"), (0, 1, 2), strict=True):
        spec = _spec(kind, camera=camera)
        frames = [0, 7, 23]
        black = render_frames(spec, frames, SIZE, SIZE, seed=seed, flat_background=(0, 0, 0))
        white = render_frames(spec, frames, SIZE, SIZE, seed=seed, flat_background=(255, 255, 255))
        real = render_frames(spec, frames, SIZE, SIZE, seed=seed)
        shows_background = (black.frames != white.frames).any(axis=-1)
        np.testing.assert_array_equal(~shows_background, real.mask)
        np.testing.assert_array_equal(black.mask, real.mask)
        np.testing.assert_array_equal(black.frames[real.mask], real.frames[real.mask])
        assert (black.frames[~real.mask] == 0).all() and (white.frames[~real.mask] == 255).all()


def test_center_inside_mask_bbox_and_bbox_matches_mask() -> None:
    for seed, camera in enumerate(CAMERAS * 2):
        spec = dataclasses.replace(sample_clip_spec(100 + seed), camera=camera)
        clip = render_clip(spec, 40, SIZE, SIZE, seed=seed)
        x, y = clip.center[:, 0], clip.center[:, 1]
        x0, y0, x1, y1 = clip.bbox.T
        assert ((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).all(), (spec, seed)
        ys, xs = np.nonzero(clip.mask[-1])
        assert clip.bbox[-1] == pytest.approx([xs.min() / SIZE, ys.min() / SIZE, (xs.max() + 1) / SIZE,
                                               (ys.max() + 1) / SIZE])
    np.testing.assert_array_equal(mask_bbox(np.zeros((1, 4, 4), dtype=bool)), np.full((1, 4), np.nan))


@pytest.mark.parametrize("kind", KINDS)
def test_long_clip_starts_with_the_short_clip(kind: str) -> None:
    spec = _spec(kind, camera="pan_right")
    long = render_clip(spec, 60, SIZE, SIZE, seed=9)
    short = render_clip(spec, 12, SIZE, SIZE, seed=9)
    np.testing.assert_array_equal(long.frames[:12], short.frames)
    np.testing.assert_array_equal(long.mask[:12], short.mask)
    np.testing.assert_array_equal(long.center[:12], short.center)
    # Any frame renders on its own, in any order.
    picked = render_frames(spec, [59, 3, 30], SIZE, SIZE, seed=9)
    np.testing.assert_array_equal(picked.frames, long.frames[[59, 3, 30]])
    np.testing.assert_array_equal(picked.exposure, long.exposure[[59, 3, 30]])


def test_ground_truth_helpers_agree_with_the_clip() -> None:
    clip = render_clip(_spec("box", camera="zoom_out"), 8, SIZE, SIZE, seed=2)
    np.testing.assert_allclose(mean_luminance(clip.frames), clip.exposure, atol=1e-5)
    np.testing.assert_allclose(masked_mean_rgb(clip.frames, clip.mask), clip.object_rgb, atol=1e-5)
    assert (clip.mask.sum(axis=(1, 2)) > 0).all()


def test_object_colour_matches_the_named_colour_under_neutral_light() -> None:
    """``body_rgb`` (pixels in the product colour) must map back to the right name among all
    named colours and equal the albedo times a shading factor up to 0.1 per channel.
    ``object_rgb`` also averages labels, caps, rims and soles, so its tolerance is 0.35."""
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names]) / 255.0
    for (kind, colour), material in itertools.product(itertools.product(KINDS, names), ("matte", "glossy")):
        spec = _spec(kind, colour=colour, material=material, background="white_table", motion="slow",
                     camera="static", lighting="soft", tint="neutral")
        clip = render_clip(spec, 3, SIZE, SIZE, seed=len(kind) + names.index(colour))
        body, whole = np.nanmean(clip.body_rgb, axis=0), clip.object_rgb.mean(axis=0)
        albedo = palette[names.index(colour)]
        nearest = names[int(np.linalg.norm(0.85 * palette - body, axis=1).argmin())]
        assert nearest == colour, (kind, colour, material, body)
        # Shading scales brightness; it must not shift the hue: fit the scale, check the rest.
        scale = float(body @ albedo / (albedo @ albedo))
        assert 0.6 < scale < 1.35 and np.abs(body - scale * albedo).max() < 0.1, (kind, colour, material, body)
        assert np.abs(whole - 0.85 * albedo).max() < 0.35, (kind, colour, material, whole)


def test_lighting_changes_exposure_and_tint() -> None:
    exposure = {}
    for lighting in ("dim", "soft", "bright"):
        exposure[lighting] = render_clip(_spec(lighting=lighting), 2, SIZE, SIZE, seed=3).exposure.mean()
    assert exposure["dim"] < exposure["soft"] < exposure["bright"]
    warm = render_clip(_spec(tint="warm"), 2, SIZE, SIZE, seed=3).frames.reshape(-1, 3).mean(axis=0)
    cool = render_clip(_spec(tint="cool"), 2, SIZE, SIZE, seed=3).frames.reshape(-1, 3).mean(axis=0)
    assert warm[0] / warm[2] > cool[0] / cool[2]


def test_motion_and_camera_show_in_pixels_and_ground_truth() -> None:
    def frame_change(clip: RenderedClip) -> float:
        return float(np.abs(np.diff(clip.frames.astype(np.int16), axis=0)).mean())

    still = render_clip(_spec(material="matte", motion="still", camera="static"), 10, SIZE, SIZE, seed=4)
    assert frame_change(still) == 0.0  # nothing moves: every frame is the same
    slow = render_clip(_spec(material="matte", motion="slow", camera="static"), 10, SIZE, SIZE, seed=4)
    fast = render_clip(_spec(material="matte", motion="fast", camera="static"), 10, SIZE, SIZE, seed=4)
    assert 0.0 < frame_change(slow) < frame_change(fast)
    glossy_still = render_clip(_spec(material="glossy", motion="still", camera="static"), 10, SIZE, SIZE, seed=4)
    assert frame_change(glossy_still) > 0.0  # the specular highlight travels

    area = {cam: render_clip(_spec("can", camera=cam), 30, SIZE, SIZE, seed=4).mask.sum(axis=(1, 2))
            for cam in ("zoom_in", "zoom_out")}
    assert area["zoom_in"][-1] > 1.3 * area["zoom_in"][0] and area["zoom_out"][-1] < 0.7 * area["zoom_out"][0]
    left = render_clip(_spec("can", camera="pan_left"), 30, SIZE, SIZE, seed=4).center[:, 0]
    right = render_clip(_spec("can", camera="pan_right"), 30, SIZE, SIZE, seed=4).center[:, 0]
    assert (np.diff(left) > 0).all() and (np.diff(right) < 0).all()  # camera left => scene moves right
