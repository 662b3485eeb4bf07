"""Per-clip scene parameters and the per-frame pose, both pure functions of (spec, seed, t).

The renderer must be able to draw frame 10_000 of a clip without drawing frames 0..9_999,
and a long clip must start with exactly the frames of a short one. So everything that moves
is a closed-form function of the frame index here (no integration, no per-frame random
draws), and everything random is drawn once per clip from the render seed in
:func:`make_scene`. This module computes scalars only; it never touches pixel arrays.

Coordinates: *world* units have the screen's half-height = 1 at zoom 1, x right, y up.
Objects stand on a table at ``y = base_y``; the camera looks down at :data:`ELEVATION_RAD`
(orthographic), and zoom/pan act as a 2-D similarity transform of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainer.data.attributes import ClipSpec

ELEVATION_RAD = math.radians(14.0)
COS_E = math.cos(ELEVATION_RAD)
SIN_E = math.sin(ELEVATION_RAD)

# Turntable angular speed in rad/s (sign drawn per clip). Slow is a full turn in 8 s,
# fast in 2.5 s: at 16 fps that is ~2.8 and ~9 degrees per frame.
ROTATION_SPEED_RAD_S: dict[str, float] = {"still": 0.0, "slow": 2 * math.pi / 8.0, "fast": 2 * math.pi / 2.5}

# Camera moves approach their end value exponentially with this time constant. A clip of
# any length therefore stays framed (the move slows down and the object never leaves the
# picture), and the first seconds, which training sees most, have the strongest motion.
CAMERA_TAU_S = 3.0
# (zoom at t=0, zoom at t=inf, pan_x at t=0, pan_x at t=inf). Panning the camera left moves
# the scene to the right in the image.
CAMERA_PATHS: dict[str, tuple[float, float, float, float]] = {
    "static": (1.0, 1.0, 0.0, 0.0),
    "zoom_in": (0.9, 1.45, 0.0, 0.0),
    "zoom_out": (1.4, 0.85, 0.0, 0.0),
    "pan_left": (1.0, 1.0, 0.28, -0.32),
    "pan_right": (1.0, 1.0, -0.28, 0.32),
}


@dataclass(frozen=True)
class Lighting:
    """Illumination of a clip: ``object = albedo * gain * tint * (ambient + diffuse * n.L) + spec``."""

    gain: float
    ambient: float
    diffuse: float
    shadow_strength: float
    shadow_spread: float
    tint: tuple[float, float, float]


_LIGHTING_LEVELS: dict[str, tuple[float, float, float, float, float]] = {
    # gain, ambient, diffuse, shadow strength, shadow spread (soft light = wide, weak shadow)
    "soft": (1.0, 0.62, 0.5, 0.30, 1.7),
    "bright": (1.22, 0.38, 0.72, 0.55, 1.0),
    "dim": (0.55, 0.45, 0.50, 0.38, 1.35),
}
TINT_RGB: dict[str, tuple[float, float, float]] = {
    "neutral": (1.0, 1.0, 1.0),
    "warm": (1.08, 0.98, 0.80),
    "cool": (0.86, 0.96, 1.10),
}
# Key light in camera space (x right, y up, z towards the viewer): upper left, in front.
KEY_LIGHT = tuple(float(v) for v in np.array([-0.45, 0.55, 0.70]) / np.linalg.norm([-0.45, 0.55, 0.70]))


def make_lighting(spec: ClipSpec) -> Lighting:
    gain, ambient, diffuse, strength, spread = _LIGHTING_LEVELS[spec.lighting]
    return Lighting(gain, ambient, diffuse, strength, spread, TINT_RGB[spec.tint])


# Object height in world units and footprint radius (half-width for box / shoe), per kind.
_KIND_SIZE: dict[str, tuple[float, float]] = {
    "bottle": (1.15, 0.22),
    "mug": (0.76, 0.35),
    "box": (0.95, 0.34),
    "can": (0.92, 0.27),
    "shoe": (0.48, 0.58),
    "jar": (0.86, 0.38),
}
# Label / accent / cap colours are mixes of the product colour so that the mean object
# colour stays close to the named colour (the colour-drift metric relies on it).
_CAP_CHOICES: tuple[tuple[float, float, float], ...] = ((0.92, 0.92, 0.90), (0.15, 0.15, 0.17), (0.72, 0.73, 0.76))


@dataclass(frozen=True)
class Scene:
    """Everything about a clip that does not change over time. Built by :func:`make_scene`."""

    spec: ClipSpec
    seed: int
    albedo: tuple[float, float, float]
    label_rgb: tuple[float, float, float]
    accent_rgb: tuple[float, float, float]
    cap_rgb: tuple[float, float, float]
    height: float
    radius: float
    depth_ratio: float
    x0: float
    base_y: float
    horizon_y: float
    angle0: float
    rotation_speed: float
    label_lon: float
    label_half_width: float
    lighting: Lighting
    gloss: float
    spec_phase: float
    bg_tone: float
    bg_phase: float
    bg_scale: float

    @property
    def anchor(self) -> tuple[float, float]:
        """World point the camera zooms about: the middle of the object."""
        return self.x0, self.base_y + 0.5 * self.height * COS_E


@dataclass(frozen=True)
class FramePose:
    """Everything that moves, at one frame index."""

    frame_index: int
    angle: float
    zoom: float
    pan_x: float
    spec_light: tuple[float, float, float]


def _mix(a: tuple[float, ...], b: tuple[float, ...], w: float) -> tuple[float, float, float]:
    return (a[0] * (1 - w) + b[0] * w, a[1] * (1 - w) + b[1] * w, a[2] * (1 - w) + b[2] * w)


def make_scene(spec: ClipSpec, seed: int) -> Scene:
    """Draw the nuisance parameters of a clip (size, placement, start angle, label) from ``seed``."""
    # A SeedSequence keyed on a constant keeps the scene stream independent of any other
    # use of the same integer seed (e.g. sample_clip_spec).
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CE7E]))
    albedo = tuple(c / 255.0 for c in spec.colour_rgb)
    height, radius = _KIND_SIZE[spec.kind]
    scale = float(rng.uniform(0.9, 1.1))
    height, radius = height * scale, radius * scale
    x0 = float(rng.uniform(-0.12, 0.12))
    base_y = -0.5 * height * COS_E - 0.06 + float(rng.uniform(-0.05, 0.05))
    white, black = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    # Labels are a lighter tone of the product colour on dark products, a darker tone on
    # light ones, so the label reads as printed matter without shifting the mean colour far.
    lum = 0.2126 * albedo[0] + 0.7152 * albedo[1] + 0.0722 * albedo[2]
    label_rgb = _mix(albedo, white, 0.3) if lum < 0.55 else _mix(albedo, black, 0.25)
    accent_rgb = _mix(albedo, white, 0.7) if lum < 0.55 else _mix(albedo, black, 0.6)
    cap_rgb = _CAP_CHOICES[int(rng.integers(len(_CAP_CHOICES)))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return Scene(
        spec=spec,
        seed=int(seed),
        albedo=(albedo[0], albedo[1], albedo[2]),
        label_rgb=label_rgb,
        accent_rgb=accent_rgb,
        cap_rgb=cap_rgb,
        height=height,
        radius=radius,
        depth_ratio=float(rng.uniform(0.45, 0.8)),
        x0=x0,
        base_y=base_y,
        horizon_y=base_y + float(rng.uniform(0.42, 0.6)),
        angle0=float(rng.uniform(0, 2 * math.pi)),
        rotation_speed=sign * ROTATION_SPEED_RAD_S[spec.motion],
        label_lon=float(rng.uniform(-0.3, 0.3)),
        label_half_width=float(rng.uniform(1.0, 1.5)),
        lighting=make_lighting(spec),
        gloss=1.0 if spec.material == "glossy" else 0.0,
        spec_phase=float(rng.uniform(0, 2 * math.pi)),
        bg_tone=float(rng.uniform(-1.0, 1.0)),
        bg_phase=float(rng.uniform(0, 100.0)),
        bg_scale=float(rng.uniform(0.85, 1.2)),
    )


def frame_pose(scene: Scene, frame_index: int, fps: float) -> FramePose:
    """Pose at ``frame_index``: a closed-form function of the index, so any frame renders alone."""
    if frame_index < 0:
        raise ValueError(f"frame_index must be >= 0, got {frame_index}")
    t_s = frame_index / fps
    zoom0, zoom1, pan0, pan1 = CAMERA_PATHS[scene.spec.camera]
    progress = 1.0 - math.exp(-t_s / CAMERA_TAU_S)
    # The specular light sways left-right (period 5 s) so glossy highlights visibly travel
    # over the surface even on a rotationally symmetric object or a still turntable.
    azimuth = -0.35 + 0.55 * math.sin(2 * math.pi * t_s / 5.0 + scene.spec_phase)
    elevation = 0.45
    spec_light = (math.sin(azimuth) * math.cos(elevation), math.sin(elevation), math.cos(azimuth) * math.cos(elevation))
    return FramePose(
        frame_index=frame_index,
        angle=scene.angle0 + scene.rotation_speed * t_s,
        zoom=zoom0 + (zoom1 - zoom0) * progress,
        pan_x=pan0 + (pan1 - pan0) * progress,
        spec_light=spec_light,
    )


def world_to_screen(scene: Scene, pose: FramePose, wx: float, wy: float) -> tuple[float, float]:
    """World point -> screen coordinates (half-height units, y up) under the pose's camera."""
    ax, ay = scene.anchor
    return ax + (wx - pose.pan_x - ax) * pose.zoom, ay + (wy - ay) * pose.zoom


def screen_to_world_affine(scene: Scene, pose: FramePose) -> tuple[float, float, float]:
    """``(a, bx, by)`` with ``world = a * screen + (bx, by)``: the inverse camera, as scalars."""
    ax, ay = scene.anchor
    inv = 1.0 / pose.zoom
    return inv, ax * (1 - inv) + pose.pan_x, ay * (1 - inv)
