"""Procedural backgrounds and the object's shadow, as closed-form functions of world coordinates.

Each background is a function ``(scene, wx, wy) -> rgb [3, h, w]`` (channels first) evaluated on world
coordinates, so camera zoom and pan move the table and the wall exactly like the object:
there is no texture to resample and no state. Values are reflectances lit by a neutral
light of gain 1; the renderer applies the clip's lighting gain and tint afterwards.

The table is a horizontal plane behind ``scene.horizon_y``: its texture is evaluated in
perspective coordinates (``depth ~ 1 / distance below the horizon``) so planks converge and
speckles shrink towards the back edge. Far texture fades to its mean colour instead of
aliasing. This module must never depend on the object: the mask ground truth relies on
background pixels being independent of what is drawn on top.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trainer.data.scene import Scene

Array = np.ndarray
BackgroundFn = Callable[[Scene, Array, Array], Array]


def smoothstep(edge0: float, edge1: float, x: Array) -> Array:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (element-wise)."""
    t = np.clip((x - edge0) * (1.0 / (edge1 - edge0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def hash2(ix: Array, iy: Array) -> Array:
    """Deterministic pseudo-random value in [0, 1) per integer cell (the classic sin-hash)."""
    v = np.sin(ix * np.float32(12.9898) + iy * np.float32(78.233)) * np.float32(43758.547)
    return v - np.floor(v)


def _rgb(lum: Array, colour: tuple[float, float, float]) -> Array:
    """Scalar field times a colour: ``[h, w] -> [3, h, w]``."""
    return lum[None] * np.asarray(colour, dtype=np.float32)[:, None, None]


def _mix(a: Array, b: Array, w: Array) -> Array:
    """``a + (b - a) * w`` with ``w`` a ``[h, w]`` field broadcast over channels."""
    return a + (b - a) * w[None]


def _table_coords(scene: Scene, wx: Array, wy: Array) -> tuple[Array, Array, Array]:
    """``(below, tx, tz)``: table mask and perspective texture coordinates (lateral, depth)."""
    dist = scene.horizon_y - wy
    below = dist > 0
    tz = 1.0 / (np.maximum(dist, 0.0) + np.float32(0.06))
    tx = (wx - np.float32(scene.x0)) * tz
    return below, tx, tz


def _wall_gradient(scene: Scene, wy: Array, colour: tuple[float, float, float], top: float, bottom: float) -> Array:
    g = smoothstep(scene.horizon_y, scene.horizon_y + 1.6, wy)
    tone = np.float32(1.0 + 0.05 * scene.bg_tone)
    return _rgb((bottom + (top - bottom) * g) * tone, colour)


def white_table(scene: Scene, wx: Array, wy: Array) -> Array:
    below, _, tz = _table_coords(scene, wx, wy)
    wall = _wall_gradient(scene, wy, (0.86, 0.86, 0.85), 0.80, 0.93)
    # Brighter towards the camera, a thin darker back edge where the table meets the wall.
    table_lum = 0.97 - 0.10 * smoothstep(1.5, 9.0, tz)
    table_lum = np.where((tz > 11.0) & below, np.float32(0.78), table_lum)
    table = _rgb(table_lum, (0.97, 0.965, 0.95))
    return np.where(below[None], table, wall)


def wooden_table(scene: Scene, wx: Array, wy: Array) -> Array:
    below, tx, tz = _table_coords(scene, wx, wy)
    wall = _wall_gradient(scene, wy, (0.80, 0.75, 0.68), 0.78, 0.92)
    plank_w = np.float32(0.42 * scene.bg_scale)
    u = tx / plank_w
    plank = np.floor(u)
    frac = u - plank
    # Grain runs along the plank (the depth axis) and wobbles with depth; each plank gets
    # its own tone and phase so seams read even without the dark gap.
    wobble = np.sin(tz * np.float32(1.9) + plank * np.float32(1.7) + np.float32(scene.bg_phase))
    grain = np.sin((frac * 7.0 + 0.9 * wobble + plank * 0.37) * np.float32(2 * np.pi))
    tone = hash2(plank, np.float32(3.0))
    lum = 0.78 + 0.12 * grain + 0.22 * (tone - 0.5)
    seam = (frac < 0.035) | (frac > 0.975)
    lum = np.where(seam, lum * np.float32(0.55), lum)
    far = smoothstep(4.0, 12.0, tz)
    lum = lum + (0.8 - lum) * far
    light, dark = (0.66, 0.45, 0.27), (0.56, 0.36, 0.20)
    wood = _mix(_rgb(lum, light), _rgb(lum, dark), 0.5 + 0.5 * np.clip(tone - 0.5, -0.5, 0.5))
    return np.where(below[None], wood, wall)


def dark_studio(scene: Scene, wx: Array, wy: Array) -> Array:
    dx = wx - np.float32(scene.x0)
    # A seamless sweep: a spotlight pool behind the object and on the floor, no visible edge.
    back = np.exp(-(dx * dx * np.float32(1.1) + (wy - np.float32(scene.horizon_y + 0.3)) ** 2 * np.float32(1.6)))
    floor_w = smoothstep(scene.horizon_y + 0.15, scene.horizon_y - 0.25, wy)
    pool = np.exp(-(dx * dx * np.float32(2.0) + (wy - np.float32(scene.base_y)) ** 2 * np.float32(9.0)))
    lum = 0.06 + 0.16 * back + floor_w * (0.04 + 0.14 * pool)
    return _rgb(lum * np.float32(1.0 + 0.1 * scene.bg_tone), (0.92, 0.95, 1.0))


def blue_gradient(scene: Scene, wx: Array, wy: Array) -> Array:
    dx = wx - np.float32(scene.x0)
    g = smoothstep(-1.3, 1.4, wy)
    deep = np.asarray((0.10, 0.22, 0.52), dtype=np.float32)[:, None, None]
    light = np.asarray((0.60, 0.74, 0.92), dtype=np.float32)[:, None, None]
    rgb = light + (deep - light) * g[None]
    glow = np.exp(-(dx * dx * np.float32(0.9) + (wy - np.float32(scene.horizon_y)) ** 2 * np.float32(2.0)))
    return rgb * (0.85 + 0.25 * glow + 0.04 * scene.bg_tone)[None]


def kitchen_counter(scene: Scene, wx: Array, wy: Array) -> Array:
    below, tx, tz = _table_coords(scene, wx, wy)
    # Wall: offset subway tiles with grout lines, a faint per-tile tone.
    tile_w, tile_h = np.float32(0.30 * scene.bg_scale), np.float32(0.15 * scene.bg_scale)
    v = (wy - np.float32(scene.horizon_y)) / tile_h
    row = np.floor(v)
    u = wx / tile_w + 0.5 * (row - 2.0 * np.floor(row * 0.5))
    col = np.floor(u)
    grout = ((u - col) < 0.05) | ((v - row) < 0.09)
    tile_lum = 0.90 + 0.06 * hash2(col, row) + 0.04 * (v - row)
    wall = _rgb(np.where(grout, np.float32(0.70), tile_lum), (0.96, 0.94, 0.88))
    # Counter: grey granite with dark and light speckles in perspective, fading far away.
    speck = hash2(np.floor(tx * np.float32(22.0)), np.floor(tz * np.float32(22.0)))
    lum = 0.55 + 0.1 * speck + np.where(speck > 0.9, np.float32(0.12), np.float32(0.0))
    lum = lum + (0.6 - lum) * smoothstep(2.5, 8.0, tz)
    lum = np.where(tz > 11.5, np.float32(0.32), lum)  # the back edge of the counter
    counter = _rgb(lum, (0.74, 0.74, 0.76))
    return np.where(below[None], counter, wall)


BACKGROUNDS: dict[str, BackgroundFn] = {
    "white_table": white_table,
    "wooden_table": wooden_table,
    "dark_studio": dark_studio,
    "blue_gradient": blue_gradient,
    "kitchen_counter": kitchen_counter,
}


def background_rgb(scene: Scene, wx: Array, wy: Array) -> Array:
    """Background reflectance, float32 ``[3, h, w]`` or broadcastable to it.

    ``wx`` and ``wy`` are world coordinates that broadcast to ``[h, w]`` (``[1, w]`` and
    ``[h, 1]`` from the renderer, so backgrounds that vary along one axis stay cheap).
    """
    try:
        fn = BACKGROUNDS[scene.spec.background]
    except KeyError:
        raise ValueError(f"unknown background {scene.spec.background!r}; valid: {list(BACKGROUNDS)}") from None
    return fn(scene, wx, wy).astype(np.float32, copy=False)


def _shadow_blobs(scene: Scene, footprint_half_width: float) -> tuple[tuple[float, float, float, float], ...]:
    """``(centre_dx, centre_dy, radius_x, radius_y)`` of the contact and the cast shadow,
    relative to the base centre. The key light is upper-left and in front, so the cast
    shadow falls to the right and behind the object, i.e. up and right in the image; soft
    light spreads it wider."""
    spread = scene.lighting.shadow_spread
    contact = (0.0, 0.0, footprint_half_width * 1.1 + 0.02, scene.radius * 0.45 + 0.02)
    cast = (0.22 * scene.height * spread, 0.06 * spread, (footprint_half_width + 0.25 * scene.height) * spread,
            0.09 * spread + 0.03)
    return contact, cast


# Each blob is exp(-FALLOFF * q^2) of its normalised radius q; at q = 3 it is ~1e-5 (< 1/255).
_SHADOW_FALLOFF = 1.3
_SHADOW_REACH = 3.0


def shadow_extent(scene: Scene, footprint_half_width: float) -> tuple[float, float, float, float]:
    """World box ``(x_min, x_max, y_min, y_max)`` outside which :func:`shadow_multiplier` rounds to 1."""
    blobs = _shadow_blobs(scene, footprint_half_width)
    x_min = min(cx - _SHADOW_REACH * rx for cx, _, rx, _ in blobs)
    x_max = max(cx + _SHADOW_REACH * rx for cx, _, rx, _ in blobs)
    y_min = min(cy - _SHADOW_REACH * ry for _, cy, _, ry in blobs)
    y_max = max(cy + _SHADOW_REACH * ry for _, cy, _, ry in blobs)
    return scene.x0 + x_min, scene.x0 + x_max, scene.base_y + y_min, scene.base_y + y_max


def shadow_multiplier(scene: Scene, footprint_half_width: float, wx: Array, wy: Array) -> Array:
    """Darkening of the table by the object, in (0, 1] ``[h, w]``: contact shadow + cast shadow."""
    dx = wx - np.float32(scene.x0)
    dy = wy - np.float32(scene.base_y)
    dark = None
    for (cx, cy, rx, ry), weight in zip(_shadow_blobs(scene, footprint_half_width), (0.9, 0.7), strict=True):
        qx, qy = (dx - np.float32(cx)) * np.float32(1.0 / rx), (dy - np.float32(cy)) * np.float32(1.0 / ry)
        blob = np.float32(weight) * np.exp((qx * qx + qy * qy) * np.float32(-_SHADOW_FALLOFF))
        dark = blob if dark is None else dark + blob
    return 1.0 - np.minimum(np.float32(scene.lighting.shadow_strength) * dark, np.float32(0.85))
