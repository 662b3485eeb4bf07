"""Geometry primitives shared by the product drawers: the painted :class:`Surface`, normals,
sampled profiles, bodies of revolution and elliptical tops.

Coordinates are object-local world units (origin at the base centre, y up) over a pixel
crop, ``[h, w]`` float32; normals are camera space, channels first ``[3, h, w]``. The camera
is orthographic and looks down by the elevation angle of :mod:`trainer.data.scene`. Nothing
here knows product kinds or lighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainer.data.scene import COS_E, SIN_E

Array = np.ndarray
RGB = tuple[float, float, float]


class Surface:
    """What the object looks like before lighting, over a crop: parts painted back to front.

    Painting writes one-byte part and normal ids (cheap) instead of RGB fields; colours,
    gloss and normals are gathered once in :meth:`resolve`.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.part_ids = np.zeros(shape, dtype=np.uint8)  # 0 = no object
        self.normal_ids = np.zeros(shape, dtype=np.uint8)
        self.tone: Array | None = None  # optional per-pixel albedo multiplier
        self._colours: list[RGB] = [(0.0, 0.0, 0.0)]
        self._glosses: list[float] = [0.0]
        self._normals: list[Array] = []

    def add_normal(self, normal: Array | tuple[float, float, float]) -> int:
        """Register a camera-space normal field ``[3, h, w]`` (or a constant 3-vector); returns its id."""
        n = np.asarray(normal, dtype=np.float32)
        self._normals.append(n.reshape(3, 1, 1) if n.ndim == 1 else n)
        return len(self._normals) - 1

    def paint(self, where: Array, rgb: RGB, normal_id: int, gloss: float, tone: float | Array | None = None) -> None:
        """Paint part ``where`` (bool ``[h, w]``) over what is already there."""
        if len(self._colours) > np.iinfo(self.part_ids.dtype).max:
            raise ValueError("too many painted parts for a uint8 part id map")
        self._colours.append(rgb)
        self._glosses.append(gloss)
        np.copyto(self.part_ids, len(self._colours) - 1, where=where)
        np.copyto(self.normal_ids, normal_id, where=where)
        if tone is not None and self.tone is None:
            self.tone = np.ones(self.shape, dtype=np.float32)
        if self.tone is not None:
            np.copyto(self.tone, 1.0 if tone is None else tone, where=where)

    @property
    def mask(self) -> Array:
        return self.part_ids > 0

    def colour_mask(self, rgb: RGB) -> Array:
        """Pixels whose part was painted with exactly ``rgb`` (e.g. the product colour)."""
        return np.take(np.array([c == rgb for c in self._colours]), self.part_ids)

    def resolve(self) -> tuple[Array, Array, Array]:
        """``(albedo [3, h, w], normal [3, h, w], gloss [h, w])`` per pixel (channels first)."""
        # Channels-first throughout: numpy broadcasting over a trailing axis of 3 is an order
        # of magnitude slower than over a leading one.
        albedo = np.take(np.asarray(self._colours, dtype=np.float32).T, self.part_ids, axis=1)
        if self.tone is not None:
            albedo *= self.tone[None]
        gloss = np.take(np.asarray(self._glosses, dtype=np.float32), self.part_ids)
        normal = np.broadcast_to(self._normals[0], (3, *self.shape)) if self._normals else np.zeros((3, *self.shape))
        for i in range(1, len(self._normals)):
            normal = np.where((self.normal_ids == i)[None], self._normals[i], normal)
        return albedo, normal.astype(np.float32, copy=False), gloss


def to_camera(nx: Array, ny: Array, nz: Array) -> Array:
    """Object-space normal (after the turntable rotation) -> camera space ``[3, h, w]``.

    The camera looks down by the elevation angle: world up becomes ``(0, cos e, sin e)``.
    """
    return np.stack((nx, ny * COS_E - nz * SIN_E, ny * SIN_E + nz * COS_E)).astype(np.float32, copy=False)


UP_NORMAL = (0.0, COS_E, SIN_E)


@dataclass
class RevolveHit:
    inside: Array  # bool [h, w]
    u: Array  # height of the visible surface point as a fraction of the object height
    sin_phi: Array  # view longitude of the point, sin/cos
    cos_phi: Array
    normal: Array  # camera space [3, h, w]


class Profile:
    """A function of ``u`` in [0, 1] sampled once, looked up per pixel by nearest sample.

    Evaluating the closed-form profiles (cosine eases, exponentials) per pixel and per
    fixed-point step was the renderer's largest cost; a 1024-entry table is ~4 cheap array
    ops per lookup and its error (u / 1000) is far below a pixel.
    """

    def __init__(self, fn: Callable[[Array], Array], num: int = 1024, margin: float = 0.1) -> None:
        u = np.linspace(-margin, 1.0 + margin, num)
        self.values = fn(u).astype(np.float32)
        self.slopes = np.gradient(self.values, u).astype(np.float32)  # d value / d u
        self._scale = np.float32((num - 1) / (1.0 + 2.0 * margin))
        self._offset = np.float32(margin * (num - 1) / (1.0 + 2.0 * margin) + 0.5)  # + 0.5: round
        self._last = num - 1

    def index(self, u: Array) -> Array:
        return np.clip(u * self._scale + self._offset, 0, self._last).astype(np.intp)

    def __call__(self, u: Array) -> Array:
        return np.take(self.values, self.index(u))


def revolve(x: Array, y: Array, height: float, radius: float, profile: Profile) -> RevolveHit:
    """Front surface of the body of revolution with radius ``radius * profile(u)``, ``u = y / height``.

    Solves ``Y = y cos e - sqrt(r(y)^2 - X^2) sin e`` for ``y`` by two fixed-point steps: exact
    for cylinders, within a fraction of a pixel on our gentle shoulders.
    """
    inv_h = np.float32(1.0 / height)
    values = profile.values * np.float32(radius)
    yy = y * np.float32(1.0 / COS_E)
    x2 = x * x
    for _ in range(2):
        r = np.take(values, profile.index(yy * inv_h))
        yy = (y + np.sqrt(np.maximum(r * r - x2, 0.0)) * np.float32(SIN_E)) * np.float32(1.0 / COS_E)
    u = yy * inv_h
    idx = profile.index(u)
    r = np.take(values, idx)
    inside = (np.abs(x) < r) & (u >= 0.0) & (u <= 1.0)
    sin_phi = np.clip(x / np.maximum(r, 1e-4), -1.0, 1.0)
    cos_phi = np.sqrt(1.0 - sin_phi * sin_phi)
    # dr/dy tilts the normal up on shoulders and down at rounded bases.
    slope = np.take(profile.slopes, idx) * np.float32(radius / height)
    inv = 1.0 / np.sqrt(1.0 + slope * slope)
    normal = to_camera(sin_phi * inv, -slope * inv, cos_phi * inv)
    return RevolveHit(inside, u, sin_phi, cos_phi, normal)


def ellipse_top(x: Array, y: Array, radius: float, top_y: float) -> Array:
    """Pixels of the horizontal disc of ``radius`` at height ``top_y`` (an ellipse on screen)."""
    dy = (y - np.float32(top_y * COS_E)) * np.float32(1.0 / (radius * SIN_E))
    return (x * x) * np.float32(1.0 / (radius * radius)) + dy * dy <= 1.0


def longitude(hit: RevolveHit, angle: float, lon: float) -> tuple[Array, Array]:
    """``cos, sin`` of (surface longitude - ``lon``): equal to 1, 0 where ``lon`` faces the camera."""
    ca, sa = np.float32(math.cos(angle - lon)), np.float32(math.sin(angle - lon))
    return hit.cos_phi * ca - hit.sin_phi * sa, hit.sin_phi * ca + hit.cos_phi * sa


def ease(u: Array, u0: float, u1: float, r0: float, r1: float) -> Array:
    """Radius going smoothly from ``r0`` at ``u0`` to ``r1`` at ``u1`` (cosine ease)."""
    t = np.clip((u - np.float32(u0)) * np.float32(1.0 / (u1 - u0)), 0.0, 1.0)
    return np.float32(r0) + np.float32(r1 - r0) * (0.5 - 0.5 * np.cos(np.float32(np.pi) * t))
