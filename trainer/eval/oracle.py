"""Oracle metrics of a video: what the long-rollout failure modes do to pixels, measured directly.

Each metric takes uint8 frames ``[N, H, W, 3]`` (and, where it needs the object, a
:class:`~trainer.eval.segment.Segmentation` of them), returns a :class:`MetricResult` with
per-frame series, a summary and a ``flagged`` verdict, and compares the clip mostly with
*itself*: the reference is its first ``reference_seconds`` (the "first window"), compared
with its last ``end_seconds`` ("_end" summaries), because a
generated clip has no ground truth and the failure modes of autoregressive rollouts
(Self-Forcing++ Sec. 1: over-exposure, motion freezing, colour and subject drift) are
changes over time. Where the prompt says something checkable (colour, tint, camera move,
whether the product turns) the metric uses it:

* **over-exposure**: clipped (all channels >= ``clip_level``) and near-white fractions, mean
  Rec. 709 luminance and its trend; flagged when clipping or luminance *rises* by a margin.
* **motion / freeze**: mean absolute frame difference, over the frame and over the object;
  a frame is frozen when almost no pixel changed over the last half second (see
  :func:`motion` for why not the mean difference). Flagged when most frames after the first
  window are frozen, unless the prompt asks for a still product.
* **colour drift**: median object colour (eroded mask) as CIELAB; the chroma distance (Delta E
  on a*, b* only: turning and shading change lightness legitimately; exposure has its own
  metric) and the full Delta E to the first window, and the nearest named colour after
  undoing the prompt's tint and fitting a shading scale, versus the prompt's colour.
* **subject drift**: object centroid and area versus the first window, after removing what
  the prompt's camera move explains (:data:`trainer.data.scene.CAMERA_PATHS`).
* **background stability**: change of background pixels against the first window, and
  frame-to-frame flicker; flagged only with a static camera (a moving camera changes them).

Thresholds live in :class:`OracleConfig`. Pure numpy/torch functions: this module must never
read files, render clips or run a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from trainer.data.attributes import COLOURS
from trainer.data.scene import CAMERA_PATHS, CAMERA_TAU_S, TINT_RGB
from trainer.eval.segment import Segmentation, SegmentConfig, dilate_np, erode_np, segment_object

LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float64)  # Rec. 709
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64) / 255.0  # [K, 3] albedo in [0, 1]
_CHUNK_FRAMES = 256


@dataclass(frozen=True)
class OracleConfig:
    """Windows and thresholds of the oracle metrics (fractions in [0, 1] unless named otherwise)."""

    reference_seconds: float = 1.0
    # Verdicts compare the last end_seconds with the reference: longer than one window so that a
    # turning product's view-dependent colour and silhouette average out instead of flagging.
    end_seconds: float = 2.0
    window_seconds: float = 1.0
    clip_level: int = 250
    near_white_luma: float = 0.95
    overexposure_clipped_rise: float = 0.10
    overexposure_luma_rise: float = 0.10
    freeze_gap_seconds: float = 0.5
    freeze_level: float = 12.0  # uint8 units
    freeze_changed_fraction: float = 0.002  # below: nothing moved over freeze_gap_seconds -> frozen
    freeze_fraction: float = 0.5
    # Delta E on (a*, b*); ~2.3 is a just-noticeable difference. Measured on 112 rendered clips (3-10 s):
    # at most 20.3 (a red jar whose big label turns into view); a recolouring scores 40-80.
    colour_chroma_delta: float = 25.0
    shading_scale_range: tuple[float, float] = (0.3, 1.6)  # object brightness / albedo the renderer produces
    colour_erode_px: int = 1
    min_object_fraction: float = 0.004  # of the frame; smaller = the object is lost
    # A turning shoe's silhouette alone moves its centroid by up to ~0.17 and its area ~2x.
    subject_shift: float = 0.2  # centroid displacement, in frame widths/heights
    subject_area_ratio: float = 2.5
    subject_lost_fraction: float = 0.5
    background_dilate_px: int = 2
    background_change: float = 0.06
    background_flicker: float = 0.03
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def __post_init__(self) -> None:
        if not (self.reference_seconds > 0 and self.end_seconds > 0 and self.window_seconds > 0):
            raise ValueError("OracleConfig.reference_seconds, end_seconds and window_seconds must be > 0")
        if not 0 < self.clip_level <= 255:
            raise ValueError(f"OracleConfig.clip_level must lie in (0, 255], got {self.clip_level}")
        lo, hi = self.shading_scale_range
        if not 0 < lo < hi:
            raise ValueError(f"OracleConfig.shading_scale_range must be 0 < lo < hi, got {self.shading_scale_range}")
        if self.subject_area_ratio <= 1:
            raise ValueError("OracleConfig.subject_area_ratio must be > 1")
        if self.colour_erode_px < 0 or self.background_dilate_px < 0:
            raise ValueError("OracleConfig.colour_erode_px and background_dilate_px must be >= 0")


@dataclass(frozen=True)
class MetricResult:
    """One metric of one clip: ``per_frame`` series ``{name: [N]}`` (NaN where undefined), a ``summary``
    of scalars, whether the failure mode was detected and a one-line ``note`` saying why (or why not)."""

    name: str
    per_frame: dict[str, np.ndarray]
    summary: dict[str, float]
    flagged: bool
    note: str


# ---------------------------------------------------------------------------------------------
# Time helpers.


def frames_for(seconds: float, fps: float, num_frames: int) -> int:
    """``seconds`` of video as a frame count in ``[1, num_frames]``."""
    return int(min(max(1, round(seconds * fps)), max(1, num_frames)))


def window_bounds(num_frames: int, window_frames: int) -> list[tuple[int, int]]:
    """Consecutive full windows ``[start, end)``; a clip shorter than one window is one window."""
    if num_frames < 1 or window_frames < 1:
        raise ValueError(f"need num_frames and window_frames >= 1, got {num_frames}, {window_frames}")
    if num_frames < window_frames:
        return [(0, num_frames)]
    return [(s, s + window_frames) for s in range(0, num_frames - window_frames + 1, window_frames)]


def window_means(values: np.ndarray, window_frames: int) -> np.ndarray:
    """NaN-aware mean of a per-frame series ``[N]`` over each window of :func:`window_bounds`."""
    out = []
    for s, e in window_bounds(len(values), window_frames):
        chunk = values[s:e]
        out.append(float(np.nanmean(chunk)) if np.isfinite(chunk).any() else math.nan)
    return np.array(out)


def _mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _slope_per_second(values: np.ndarray, fps: float) -> float:
    """Least-squares slope of a series against time in seconds (NaNs ignored)."""
    t = np.arange(len(values)) / fps
    ok = np.isfinite(values)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(t[ok], values[ok], 1)[0])


def _start_end(values: np.ndarray, fps: float, cfg: OracleConfig) -> tuple[float, float]:
    """Mean over the first ``reference_seconds`` and over the last ``end_seconds``."""
    ref = frames_for(cfg.reference_seconds, fps, len(values))
    end = frames_for(cfg.end_seconds, fps, len(values))
    return _mean(values[:ref]), _mean(values[-end:])


# ---------------------------------------------------------------------------------------------
# Colour helpers.


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] ``[..., 3]`` -> CIELAB (D65) ``[..., 3]`` (L in [0, 100])."""
    c = np.asarray(rgb, dtype=np.float64)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def named_colour_residuals(rgb: np.ndarray, tint: str = "neutral",
                           scale_range: tuple[float, float] = (0.3, 1.6)) -> np.ndarray:
    """How well each named colour explains an observed object colour: ``[N, 3] -> [N, K]``.

    The renderer makes ``object ~ albedo * tint * s`` with a shading/lighting scale ``s``; we
    divide out the tint, fit ``s`` per named colour (clamped to ``scale_range``) and return
    ``|rgb / tint - s * albedo|``. NaN rows stay NaN.
    """
    wb = np.asarray(rgb, dtype=np.float64) / np.asarray(TINT_RGB[tint])  # [N, 3]
    scale = (wb @ PALETTE.T) / (PALETTE * PALETTE).sum(axis=1)  # [N, K]
    scale = np.clip(scale, *scale_range)
    return np.linalg.norm(wb[:, None, :] - scale[..., None] * PALETTE[None], axis=-1)


# ---------------------------------------------------------------------------------------------
# Metrics.


def overexposure(frames: np.ndarray, fps: float, cfg: OracleConfig) -> MetricResult:
    """Clipped / near-white fractions and mean luminance per frame of uint8 ``frames [N, H, W, 3]``."""
    n = frames.shape[0]
    clipped, near_white, luma = np.empty(n), np.empty(n), np.empty(n)
    for s in range(0, n, _CHUNK_FRAMES):  # chunks bound the float copy of a long rollout
        chunk = frames[s:s + _CHUNK_FRAMES]
        clipped[s:s + len(chunk)] = (chunk >= cfg.clip_level).all(axis=-1).mean(axis=(1, 2))
        luma_px = chunk.astype(np.float32) @ LUMA.astype(np.float32) / 255.0  # [n, H, W]
        near_white[s:s + len(chunk)] = (luma_px >= cfg.near_white_luma).mean(axis=(1, 2))
        luma[s:s + len(chunk)] = luma_px.mean(axis=(1, 2))
    luma_start, luma_end = _start_end(luma, fps, cfg)
    clip_start, clip_end = _start_end(clipped, fps, cfg)
    summary = {"luma_start": luma_start, "luma_end": luma_end, "luma_rise": luma_end - luma_start,
               "luma_slope_per_s": _slope_per_second(luma, fps), "clipped_start": clip_start,
               "clipped_end": clip_end, "clipped_rise": clip_end - clip_start,
               "near_white_mean": _mean(near_white)}
    reasons = []
    if summary["clipped_rise"] > cfg.overexposure_clipped_rise:
        reasons.append(f"clipped fraction rose by {summary['clipped_rise']:.2f} (> {cfg.overexposure_clipped_rise})")
    if summary["luma_rise"] > cfg.overexposure_luma_rise:
        reasons.append(f"mean luminance rose by {summary['luma_rise']:.2f} (> {cfg.overexposure_luma_rise})")
    return MetricResult("overexposure", {"clipped_fraction": clipped, "near_white_fraction": near_white,
                                         "luma": luma},
                        summary, bool(reasons), "; ".join(reasons) or "exposure stable")


def motion(frames: np.ndarray, seg: Segmentation, fps: float, cfg: OracleConfig,
           expects_motion: bool | None = None) -> MetricResult:
    """Motion magnitude and freezing per frame.

    ``frame_diff``: mean absolute difference to the previous frame in [0, 1] (frame 0 NaN);
    ``object_diff``: the same over the object region (analysis size). Freezing is decided on
    ``changed_fraction``: the fraction of analysis-size pixels whose largest channel moved by
    more than ``freeze_level`` since ``freeze_gap_seconds`` ago. Why not the mean difference:
    a slowly turning, rotationally symmetric product changes only a few label pixels a frame,
    less than H.264 noise on a textured table, but over half a second those label pixels change
    a lot while codec noise does not grow (measured: moving >= 0.0056, frozen MP4 <= 0.0003).
    ``expects_motion``: ``False`` when the prompt asks for a still product (a frozen clip may
    then be correct and is never flagged); ``None`` when unknown.
    """
    n = frames.shape[0]
    diff = np.full(n, np.nan)
    obj = np.full(n, np.nan)
    if n > 1:
        for s in range(1, n, _CHUNK_FRAMES):
            f = frames[s - 1:s + _CHUNK_FRAMES].astype(np.int16)
            diff[s:s + len(f) - 1] = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)) / 255.0
        region = dilate_np(seg.mask[1:] | seg.mask[:-1], 1)  # [N-1, S, S]
        d_small = np.abs(seg.frames[1:] - seg.frames[:-1]).mean(axis=-1) / 255.0  # [N-1, S, S]
        counts = region.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            obj[1:] = np.where(counts > 0, (d_small * region).sum(axis=(1, 2)) / counts, np.nan)
    gap = frames_for(cfg.freeze_gap_seconds, fps, n)
    changed = np.full(n, np.nan)
    if n > gap:
        moved = np.abs(seg.frames[gap:] - seg.frames[:-gap]).max(axis=-1) > cfg.freeze_level  # [N-gap, S, S]
        changed[gap:] = moved.mean(axis=(1, 2))
    frozen = np.where(np.isfinite(changed), (changed < cfg.freeze_changed_fraction).astype(np.float64), np.nan)
    ref = frames_for(cfg.reference_seconds, fps, n)
    after = frozen[max(ref, gap):]
    frozen_after = _mean(after) if np.isfinite(after).any() else math.nan
    start, end = _start_end(diff, fps, cfg)
    run = longest = 0
    for v in frozen:
        run = run + 1 if v == 1.0 else 0
        longest = max(longest, run)
    summary = {"motion_mean": _mean(diff), "motion_start": start, "motion_end": end,
               "motion_end_over_start": end / start if start > 0 else math.nan,
               "object_motion_mean": _mean(obj), "changed_fraction_mean": _mean(changed),
               "frozen_fraction": frozen_after, "longest_freeze_s": longest / fps}
    if expects_motion is False:
        flagged, note = False, "prompt asks for a still product; freeze not flagged"
    elif not np.isfinite(frozen_after):
        flagged, note = False, f"clip too short to judge freezing (needs > {max(ref, gap)} frames)"
    else:
        flagged = bool(frozen_after >= cfg.freeze_fraction)
        note = (f"{frozen_after:.0%} of frames after the first window are frozen (>= {cfg.freeze_fraction:.0%})"
                if flagged else "moving")
    return MetricResult("motion", {"frame_diff": diff, "object_diff": obj, "changed_fraction": changed,
                                   "frozen": frozen}, summary, flagged, note)


def object_colour(seg: Segmentation, erode_px: int) -> np.ndarray:
    """Median colour in [0, 1] of each frame's object, ``[N, 3]``; NaN without a reliable object mask.

    Over the eroded mask (edges mix in background; the full mask when erosion empties it), and
    the per-channel median rather than the mean: specular highlights and the odd background
    pixel inside the mask pull a mean towards white or the background (measured on rendered
    clips: the nearest named colour of the mean was wrong for 3 of 16, of the median for 1).
    Labels stay a limit: a jar's label turning into view moves even the median (Delta E 20 on
    a*, b* for a red jar); taking the majority named colour instead was worse (33), so the
    threshold stays generous and a report reads flag rates against rendered reference clips.
    """
    core = erode_np(seg.mask, erode_px) if erode_px else seg.mask
    out = np.full((seg.num_frames, 3), np.nan)
    for t in range(seg.num_frames):
        use = core[t] if core[t].any() else seg.mask[t]
        if use.any() and seg.reliable[t]:
            out[t] = np.median(seg.frames[t][use], axis=0) / 255.0
    return out


def colour_drift(seg: Segmentation, fps: float, cfg: OracleConfig, colour: str | None = None,
                 tint: str = "neutral", mask_stable: bool = True) -> MetricResult:
    """Object colour over time vs the first window (Delta E) and vs the prompt's named ``colour``.

    ``mask_stable=False`` (the subject metric saw the mask jump) withholds the verdict: when the
    segmentation loses part of a product that matches its background (a blue can on the blue
    gradient), the "object colour" is whatever part was kept, and it changes with the mask.
    """
    n = seg.num_frames
    rgb = object_colour(seg, cfg.colour_erode_px)  # [N, 3]
    lab = rgb_to_lab(np.nan_to_num(rgb, nan=0.0))
    lab[~np.isfinite(rgb).all(axis=1)] = np.nan
    ref = frames_for(cfg.reference_seconds, fps, n)
    ref_lab = np.nanmean(lab[:ref], axis=0) if np.isfinite(lab[:ref]).any() else np.full(3, np.nan)
    delta_e = np.linalg.norm(lab - ref_lab, axis=1)
    chroma = np.linalg.norm(lab[:, 1:] - ref_lab[1:], axis=1)
    residuals = named_colour_residuals(np.nan_to_num(rgb, nan=0.0), tint, cfg.shading_scale_range)  # [N, K]
    valid = np.isfinite(rgb).all(axis=1)
    nearest = np.where(valid, residuals.argmin(axis=1).astype(np.float64), np.nan)
    per_frame = {"r": rgb[:, 0], "g": rgb[:, 1], "b": rgb[:, 2], "delta_e_vs_start": delta_e,
                 "chroma_delta_vs_start": chroma, "nearest_colour_index": nearest}
    _, end = _start_end(chroma, fps, cfg)
    windows = window_means(chroma, frames_for(cfg.window_seconds, fps, n))
    summary = {"chroma_delta_end": end,
               "chroma_delta_max_window": float(np.nanmax(windows)) if np.isfinite(windows).any() else math.nan,
               "chroma_delta_slope_per_s": _slope_per_second(chroma, fps),
               "delta_e_end": _start_end(delta_e, fps, cfg)[1]}
    reasons = []
    if np.isfinite(end) and end > cfg.colour_chroma_delta:
        reasons.append(f"object colour moved {end:.1f} (Delta E on a*, b*) from the first window "
                       f"(> {cfg.colour_chroma_delta})")
    if colour is not None:
        k = COLOUR_NAMES.index(colour)
        match = np.where(valid, (nearest == k).astype(np.float64), np.nan)
        error = np.where(valid, residuals[:, k], np.nan)
        per_frame.update({"prompt_colour_match": match, "prompt_colour_error": error})
        m_start, m_end = _start_end(match, fps, cfg)
        summary.update({"prompt_match_rate": _mean(match), "prompt_match_start": m_start, "prompt_match_end": m_end,
                        "prompt_error_mean": _mean(error)})
        if m_start >= 0.5 > m_end:
            reasons.append(f"object was {colour} in the first window but not in the last ({m_end:.0%} of frames)")
    if reasons and not mask_stable:
        return MetricResult("colour_drift", per_frame, summary, False,
                            "not judged: the object mask is unstable (" + "; ".join(reasons) + ")")
    return MetricResult("colour_drift", per_frame, summary, bool(reasons), "; ".join(reasons) or "colour stable")


def camera_path(camera: str, num_frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(zoom [N], centre x shift [N])`` the prompt's camera move causes, from the renderer's closed form.

    The camera zooms about the object's centre, so zoom scales its area by ``zoom^2`` and leaves
    the centroid put; a pan by ``p`` world units moves it by ``-p * zoom / 2`` frame widths.
    """
    if camera not in CAMERA_PATHS:
        raise ValueError(f"unknown camera {camera!r}; valid: {sorted(CAMERA_PATHS)}")
    zoom0, zoom1, pan0, pan1 = CAMERA_PATHS[camera]
    progress = 1.0 - np.exp(-(np.arange(num_frames) / fps) / CAMERA_TAU_S)
    zoom = zoom0 + (zoom1 - zoom0) * progress
    pan = pan0 + (pan1 - pan0) * progress
    return zoom, -(pan - pan0) * zoom / 2.0


def subject_geometry(seg: Segmentation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: the object's area (fraction of the frame) and its centroid ``x, y`` (fractions of the width and
    height, pixel centres); the centroid is NaN where the mask is empty."""
    s = seg.mask.shape[1]
    area = seg.mask.mean(axis=(1, 2)).astype(np.float64)
    coords = (np.arange(s) + 0.5) / s
    pixels = seg.mask.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.where(pixels > 0, (seg.mask.sum(axis=1) * coords).sum(axis=1) / np.maximum(pixels, 1), np.nan)
        cy = np.where(pixels > 0, (seg.mask.sum(axis=2) * coords).sum(axis=1) / np.maximum(pixels, 1), np.nan)
    return area, cx, cy


def subject_drift(seg: Segmentation, fps: float, cfg: OracleConfig, camera: str | None = None) -> MetricResult:
    """Object centroid / area vs the first window, minus what the prompt's ``camera`` move explains.

    Frames whose mask is unreliable (the object reaches the border columns) are NaN; the
    verdict on shift and size needs at least half of the last window to be reliable.
    """
    n = seg.num_frames
    area, cx, cy = subject_geometry(seg)
    present = area >= cfg.min_object_fraction
    usable = present & seg.reliable
    cx, cy = np.where(usable, cx, np.nan), np.where(usable, cy, np.nan)
    zoom, shift_x = camera_path(camera, n, fps) if camera is not None else (np.ones(n), np.zeros(n))
    ref = frames_for(cfg.reference_seconds, fps, n)
    # Normalise the area by the camera's zoom, the position by its pan; then compare with the start.
    area_n = np.where(usable, area / zoom**2, np.nan)
    cx_n = cx - shift_x
    ref_area, ref_x, ref_y = _mean(area_n[:ref]), _mean(cx_n[:ref]), _mean(cy[:ref])
    shift = np.hypot(cx_n - ref_x, cy - ref_y)
    log_area = np.log(area_n / ref_area) if np.isfinite(ref_area) and ref_area > 0 else np.full(n, np.nan)
    lost = (~present).astype(np.float64)
    _, shift_end = _start_end(shift, fps, cfg)
    _, log_area_end = _start_end(log_area, fps, cfg)
    _, lost_end = _start_end(lost, fps, cfg)
    reliable_start, reliable_end = _start_end(seg.reliable.astype(np.float64), fps, cfg)
    summary = {"shift_end": shift_end, "shift_max": float(np.nanmax(shift)) if np.isfinite(shift).any() else math.nan,
               "area_ratio_end": math.exp(log_area_end) if np.isfinite(log_area_end) else math.nan,
               "lost_fraction": float(lost.mean()), "lost_fraction_end": lost_end,
               "reliable_fraction": float(seg.reliable.mean())}
    reasons = []
    if lost_end > cfg.subject_lost_fraction:
        reasons.append(f"no object found in {lost_end:.0%} of the last window")
    edge_by_design = camera in ("zoom_in", "pan_left", "pan_right")
    if reliable_start >= 0.5 > reliable_end and lost_end <= cfg.subject_lost_fraction and not edge_by_design:
        # The mask cannot follow an object into the border sample columns, so reaching them is
        # itself the drift signal; zooming in grows, and panning carries, a wide product (a shoe)
        # to the edges by design.
        reasons.append("object reached the frame edge in most of the last window (clear of it at the start)")
    if reliable_end >= 0.5:
        if np.isfinite(shift_end) and shift_end > cfg.subject_shift:
            reasons.append(f"object centre moved {shift_end:.2f} of the frame (> {cfg.subject_shift})")
        if np.isfinite(log_area_end) and abs(log_area_end) > math.log(cfg.subject_area_ratio):
            reasons.append(f"object area changed x{math.exp(log_area_end):.2f} (limit x{cfg.subject_area_ratio})")
    note = "; ".join(reasons) or ("subject stable" if reliable_end >= 0.5 else
                                  "shift/size not judged: the object mask is unreliable in most of the last window")
    per_frame = {"centroid_x": cx, "centroid_y": cy, "area_fraction": area, "shift_vs_start": shift,
                 "log_area_ratio_vs_start": log_area, "lost": lost, "reliable": seg.reliable.astype(np.float64)}
    return MetricResult("subject_drift", per_frame, summary, bool(reasons), note)


def mask_is_stable(subject: MetricResult) -> bool:
    """Whether the subject metric tracked the object without a verdict against it: only then is the
    masked colour the product's colour (a mask that jumps measures whatever part it kept)."""
    reliable = subject.per_frame["reliable"]
    return not subject.flagged and bool(np.isfinite(subject.summary["shift_end"])) and reliable.mean() >= 0.5


def background_stability(seg: Segmentation, fps: float, cfg: OracleConfig, camera: str | None = None
                         ) -> MetricResult:
    """Background change vs the first window's mean background, and frame-to-frame flicker, in [0, 1]."""
    n = seg.num_frames
    bg = ~dilate_np(seg.mask, cfg.background_dilate_px)  # [N, S, S]
    ref = frames_for(cfg.reference_seconds, fps, n)
    weight = bg[:ref].sum(axis=0).astype(np.float64)  # [S, S]
    ref_img = np.einsum("nhwc,nhw->hwc", seg.frames[:ref].astype(np.float64), bg[:ref].astype(np.float64))
    ref_ok = weight > 0
    ref_img = ref_img / np.maximum(weight, 1.0)[..., None]
    change = np.full(n, np.nan)
    flicker = np.full(n, np.nan)
    for t in range(n):
        use = bg[t] & ref_ok
        if use.any():
            change[t] = float(np.abs(seg.frames[t][use] - ref_img[use]).mean() / 255.0)
        if t > 0:
            both = bg[t] & bg[t - 1]
            if both.any():
                flicker[t] = float(np.abs(seg.frames[t][both] - seg.frames[t - 1][both]).mean() / 255.0)
    _, change_end = _start_end(change, fps, cfg)
    _, flicker_end = _start_end(flicker, fps, cfg)
    summary = {"change_end": change_end, "change_slope_per_s": _slope_per_second(change, fps),
               "flicker_mean": _mean(flicker), "flicker_end": flicker_end}
    if camera not in (None, "static"):
        flagged, note = False, f"camera {camera}: the background moves by design; not flagged"
    else:
        reasons = []
        if np.isfinite(change_end) and change_end > cfg.background_change:
            reasons.append(f"background changed {change_end:.3f} from the first window (> {cfg.background_change})")
        if np.isfinite(flicker_end) and flicker_end > cfg.background_flicker:
            reasons.append(f"background flickers {flicker_end:.3f} per frame (> {cfg.background_flicker})")
        flagged, note = bool(reasons), "; ".join(reasons) or "background stable"
    return MetricResult("background_stability", {"change_vs_start": change, "flicker": flicker}, summary, flagged,
                        note)


def oracle_metrics(frames: np.ndarray, fps: float, attributes: Mapping[str, str] | None = None,
                   cfg: OracleConfig | None = None, seg: Segmentation | None = None
                   ) -> tuple[dict[str, MetricResult], Segmentation]:
    """All oracle metrics of uint8 ``frames [N, H, W, 3]``; ``attributes`` are the prompt's (parsed caption).

    Returns ``({metric name: result}, segmentation)``; pass ``seg`` to reuse a segmentation.
    """
    cfg = cfg or OracleConfig()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [N >= 1, H, W, 3], got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    seg = seg if seg is not None else segment_object(frames, cfg.segment)
    attrs = dict(attributes or {})
    # Only the turntable moves for ever; camera moves ease out (tau 3 s), so a still product
    # under a zoom is legitimately frozen after a few seconds.
    expects_motion = attrs["motion"] != "still" if "motion" in attrs else None
    subject = subject_drift(seg, fps, cfg, attrs.get("camera"))
    results = [
        overexposure(frames, fps, cfg),
        motion(frames, seg, fps, cfg, expects_motion),
        colour_drift(seg, fps, cfg, attrs.get("colour"), attrs.get("tint", "neutral"),
                     mask_stable=mask_is_stable(subject)),
        subject,
        background_stability(seg, fps, cfg, attrs.get("camera")),
    ]
    return {r.name: r for r in results}, seg
