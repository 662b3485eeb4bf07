"""Render product clips with exact per-frame ground truth: ``render_clip(spec, num_frames)``.

A frame is the lit background (camera-transformed, with the object's shadow) with the lit
object composited on top with hard edges, so ``mask`` is exactly the set of pixels the
object was drawn on, and object pixels never depend on the background. Every frame is a
pure function of ``(spec, seed, frame index, fps, size)``: frames are drawn one at a time,
each from its own pose, so a long clip begins with exactly the frames of a short one and
any single frame (say frame 10 000) can be rendered on its own with :func:`render_frames`.

Speed: work is numpy-vectorised over pixels; the object and its shadow are drawn only on a
crop around them, and a static camera's background is computed once per clip. Never loop
over pixels in Python here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.attributes import ClipSpec
from trainer.data.backgrounds import background_rgb, shadow_extent, shadow_multiplier
from trainer.data.scene import KEY_LIGHT, FramePose, Scene, frame_pose, make_scene, screen_to_world_affine
from trainer.data.shapes import draw_object, footprint_half_width, object_extent
from trainer.data.surface import Surface

Array = np.ndarray
LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)  # Rec. 709 luminance weights
SPEC_SHININESS = 48.0
SPEC_STRENGTH = 0.85


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class RenderedClip:
    """A rendered clip and its ground truth. ``N`` frames of ``H x W`` pixels.

    frames:      uint8 ``[N, H, W, 3]``
    mask:        bool ``[N, H, W]``, True exactly where the object was drawn
    center:      float32 ``[N, 2]``, the object's centre (axis at mid-height) as (x, y) in [0, 1]
                 image coordinates (x right, y down); analytic, not estimated from pixels
    bbox:        float32 ``[N, 4]``, (x0, y0, x1, y1) in [0, 1] of the mask; NaN if the mask is empty
    object_rgb:  float32 ``[N, 3]``, mean rendered colour of the object pixels in [0, 1]; NaN if empty
    body_rgb:    float32 ``[N, 3]``, the same over the pixels painted in the product's named colour
                 only (no label, cap, metal or sole); NaN if none is visible
    exposure:    float32 ``[N]``, mean Rec. 709 luminance of the whole frame in [0, 1]
    frame_indices: int64 ``[N]``, which frames of the clip these are (row ``i`` is frame
                 ``frame_indices[i]``); ``spec``, ``seed`` and ``fps`` identify the clip
    """

    frames: Array
    mask: Array
    center: Array
    bbox: Array
    object_rgb: Array
    body_rgb: Array
    exposure: Array
    spec: ClipSpec
    seed: int
    fps: float
    frame_indices: Array

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


class _Camera:
    """Pixel grid of one image size; maps between pixel indices and screen/world units."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.half = height / 2.0
        # Screen coordinates of pixel centres: units of half the image height, y up.
        self.sx = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2.0) / self.half)[None, :]
        self.sy = ((height / 2.0 - (np.arange(height, dtype=np.float32) + 0.5)) / self.half)[:, None]
        r2 = self.sx**2 * (self.half / max(width / 2.0, 1.0)) ** 2 + self.sy**2
        self.vignette = (1.0 - 0.16 * np.clip(r2 - 0.2, 0.0, None))[None].astype(np.float32)  # [1, H, W]

    def world_grid(self, scene: Scene, pose: FramePose, rows: slice, cols: slice) -> tuple[Array, Array]:
        """World coordinates ``[1, w]`` and ``[h, 1]`` of a crop (they broadcast to ``[h, w]``)."""
        a, bx, by = screen_to_world_affine(scene, pose)
        return self.sx[:, cols] * np.float32(a) + np.float32(bx), self.sy[rows, :] * np.float32(a) + np.float32(by)

    def crop(self, scene: Scene, pose: FramePose, box: tuple[float, float, float, float]) -> tuple[slice, slice]:
        """Pixel rows/cols covering the world box ``(x_min, x_max, y_min, y_max)``; may be empty."""
        a, bx, by = screen_to_world_affine(scene, pose)
        x_min, x_max, y_min, y_max = box
        c0 = math.floor((x_min - bx) / a * self.half + self.width / 2.0 - 0.5)
        c1 = math.ceil((x_max - bx) / a * self.half + self.width / 2.0 - 0.5) + 1
        r0 = math.floor(self.height / 2.0 - (y_max - by) / a * self.half - 0.5)
        r1 = math.ceil(self.height / 2.0 - (y_min - by) / a * self.half - 0.5) + 1
        return slice(max(r0, 0), max(min(r1, self.height), 0)), slice(max(c0, 0), max(min(c1, self.width), 0))

    def to_image(self, scene: Scene, pose: FramePose, wx: float, wy: float) -> tuple[float, float]:
        """World point -> (x, y) in [0, 1] image coordinates, y down."""
        a, bx, by = screen_to_world_affine(scene, pose)
        sx, sy = (wx - bx) / a, (wy - by) / a
        return (sx * self.half + self.width / 2.0) / self.width, (self.height / 2.0 - sy * self.half) / self.height


def shade(scene: Scene, pose: FramePose, surf: Surface) -> Array:
    """Lambert + Blinn-Phong lighting of a surface: ``[3, h, w]`` float32 RGB.

    The key light is fixed; the specular light sways with time (see ``frame_pose``) so
    glossy products show a travelling highlight. Matte parts have ``gloss = 0``.
    """
    light = scene.lighting
    albedo, n, gloss = surf.resolve()
    lx, ly, lz = (np.float32(v) for v in KEY_LIGHT)
    n_dot_l = np.maximum(n[0] * lx + n[1] * ly + n[2] * lz, 0.0)
    rgb = albedo * (np.float32(light.ambient) + np.float32(light.diffuse) * n_dot_l)[None]
    if gloss.any():
        hx, hy, hz = pose.spec_light[0], pose.spec_light[1], pose.spec_light[2] + 1.0
        inv = 1.0 / math.sqrt(hx * hx + hy * hy + hz * hz)
        hx, hy, hz = np.float32(hx * inv), np.float32(hy * inv), np.float32(hz * inv)
        n_dot_h = np.maximum(n[0] * hx + n[1] * hy + n[2] * hz, 0.0)
        # A sharp highlight plus a broad sheen; both white (dielectric / light metal).
        spec = gloss * np.float32(SPEC_STRENGTH) * (n_dot_h**SPEC_SHININESS + 0.12 * n_dot_h**6)
        rgb += spec[None]
    return rgb * _light_colour(scene)


def _light_colour(scene: Scene) -> Array:
    """Gain times tint, ``[3, 1, 1]``."""
    return (np.float32(scene.lighting.gain) * np.asarray(scene.lighting.tint, dtype=np.float32))[:, None, None]


def _lit_background(scene: Scene, pose: FramePose, cam: _Camera) -> Array:
    """The background as the camera sees it, lit and vignetted: ``[3, H, W]``."""
    wx, wy = cam.world_grid(scene, pose, slice(None), slice(None))
    bg = background_rgb(scene, wx, wy) * _light_colour(scene)
    return np.broadcast_to(bg * cam.vignette, (3, cam.height, cam.width)).astype(np.float32)


def _render_frame(
    scene: Scene, pose: FramePose, cam: _Camera, static_bg: Array | None, flat_background: Array | None
) -> tuple[Array, Array, Array, tuple[slice, slice]]:
    """One frame: ``(rgb [3, H, W] in [0, 1+], mask [H, W], body mask [H, W], object crop)``.

    The body mask marks object pixels painted in the product's own colour.
    """
    if flat_background is not None:
        frame = np.empty((3, cam.height, cam.width), dtype=np.float32)
        frame[...] = flat_background[:, None, None]
    else:
        frame = static_bg.copy() if static_bg is not None else _lit_background(scene, pose, cam)
        footprint = footprint_half_width(scene, pose)
        rows, cols = cam.crop(scene, pose, shadow_extent(scene, footprint))
        if rows.stop > rows.start and cols.stop > cols.start:
            wx, wy = cam.world_grid(scene, pose, rows, cols)
            frame[:, rows, cols] *= shadow_multiplier(scene, footprint, wx, wy)[None]
    mask = np.zeros((cam.height, cam.width), dtype=bool)
    body = np.zeros((cam.height, cam.width), dtype=bool)
    x_min, x_max, y_min, y_max = object_extent(scene, pose)
    box = (scene.x0 + x_min, scene.x0 + x_max, scene.base_y + y_min, scene.base_y + y_max)
    rows, cols = cam.crop(scene, pose, box)
    if rows.stop > rows.start and cols.stop > cols.start:
        wx, wy = cam.world_grid(scene, pose, rows, cols)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        x = np.broadcast_to(wx - np.float32(scene.x0), shape)
        y = np.broadcast_to(wy - np.float32(scene.base_y), shape)
        surf = draw_object(scene, pose, x, y)
        obj = surf.mask
        np.copyto(frame[:, rows, cols], shade(scene, pose, surf), where=obj[None])
        mask[rows, cols] = obj
        body[rows, cols] = surf.colour_mask(scene.albedo)
    return frame, mask, body, (rows, cols)


def _check_size(height: int, width: int, fps: float) -> None:
    if height < 8 or width < 8:
        raise ValueError(f"height and width must be >= 8, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")


def render_frames(
    spec: ClipSpec,
    frame_indices: Sequence[int] | Array,
    height: int = 128,
    width: int = 128,
    fps: float = 16.0,
    seed: int = 0,
    flat_background: tuple[int, int, int] | None = None,
) -> RenderedClip:
    """Render arbitrary frame indices of the clip ``(spec, seed)``; each frame is independent.

    ``flat_background`` replaces the whole background layer (texture, lighting, vignette,
    shadow) with one uint8 colour; tests use it to check that ``mask`` covers exactly the
    pixels the object was drawn on.
    """
    _check_size(height, width, fps)
    indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise ValueError("frame indices must be >= 0")
    scene = make_scene(spec, seed)
    cam = _Camera(height, width)
    flat = None if flat_background is None else np.asarray(flat_background, dtype=np.float32) / 255.0
    static_bg = None
    if flat is None and spec.camera == "static" and indices.size:
        # A static camera sees the same background every frame: compute it once.
        static_bg = _lit_background(scene, frame_pose(scene, 0, fps), cam)
    n = indices.size
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    masks = np.zeros((n, height, width), dtype=bool)
    centers = np.empty((n, 2), dtype=np.float32)
    object_rgb = np.full((n, 3), np.nan, dtype=np.float32)
    body_rgb = np.full((n, 3), np.nan, dtype=np.float32)
    exposure = np.empty(n, dtype=np.float32)
    for i, t in enumerate(indices.tolist()):
        pose = frame_pose(scene, t, fps)
        rgb, mask, body, (rows, cols) = _render_frame(scene, pose, cam, static_bg, flat)
        # Quantise in float (round half up) so the ground truth below sees the exact uint8 values.
        rgb *= 255.0
        rgb += 0.5
        np.clip(rgb, 0.0, 255.0, out=rgb)
        np.floor(rgb, out=rgb)
        # np.stack to channels-last is ~4x faster than assigning a transposed view.
        np.stack((rgb[0], rgb[1], rgb[2]), axis=-1, out=frames[i], casting="unsafe")
        masks[i] = mask
        centers[i] = cam.to_image(scene, pose, *scene.anchor)
        exposure[i] = float(rgb.reshape(3, -1).sum(axis=1, dtype=np.float64) @ LUMA) / (255.0 * height * width)
        object_rgb[i] = _masked_mean(rgb[:, rows, cols], mask[rows, cols])
        body_rgb[i] = _masked_mean(rgb[:, rows, cols], body[rows, cols])
    return RenderedClip(
        frames=frames,
        mask=masks,
        center=centers,
        bbox=mask_bbox(masks),
        object_rgb=object_rgb,
        body_rgb=body_rgb,
        exposure=exposure,
        spec=spec,
        seed=int(seed),
        fps=float(fps),
        frame_indices=indices,
    )


def _masked_mean(rgb: Array, mask: Array) -> Array | float:
    """Mean of quantised ``rgb [3, h, w]`` (0..255 floats) over ``mask``, in [0, 1]; NaN if empty."""
    count = int(mask.sum())
    if count == 0:
        return np.nan
    return (rgb * mask[None]).reshape(3, -1).sum(axis=1, dtype=np.float64) / (255.0 * count)


def render_clip(
    spec: ClipSpec, num_frames: int, height: int = 128, width: int = 128, fps: float = 16.0, seed: int = 0
) -> RenderedClip:
    """Render frames ``0 .. num_frames - 1`` of the clip ``(spec, seed)``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return render_frames(spec, np.arange(num_frames), height=height, width=width, fps=fps, seed=seed)


def mask_bbox(masks: Array) -> Array:
    """``[N, H, W]`` bool -> ``[N, 4]`` (x0, y0, x1, y1) in [0, 1], pixel edges; NaN when empty."""
    n, h, w = masks.shape
    out = np.full((n, 4), np.nan, dtype=np.float32)
    cols, rows = masks.any(axis=1), masks.any(axis=2)
    nonempty = cols.any(axis=1)
    x0 = np.argmax(cols, axis=1)
    x1 = w - np.argmax(cols[:, ::-1], axis=1)
    y0 = np.argmax(rows, axis=1)
    y1 = h - np.argmax(rows[:, ::-1], axis=1)
    out[nonempty] = np.stack((x0 / w, y0 / h, x1 / w, y1 / h), axis=1)[nonempty]
    return out


def masked_mean_rgb(frames: Array, masks: Array) -> Array:
    """Mean colour in [0, 1] of the masked pixels per frame ``[N, 3]``; NaN when empty."""
    counts = masks.sum(axis=(1, 2)).astype(np.float64)
    sums = np.einsum("nhwc,nhw->nc", frames.astype(np.float32), masks.astype(np.float32))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / (255.0 * counts[:, None])).astype(np.float32)


def mean_luminance(frames: Array) -> Array:
    """Mean Rec. 709 luminance in [0, 1] per frame ``[N]`` of uint8 ``[N, H, W, 3]`` frames."""
    return (frames.reshape(frames.shape[0], -1, 3).mean(axis=1, dtype=np.float64) @ LUMA / 255.0).astype(np.float32)
