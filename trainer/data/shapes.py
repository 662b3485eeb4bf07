"""Product geometry: per kind, which pixels the object covers, with albedo, normal and gloss.

Each drawer maps object-local coordinates ``X, Y`` (world units, origin at the base centre,
y up, ``[h, w]`` float32 over a crop around the object) and a :class:`FramePose` to a
:class:`~trainer.data.surface.Surface`. Geometry is an orthographic turntable seen from
slightly above: bottle, mug, can and jar are surfaces of revolution, the box is a rotated
cuboid whose visible faces are parallelograms, and the shoe is an extruded side profile
intersected along each pixel's view ray. Labels, handles and stripes are attached to the
surface (longitude, face coordinates), so rotation shows. No shading happens here: the
renderer lights the surface, which keeps the geometry reusable for masks and ground truth.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from trainer.data.backgrounds import smoothstep
from trainer.data.scene import COS_E, SIN_E, FramePose, Scene
from trainer.data.surface import RGB, UP_NORMAL, Profile, Surface, ease, ellipse_top, longitude, revolve, to_camera

Array = np.ndarray
Vec3 = tuple[float, float, float]
METAL_RGB: RGB = (0.74, 0.75, 0.78)
METAL_GLOSS = 0.7
CAP_GLOSS = 0.35


def _bottle(u: Array) -> Array:
    body = np.where(u < 0.04, ease(u, 0.0, 0.04, 0.9, 1.0), ease(u, 0.55, 0.77, 1.0, 0.36))
    return np.where(u > 0.86, 0.43, body)


def _can(u: Array) -> Array:
    return np.where(u < 0.5, ease(u, 0.0, 0.07, 0.86, 1.0), ease(u, 0.91, 0.97, 1.0, 0.9))


def _jar(u: Array) -> Array:
    body = np.where(u < 0.08, ease(u, 0.0, 0.08, 0.88, 1.0), ease(u, 0.66, 0.78, 1.0, 0.8))
    return np.where(u > 0.79, 0.86, body)


def _shoe_top_unit(u: Array) -> Array:
    """Upper edge of the shoe's side profile over its height: high heel collar with a dip
    for the opening, a sloping instep, a low rounded toe."""
    sole = 0.16
    top = 1.0 - 0.6 * smoothstep(0.3, 0.95, u) - 0.14 * np.exp(-(((u - 0.16) / 0.09) ** 2))
    rounding = np.sqrt(np.clip((1.0 - u) / 0.2, 0.0, 1.0) * np.clip(u / 0.03, 0.0, 1.0))
    return sole + (top - sole) * rounding


# Radius over height of the bodies of revolution as a fraction of the footprint radius;
# for the shoe, the height of the upper edge as a fraction of the shoe's height.
_PROFILE_FNS: dict[str, Callable[[Array], Array]] = {
    "bottle": _bottle,
    "mug": lambda u: 0.93 + 0.07 * np.clip(u, 0.0, 1.0),
    "can": _can,
    "jar": _jar,
    "shoe": _shoe_top_unit,
}


@functools.cache
def _profile(kind: str) -> Profile:
    """The sampled unit profile of ``kind``, built on first use (pure, so caching is safe)."""
    return Profile(_PROFILE_FNS[kind])


def draw_bottle(scene: Scene, pose: FramePose, x: Array, y: Array) -> Surface:
    h, r = scene.height, scene.radius
    cap = 0.43 * r
    hit = revolve(x, y, h, r, _profile("bottle"))
    surf = Surface(x.shape)
    body_n, top_n = surf.add_normal(hit.normal), surf.add_normal(UP_NORMAL)
    surf.paint(hit.inside, scene.albedo, body_n, scene.gloss)
    cos_d, sin_d = longitude(hit, pose.angle, scene.label_lon)
    u = hit.u
    label = hit.inside & (u > 0.14) & (u < 0.48) & (cos_d > math.cos(scene.label_half_width))
    surf.paint(label, scene.label_rgb, body_n, 0.5 * scene.gloss)
    logo = label & (u > 0.26) & (u < 0.36) & (np.abs(sin_d) < 0.5 * math.sin(scene.label_half_width))
    surf.paint(logo, scene.accent_rgb, body_n, 0.5 * scene.gloss)
    surf.paint(hit.inside & (u > 0.86), scene.cap_rgb, body_n, CAP_GLOSS)
    surf.paint(ellipse_top(x, y, cap, h), scene.cap_rgb, top_n, CAP_GLOSS)
    return surf


def _mug_handle(scene: Scene, pose: FramePose, x: Array, y: Array) -> tuple[Array, Array, bool]:
    """Handle pixels, their normal, and whether the handle is in front of the body.

    The handle is half a ring in the plane through the axis at the handle's longitude; seen
    from the camera it is an elliptical arc whose width shrinks as it turns towards us.
    """
    h, r = scene.height, scene.radius
    phi = scene.label_lon + 0.5 * math.pi - pose.angle  # view longitude of the handle
    s, c = math.sin(phi), math.cos(phi)
    centre_r, semi_r, semi_v, thick = 0.9 * r, 0.55 * r, 0.3 * h, 0.055 * h
    xc, yc = centre_r * s, 0.5 * h * COS_E - centre_r * c * SIN_E
    a = semi_r * abs(s)
    dx, dy = x - np.float32(xc), y - np.float32(yc)
    ex, ey = dx * np.float32(1.0 / (a + thick)), dy * np.float32(1.0 / (semi_v + thick))
    handle = (ex * ex + ey * ey <= 1.0) & (dx * np.float32(1.0 if s >= 0 else -1.0) >= 0.0)
    if a > thick:
        hx, hy = dx * np.float32(1.0 / (a - thick)), dy * np.float32(1.0 / (semi_v - thick))
        handle &= hx * hx + hy * hy >= 1.0
    nx = np.clip(ex, -1.0, 1.0) * np.float32(0.7) + np.float32(0.5 * s)
    ny = np.clip(ey, -1.0, 1.0) * np.float32(0.7)
    norm = 1.0 / np.sqrt(nx * nx + ny * ny + np.float32(0.5))
    normal = np.stack((nx * norm, ny * norm, np.float32(math.sqrt(0.5)) * norm))
    return handle, normal, c > 0


def draw_mug(scene: Scene, pose: FramePose, x: Array, y: Array) -> Surface:
    h, r = scene.height, scene.radius
    hit = revolve(x, y, h, r, _profile("mug"))
    surf = Surface(x.shape)
    body_n, top_n, flat_n = surf.add_normal(hit.normal), surf.add_normal(UP_NORMAL), surf.add_normal((0, 0, 1))
    handle, handle_normal, handle_front = _mug_handle(scene, pose, x, y)
    handle_n = surf.add_normal(handle_normal)
    if not handle_front:
        surf.paint(handle, scene.albedo, handle_n, scene.gloss)
    surf.paint(hit.inside, scene.albedo, body_n, scene.gloss)
    u = hit.u
    surf.paint(hit.inside & (u > 0.8) & (u < 0.86), scene.label_rgb, body_n, scene.gloss)
    cos_d, sin_d = longitude(hit, pose.angle, scene.label_lon)
    logo = hit.inside & (u > 0.28) & (u < 0.66) & (cos_d > math.cos(0.55))
    surf.paint(logo, scene.label_rgb, body_n, scene.gloss)
    dot = logo & ((sin_d * np.float32(1 / 0.3)) ** 2 + ((u - 0.47) * np.float32(10.0)) ** 2 < 1.0)
    surf.paint(dot, scene.accent_rgb, body_n, scene.gloss)
    # Rim, then the inside: a glazed interior, darker towards the front wall which shades it.
    surf.paint(ellipse_top(x, y, r, h), scene.albedo, top_n, scene.gloss)
    depth = np.clip((y - np.float32(h * COS_E)) * np.float32(1.0 / (0.86 * r * SIN_E)), -1.0, 1.0)
    surf.paint(ellipse_top(x, y, 0.86 * r, h), scene.albedo, flat_n, 0.0, tone=0.45 + 0.25 * depth)
    if handle_front:
        surf.paint(handle, scene.albedo, handle_n, scene.gloss)
    return surf


def draw_can(scene: Scene, pose: FramePose, x: Array, y: Array) -> Surface:
    h, r = scene.height, scene.radius
    hit = revolve(x, y, h, r, _profile("can"))
    surf = Surface(x.shape)
    body_n, top_n = surf.add_normal(hit.normal), surf.add_normal(UP_NORMAL)
    surf.paint(hit.inside, scene.albedo, body_n, scene.gloss)
    u = hit.u
    cos_d, sin_d = longitude(hit, pose.angle, scene.label_lon)
    # A wave around the can: its crests travel across the body as the can turns.
    surf.paint(hit.inside & (np.abs(u - 0.52 - 0.12 * sin_d) < 0.06), scene.accent_rgb, body_n, scene.gloss)
    logo = hit.inside & (u > 0.2) & (u < 0.36) & (cos_d > math.cos(0.5))
    surf.paint(logo, scene.label_rgb, body_n, scene.gloss)
    surf.paint(hit.inside & ((u < 0.07) | (u > 0.92)), METAL_RGB, body_n, METAL_GLOSS)
    surf.paint(ellipse_top(x, y, 0.9 * r, h), METAL_RGB, top_n, METAL_GLOSS)
    surf.paint(ellipse_top(x, y, 0.78 * r, h), (0.6, 0.61, 0.64), top_n, METAL_GLOSS)
    return surf


def draw_jar(scene: Scene, pose: FramePose, x: Array, y: Array) -> Surface:
    h, r = scene.height, scene.radius
    lid_r = 0.86 * r
    hit = revolve(x, y, h, r, _profile("jar"))
    surf = Surface(x.shape)
    body_n, top_n = surf.add_normal(hit.normal), surf.add_normal(UP_NORMAL)
    surf.paint(hit.inside, scene.albedo, body_n, scene.gloss)
    u = hit.u
    cos_d, sin_d = longitude(hit, pose.angle, scene.label_lon)
    label = hit.inside & (u > 0.17) & (u < 0.6) & (cos_d > math.cos(scene.label_half_width))
    surf.paint(label, scene.label_rgb, body_n, 0.3 * scene.gloss)
    lines = label & (np.abs(sin_d) < 0.55 * math.sin(scene.label_half_width))
    lines &= (np.abs(u - 0.32) < 0.025) | (np.abs(u - 0.42) < 0.05)
    surf.paint(lines, scene.accent_rgb, body_n, 0.3 * scene.gloss)
    # Ridges on the lid: fixed in view (the lid is symmetric), so they read as texture.
    ridge = np.where(np.sin(hit.sin_phi * np.float32(14.0)) > 0.3, np.float32(0.8), np.float32(1.0))
    surf.paint(hit.inside & (u > 0.79), scene.cap_rgb, body_n, METAL_GLOSS, tone=ridge)
    surf.paint(ellipse_top(x, y, lid_r, h), scene.cap_rgb, top_n, METAL_GLOSS)
    return surf


def _box_faces(scene: Scene) -> list[tuple[str, Vec3, Vec3, Vec3]]:
    """``(name, origin, edge_u, edge_v)`` of the five faces in object space (x, y, z)."""
    w, h = 2.0 * scene.radius, scene.height
    d = w * scene.depth_ratio
    return [
        ("front", (-w / 2, 0.0, d / 2), (w, 0.0, 0.0), (0.0, h, 0.0)),
        ("back", (w / 2, 0.0, -d / 2), (-w, 0.0, 0.0), (0.0, h, 0.0)),
        ("right", (w / 2, 0.0, d / 2), (0.0, 0.0, -d), (0.0, h, 0.0)),
        ("left", (-w / 2, 0.0, -d / 2), (0.0, 0.0, d), (0.0, h, 0.0)),
        ("top", (-w / 2, h, d / 2), (w, 0.0, 0.0), (0.0, 0.0, -d)),
    ]


def _rotate(v: Vec3, c: float, s: float) -> Vec3:
    """Turntable rotation about the vertical axis (the same convention as the shoe)."""
    return v[0] * c + v[2] * s, v[1], -v[0] * s + v[2] * c


def _project(v: Vec3) -> tuple[float, float]:
    return v[0], v[1] * COS_E - v[2] * SIN_E


def _cam(v: Vec3) -> Array:
    return np.array((v[0], v[1] * COS_E - v[2] * SIN_E, v[1] * SIN_E + v[2] * COS_E), dtype=np.float32)


def draw_box(scene: Scene, pose: FramePose, x: Array, y: Array) -> Surface:
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    surf = Surface(x.shape)
    for name, origin, edge_u, edge_v in _box_faces(scene):
        eu, ev = _rotate(edge_u, c, s), _rotate(edge_v, c, s)
        tu, tv = _cam(eu), _cam(ev)
        normal = np.cross(tu, tv)
        normal /= np.linalg.norm(normal)
        if normal[2] <= 1e-3:  # facing away or edge-on: hidden
            continue
        (ox, oy), (ux, uy), (vx, vy) = _project(_rotate(origin, c, s)), _project(eu), _project(ev)
        inv_det = 1.0 / (ux * vy - vx * uy)
        px, py = x - np.float32(ox), y - np.float32(oy)
        a = px * np.float32(vy * inv_det) - py * np.float32(vx * inv_det)
        b = py * np.float32(ux * inv_det) - px * np.float32(uy * inv_det)
        face = (a >= 0.0) & (a <= 1.0) & (b >= 0.0) & (b <= 1.0)
        if not face.any():
            continue
        # Slightly pillowed faces: the normal tilts with position so a glossy highlight
        # slides across the face as it turns instead of the whole face flashing at once.
        tu, tv = 0.35 * tu / np.linalg.norm(tu), 0.35 * tv / np.linalg.norm(tv)
        n = normal[:, None, None] + (a - 0.5)[None] * tu[:, None, None] + (b - 0.5)[None] * tv[:, None, None]
        n *= 1.0 / np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])[None]
        face_n = surf.add_normal(n)
        surf.paint(face, scene.albedo, face_n, scene.gloss)
        if name in ("front", "back"):
            band = face & (b > 0.3) & (b < 0.62)
            surf.paint(band, scene.label_rgb, face_n, scene.gloss)
            surf.paint(band & (a > 0.14) & (a < 0.42) & (b > 0.38) & (b < 0.54), scene.accent_rgb, face_n, scene.gloss)
        elif name in ("left", "right"):
            surf.paint(face & (b > 0.42) & (b < 0.52), scene.label_rgb, face_n, scene.gloss)
    return surf


SOLE_RGB: RGB = (0.93, 0.92, 0.88)


def _shoe_top(scene: Scene, u: Array) -> Array:
    """Height of the shoe's upper edge along its length (u = 0 heel, 1 toe), world units."""
    return _profile("shoe")(u) * np.float32(scene.height)


def draw_shoe(scene: Scene, pose: FramePose, x: Array, y: Array, num_samples: int = 8) -> Surface:
    """The side profile extruded across the width, intersected along each pixel's view ray.

    A view ray is the line ``s cos + z sin = X`` in the (length s, width z) plane; it is
    parametrised by depth ``lam`` towards the camera, ``(s, z) = X (cos, sin) + lam (-sin, cos)``,
    clipped to the shoe's footprint and sampled front to back; the first sample inside the
    profile is the visible point. Sample 0 is the ray's entry point: if it is inside, the
    pixel sees a flat side (or end) face, otherwise the top of the extrusion.
    """
    length, h = 2.0 * scene.radius, scene.height
    half_l, half_w = 0.5 * length, 0.17 * length
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    lo = np.full(x.shape, -np.inf, dtype=np.float32)
    hi = np.full(x.shape, np.inf, dtype=np.float32)
    for coeff, base, limit in ((-s, x * np.float32(c), half_l), (c, x * np.float32(s), half_w)):
        if abs(coeff) > 1e-6:
            t1, t2 = (-limit - base) * np.float32(1 / coeff), (limit - base) * np.float32(1 / coeff)
            lo, hi = np.maximum(lo, np.minimum(t1, t2)), np.minimum(hi, np.maximum(t1, t2))
        else:
            outside = np.abs(base) > limit
            lo, hi = np.where(outside, np.inf, lo), np.where(outside, -np.inf, hi)
    valid = lo <= hi
    lo, hi = np.where(valid, lo, 0.0).astype(np.float32), np.where(valid, hi, 0.0).astype(np.float32)
    inv_len = np.float32(1.0 / length)
    hit_lam = np.zeros(x.shape, dtype=np.float32)
    done = ~valid
    entry = np.zeros(x.shape, dtype=bool)
    for k in range(num_samples + 1):
        lam = hi - (hi - lo) * np.float32(k / num_samples)
        u = (x * np.float32(c) - lam * np.float32(s) + np.float32(half_l)) * inv_len
        ly = (y + lam * np.float32(SIN_E)) * np.float32(1.0 / COS_E)
        inside = ~done & (ly >= 0.0) & (ly <= _shoe_top(scene, u))
        np.copyto(hit_lam, lam, where=inside)
        if k == 0:
            entry = inside
        done |= inside
    hit = done & valid
    # Everything below is evaluated once, at the visible point of each pixel.
    ls, lz = x * np.float32(c) - hit_lam * np.float32(s), x * np.float32(s) + hit_lam * np.float32(c)
    ly = (y + hit_lam * np.float32(SIN_E)) * np.float32(1.0 / COS_E)
    u = (ls + np.float32(half_l)) * inv_len
    side = entry & (np.abs(lz) >= half_w - 1e-4)
    sign = np.where(lz >= 0, np.float32(1.0), np.float32(-1.0))
    zeros = np.zeros_like(ls)
    # Side faces bulge slightly (normal tilts with height) so they are not flat-shaded slabs.
    bulge = zeros + np.float32(0.12) * (ly * np.float32(1 / h) - 0.5)
    n_side = to_camera(sign * np.float32(s), bulge, sign * np.float32(c))
    end_sign = np.sign(ls)
    n_end = to_camera(end_sign * np.float32(c), zeros, -end_sign * np.float32(s))
    top_profile = _profile("shoe")
    slope = np.take(top_profile.slopes, top_profile.index(u)) * np.float32(h / length)  # d top / d s
    n_top = to_camera(-slope * np.float32(c), zeros + 1.0, slope * np.float32(s))
    n_top *= 1.0 / np.sqrt(n_top[0] * n_top[0] + n_top[1] * n_top[1] + n_top[2] * n_top[2])[None]
    normal = np.where(side[None], n_side, np.where(entry[None], n_end, n_top))
    surf = Surface(x.shape)
    n_id = surf.add_normal(normal)
    sole = hit & (ly < 0.16 * h)
    top = hit & ~entry
    surf.paint(hit, scene.albedo, n_id, scene.gloss)
    swoosh = side & (u > 0.3) & (u < 0.85)
    swoosh &= np.abs(ly - np.float32(0.16 * h) - np.float32(h) * (0.12 + 0.5 * (u - 0.75) ** 2)) < 0.05 * h
    surf.paint(swoosh, scene.accent_rgb, n_id, scene.gloss)
    surf.paint(side & (u < 0.16), scene.label_rgb, n_id, scene.gloss)
    # The top of the extrusion: collar opening near the heel, laces over the instep. Only
    # near the upper edge: lower hits on the top side are the rounded heel and toe.
    top &= ly > _shoe_top(scene, u) - np.float32(0.1 * h)
    surf.paint(top & (u > 0.06) & (u < 0.3), (0.12, 0.11, 0.11), n_id, 0.0)
    laces = top & (u > 0.36) & (u < 0.64) & (np.abs(lz) < 0.35 * half_w) & ((u * 20.0) % 1.0 < 0.4)
    surf.paint(laces, (0.95, 0.95, 0.93), n_id, 0.0)
    surf.paint(sole, SOLE_RGB, n_id, 0.1)
    surf.paint(sole & entry & (ly < 0.056 * h), (0.3, 0.3, 0.32), n_id, 0.1)
    return surf


DRAWERS: dict[str, Callable[[Scene, FramePose, Array, Array], Surface]] = {
    "bottle": draw_bottle,
    "mug": draw_mug,
    "box": draw_box,
    "can": draw_can,
    "shoe": draw_shoe,
    "jar": draw_jar,
}


def object_extent(scene: Scene, pose: FramePose) -> tuple[float, float, float, float]:
    """Conservative local box ``(x_min, x_max, y_min, y_max)`` containing every object pixel."""
    h, r = scene.height, scene.radius
    if scene.spec.kind == "shoe":
        reach = r * 1.08  # >= the footprint's half diagonal: hypot(half length r, half width 0.34 r)
        return -reach, reach, -reach * SIN_E - 0.02, h * COS_E + reach * SIN_E + 0.02
    if scene.spec.kind == "box":
        reach = r * math.hypot(1.0, scene.depth_ratio)
        return -reach, reach, -reach * SIN_E - 0.02, h * COS_E + reach * SIN_E + 0.02
    reach = 1.6 * r if scene.spec.kind == "mug" else r
    return -reach - 0.02, reach + 0.02, -r * SIN_E - 0.02, h * COS_E + r * SIN_E + 0.02


def footprint_half_width(scene: Scene, pose: FramePose) -> float:
    """Half width of the object's footprint as seen by the camera, for the shadow."""
    c, s = abs(math.cos(pose.angle)), abs(math.sin(pose.angle))
    if scene.spec.kind == "shoe":
        return scene.radius * (c + 0.34 * s)
    if scene.spec.kind == "box":
        return scene.radius * (c + scene.depth_ratio * s)
    return scene.radius


def draw_object(scene: Scene, pose: FramePose, x: Array, y: Array) -> Surface:
    """Dispatch to the drawer of ``scene.spec.kind``."""
    try:
        drawer = DRAWERS[scene.spec.kind]
    except KeyError:
        raise ValueError(f"unknown product kind {scene.spec.kind!r}; valid: {list(DRAWERS)}") from None
    return drawer(scene, pose, x, y)
