"""A generated set measured against rendered clips of the same captions, with intervals.

The rendered reference is the ground truth of everything here: clip ``i`` of the generated set
and clip ``i`` of the reference share a caption, so

* **stability** is per clip: a quantity's last window over its first window, set beside the
  reference clip's own ratio for the same caption (the renderer's camera moves ease out, so a
  correct clip's motion falls to ~0.1 of its start). Reported: both distributions, the median
  absolute deviation from the paired reference ratio, and the share of clips outside the
  reference's range (min..max over its clips). A set-mean ratio tested against 1 would let
  clips drifting in opposite directions cancel and would call the renderer's own ease-out drift;
* **KID** of classifier features at the first and at the last window (:func:`trainer.eval.stats.kid`),
  and the **Frechet distance** on the reference's top principal components where there are
  enough clips for them (else ``None`` with the reason);
* **adherence per attribute** at the first and at the last window, beside the classifier's
  accuracy on the rendered clips at the same window: an attribute the classifier cannot read
  on rendered clips (accuracy below ``chance + readable_kappa * (1 - chance)``) is *unmeasured*
  and left out of the mean, not averaged in.

The subject-area ratio is read by the border-palette segmentation, which misreads some scenes
(zoom-outs were read as 0.72-1.06 where the object truly shrank to 0.39-0.55; on 15 s renders a
red can zooming out in the dark studio reads 0.77 for a true 0.42 while most zoom-outs read within
a few percent). So it is checked per caption: the rendered clip's read ratio against its true
mask's ratio (:data:`~trainer.eval.suite.TRUE_AREA_CURVE`); where they differ by more than
:attr:`ReferenceConfig.area_read_tolerance` the caption's area is *unmeasured* for every model. A
reference without true masks (clips from files) falls back to leaving out every ``zoom_out``
caption (:data:`AREA_UNMEASURED_CAMERAS`).

Pure numpy on evaluated sets; this module never reads files or runs a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.data.attributes import ATTRIBUTE_KEYS, ATTRIBUTE_VALUES
from trainer.eval.frechet import MIN_SAMPLES_PER_DIM, frechet_distance, pca_projection
from trainer.eval.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    MIN_KID_SAMPLES,
    Interval,
    bootstrap,
    bootstrap_mean,
    kid,
)
from trainer.eval.suite import TRUE_AREA_CURVE, ClipEvaluation, SetEvaluation

# Per-window quantities whose per-clip last/first ratio is compared with the reference's.
STABILITY_CURVES: dict[str, str] = {
    "luma": "overexposure/luma",
    "motion": "motion/frame_diff",
    "subject area": "subject_drift/area_fraction",
    "adherence": "adherence/whole_clip_keys",
}
AREA_UNMEASURED_CAMERAS: tuple[str, ...] = ("zoom_out",)
WINDOWS: tuple[str, ...] = ("first", "last")


@dataclass(frozen=True)
class ReferenceConfig:
    """Resampling, the readability bar of an attribute and the stability verdict."""

    num_resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0
    # Readable: rendered accuracy >= chance + readable_kappa * (1 - chance) (Cohen's kappa >= 0.5).
    readable_kappa: float = 0.5
    # A set's stability is flagged when more than this share of its clips leave the reference's range.
    max_share_outside: float = 0.2
    frechet_dims: int = 16
    frechet_resamples: int = 200
    # Largest |read / true - 1| of a rendered clip's subject-area ratio for the caption to count as measured.
    area_read_tolerance: float = 0.2

    def __post_init__(self) -> None:
        if self.num_resamples < 1 or self.frechet_resamples < 1:
            raise ValueError("ReferenceConfig.num_resamples and frechet_resamples must be >= 1")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"ReferenceConfig.level must lie in (0, 1), got {self.level}")
        if not 0.0 <= self.readable_kappa < 1.0 or not 0.0 <= self.max_share_outside <= 1.0:
            raise ValueError("ReferenceConfig.readable_kappa must lie in [0, 1), max_share_outside in [0, 1]")
        if self.frechet_dims < 1:
            raise ValueError("ReferenceConfig.frechet_dims must be >= 1")


def clip_ratio(curve: np.ndarray | None) -> float:
    """Last finite window value over the first (NaN when undefined: fewer than two windows, or a zero start)."""
    if curve is None:
        return math.nan
    finite = np.asarray(curve, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 2 or abs(finite[0]) < 1e-6:
        return math.nan
    return float(finite[-1] / finite[0])


def _check_paired(generated: SetEvaluation, reference: SetEvaluation) -> None:
    if len(generated.clips) != len(reference.clips):
        raise ValueError(f"the reference must hold one clip per generated clip: {len(generated.clips)} generated, "
                         f"{len(reference.clips)} rendered")
    for g, r in zip(generated.clips, reference.clips, strict=True):
        if g.attributes != r.attributes:
            raise ValueError(f"generated clip {g.name} ({g.prompt!r}) and reference clip {r.name} ({r.prompt!r}) "
                             "do not share a caption")


# ---------------------------------------------------------------------------------------------
# Stability.


@dataclass(frozen=True)
class StabilityResult:
    """One quantity's per-clip last/first ratios against the paired reference ratios."""

    quantity: str
    ratios: list[float]  # generated, per clip (NaN: undefined or unmeasured)
    reference_ratios: list[float]
    num_judged: int  # clips with both ratios defined
    reference_range: tuple[float, float]
    median_abs_deviation: Interval  # median over clips of |ratio - paired reference ratio|
    share_outside: Interval  # share of judged clips outside reference_range
    flagged: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"quantity": self.quantity, "num_judged": self.num_judged,
                "distribution": quantiles(self.ratios), "reference_distribution": quantiles(self.reference_ratios),
                "reference_range": list(self.reference_range),
                "median_abs_deviation": self.median_abs_deviation.as_dict(),
                "share_outside": self.share_outside.as_dict(), "flagged": self.flagged, "note": self.note,
                "ratios": self.ratios, "reference_ratios": self.reference_ratios}


def quantiles(values: list[float] | np.ndarray) -> dict[str, float]:
    """10th, 50th and 90th percentiles of the finite values (NaN when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"p10": math.nan, "p50": math.nan, "p90": math.nan, "n": 0}
    p10, p50, p90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "n": len(x)}


def stability_against_reference(quantity: str, ratios: np.ndarray | list[float],
                                reference_ratios: np.ndarray | list[float], cfg: ReferenceConfig | None = None
                                ) -> StabilityResult:
    """Compare per-clip ratios with the paired reference ratios (clip ``i`` with reference clip ``i``)."""
    cfg = cfg or ReferenceConfig()
    g = np.asarray(ratios, dtype=np.float64)
    r = np.asarray(reference_ratios, dtype=np.float64)
    if g.shape != r.shape or g.ndim != 1:
        raise ValueError(f"ratios and reference_ratios must be paired 1-D arrays, got {g.shape} and {r.shape}")
    ref_finite = r[np.isfinite(r)]
    both = np.isfinite(g) & np.isfinite(r)
    n = int(both.sum())
    nan_interval = Interval(math.nan, math.nan, math.nan, n, cfg.level)
    if n < 2 or len(ref_finite) < 2:
        return StabilityResult(quantity, g.tolist(), r.tolist(), n, (math.nan, math.nan), nan_interval,
                               nan_interval, False, f"not judged: {n} clips with both ratios defined (need 2)")
    lo, hi = float(ref_finite.min()), float(ref_finite.max())
    outside = ((g[both] < lo) | (g[both] > hi)).astype(np.float64)
    deviation = np.abs(g[both] - r[both])
    share = bootstrap_mean(outside, cfg.num_resamples, cfg.level, cfg.seed)
    mad = bootstrap(lambda idx: float(np.median(deviation[idx])), n, cfg.num_resamples, cfg.level, cfg.seed)
    flagged = share.value > cfg.max_share_outside
    note = (f"{share.value:.0%} of {n} clips outside the reference's range [{lo:.2f}, {hi:.2f}]"
            + (f" (> {cfg.max_share_outside:.0%})" if flagged else ""))
    return StabilityResult(quantity, g.tolist(), r.tolist(), n, (lo, hi), mad, share, flagged, note)


def area_read_correctly(reference_clip: ClipEvaluation, tolerance: float) -> bool:
    """Whether the segmentation reads this rendered clip's subject-area ratio within ``tolerance`` of the truth."""
    truth = reference_clip.curves.get(TRUE_AREA_CURVE)
    if truth is None:
        attrs = reference_clip.attributes or {}
        return attrs.get("camera") not in AREA_UNMEASURED_CAMERAS
    true_ratio = clip_ratio(truth)
    read_ratio = clip_ratio(reference_clip.curves.get(STABILITY_CURVES["subject area"]))
    return bool(np.isfinite(true_ratio) and np.isfinite(read_ratio) and abs(read_ratio / true_ratio - 1) <= tolerance)


def set_stability(generated: SetEvaluation, reference: SetEvaluation, cfg: ReferenceConfig | None = None
                  ) -> dict[str, StabilityResult]:
    """:func:`stability_against_reference` for every quantity of :data:`STABILITY_CURVES`."""
    cfg = cfg or ReferenceConfig()
    _check_paired(generated, reference)
    out = {}
    for label, key in STABILITY_CURVES.items():
        g, r = [], []
        misread = 0
        for gc, rc in zip(generated.clips, reference.clips, strict=True):
            measured = label != "subject area" or area_read_correctly(rc, cfg.area_read_tolerance)
            misread += not measured
            g.append(clip_ratio(gc.curves.get(key)) if measured else math.nan)
            r.append(clip_ratio(rc.curves.get(key)) if measured else math.nan)
        result = stability_against_reference(label, g, r, cfg)
        if misread:
            result = dataclasses.replace(result, note=f"{result.note}; {misread} captions unmeasured (the "
                                                      "segmentation misreads their rendered clip's area)")
        out[label] = result
    return out


# ---------------------------------------------------------------------------------------------
# Adherence per attribute.


@dataclass(frozen=True)
class AttributeAdherence:
    """Share of clips whose classified attribute (at one window) matches the caption, beside the rendered clips'."""

    attribute: str
    window: str
    generated: Interval
    rendered: Interval  # the classifier's accuracy on the rendered clips of the same captions
    chance: float
    measured: bool

    def as_dict(self) -> dict[str, Any]:
        ratio = self.generated.value / self.rendered.value if self.rendered.value > 0 else math.nan
        return {"generated": self.generated.as_dict(), "rendered": self.rendered.as_dict(), "chance": self.chance,
                "measured": self.measured, "of_rendered": ratio}


def window_index(window: str) -> int:
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; valid: {list(WINDOWS)}")
    return 0 if window == "first" else -1


def correct_per_clip(clips: list[ClipEvaluation], key: str, window: str) -> np.ndarray:
    """Per clip: 1.0 where the classifier's reading at ``window`` matches the caption, NaN without a caption."""
    i = window_index(window)
    out = np.full(len(clips), np.nan)
    for n, c in enumerate(clips):
        if c.classifier is None:
            raise ValueError(f"clip {c.name} was evaluated without a classifier; no adherence")
        if c.attributes is not None:
            out[n] = float(c.classifier.predictions[i][key] == c.attributes[key])
    return out


def chance_level(reference: SetEvaluation, key: str) -> float:
    """Accuracy of always guessing: the larger of 1/classes and the commonest caption value's share."""
    values = [c.attributes[key] for c in reference.clips if c.attributes is not None]
    uniform = 1.0 / len(ATTRIBUTE_VALUES[key])
    if not values:
        return uniform
    _, counts = np.unique(values, return_counts=True)
    return max(uniform, float(counts.max() / len(values)))


def attribute_adherence(generated: SetEvaluation, reference: SetEvaluation, window: str,
                        cfg: ReferenceConfig | None = None) -> dict[str, AttributeAdherence]:
    """Per attribute at the ``"first"`` or ``"last"`` classifier window, with the readability verdict."""
    cfg = cfg or ReferenceConfig()
    _check_paired(generated, reference)
    out = {}
    for key in ATTRIBUTE_KEYS:
        gen = bootstrap_mean(correct_per_clip(generated.clips, key, window), cfg.num_resamples, cfg.level, cfg.seed)
        ren = bootstrap_mean(correct_per_clip(reference.clips, key, window), cfg.num_resamples, cfg.level, cfg.seed)
        chance = chance_level(reference, key)
        measured = math.isfinite(ren.value) and ren.value >= chance + cfg.readable_kappa * (1.0 - chance)
        out[key] = AttributeAdherence(key, window, gen, ren, chance, measured)
    return out


def mean_adherence(clips: list[ClipEvaluation], keys: list[str], window: str, cfg: ReferenceConfig) -> Interval:
    """Per clip, the share of ``keys`` read as captioned; mean over clips with its interval."""
    if not keys:
        return Interval(math.nan, math.nan, math.nan, 0, cfg.level)
    per_clip = np.nanmean(np.stack([correct_per_clip(clips, k, window) for k in keys]), axis=0)
    return bootstrap_mean(per_clip, cfg.num_resamples, cfg.level, cfg.seed)


# ---------------------------------------------------------------------------------------------
# Distribution distances.


def window_features(s: SetEvaluation, window: str) -> np.ndarray:
    """Classifier features ``[N, D]`` of every clip's first or last window."""
    i = window_index(window)
    rows = []
    for c in s.clips:
        if c.classifier is None:
            raise ValueError(f"clip {c.name} was evaluated without a classifier; no features")
        rows.append(c.classifier.features[i])
    return np.stack(rows)


@dataclass(frozen=True)
class DistanceResult:
    """KID and Frechet distance of one window position to the reference (``None`` + reason where not computed)."""

    kid: Interval | None
    frechet: Interval | None
    frechet_dims: int
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"kid": self.kid.as_dict() if self.kid else None,
                "frechet": self.frechet.as_dict() if self.frechet else None,
                "frechet_feature": f"top {self.frechet_dims} principal components of the reference's classifier "
                                   "features", "note": self.note}


def frechet_interval(point: float, draws: np.ndarray, num_samples: int, level: float) -> Interval:
    """Bias-corrected percentile interval of a Frechet distance from its bootstrap ``draws``.

    A resample with replacement repeats clips, which shrinks its covariance estimates and raises
    its Frechet distance: the plain percentiles of the draws sit above the point estimate (on 64
    clips a teacher read 24.1 with a percentile interval [28.9, 42.4]). The interval is shifted by
    the bootstrap's estimate of that bias (mean draw minus the point) and floored at 0.
    """
    finite = draws[np.isfinite(draws)]
    if len(finite) == 0:
        return Interval(point, math.nan, math.nan, num_samples, level)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    bias = float(finite.mean()) - point
    return Interval(point, max(0.0, float(lo) - bias), max(0.0, float(hi) - bias), num_samples, level)


def distances(generated: SetEvaluation, reference: SetEvaluation, window: str, cfg: ReferenceConfig | None = None
              ) -> DistanceResult:
    """KID on the full classifier features; Frechet on the reference's top ``frechet_dims`` components."""
    cfg = cfg or ReferenceConfig()
    g, r = window_features(generated, window), window_features(reference, window)
    notes = []
    kid_result = None
    if min(len(g), len(r)) >= MIN_KID_SAMPLES:
        kid_result = kid(g, r, cfg.num_resamples, cfg.level, cfg.seed)
    else:
        notes.append(f"KID needs {MIN_KID_SAMPLES} clips per set")
    dims = min(cfg.frechet_dims, g.shape[1])
    need = math.ceil(MIN_SAMPLES_PER_DIM * dims)
    frechet_result = None
    if min(len(g), len(r)) >= need and len(r) > dims:
        mean, axes = pca_projection(r, dims)
        gp, rp = (g - mean) @ axes, (r - mean) @ axes
        rng = np.random.default_rng(cfg.seed)
        point = frechet_distance(gp, rp).distance
        draws = []
        for _ in range(cfg.frechet_resamples):
            gi, ri = rng.integers(0, len(gp), len(gp)), rng.integers(0, len(rp), len(rp))
            draws.append(frechet_distance(gp[gi], rp[ri]).distance)
        frechet_result = frechet_interval(point, np.asarray(draws), min(len(g), len(r)), cfg.level)
    else:
        notes.append(f"Frechet on {dims} components needs {need} clips per set, got {min(len(g), len(r))}")
    return DistanceResult(kid_result, frechet_result, dims, "; ".join(notes))


# ---------------------------------------------------------------------------------------------
# Everything for one set.


@dataclass
class SetSummary:
    """One generated set against its reference: what a comparison table shows, with intervals."""

    num_clips: int
    num_windows: int
    distances: dict[str, DistanceResult]
    adherence: dict[str, dict[str, AttributeAdherence]]  # window -> attribute -> result
    adherence_mean: dict[str, Interval]  # window -> mean over measured attributes
    measured: dict[str, list[str]]  # window -> measured attributes
    stability: dict[str, StabilityResult] = field(default_factory=dict)  # empty with a single window

    def as_dict(self) -> dict[str, Any]:
        return {"num_clips": self.num_clips, "num_windows": self.num_windows,
                "distances": {w: d.as_dict() for w, d in self.distances.items()},
                "adherence": {w: {k: a.as_dict() for k, a in per.items()} for w, per in self.adherence.items()},
                "adherence_mean": {w: i.as_dict() for w, i in self.adherence_mean.items()},
                "measured": self.measured, "unmeasured": {w: [k for k in ATTRIBUTE_KEYS if k not in m]
                                                          for w, m in self.measured.items()},
                "stability": {k: s.as_dict() for k, s in self.stability.items()}}


def summarise_against_reference(generated: SetEvaluation, reference: SetEvaluation,
                                cfg: ReferenceConfig | None = None) -> SetSummary:
    """KID/Frechet, per-attribute adherence (first and last window) and per-clip stability of one set."""
    cfg = cfg or ReferenceConfig()
    _check_paired(generated, reference)
    num_windows = min(len(c.classifier.starts) for c in generated.clips if c.classifier is not None)
    adherence = {w: attribute_adherence(generated, reference, w, cfg) for w in WINDOWS}
    measured = {w: [k for k, a in adherence[w].items() if a.measured] for w in WINDOWS}
    means = {w: mean_adherence(generated.clips, measured[w], w, cfg) for w in WINDOWS}
    stability = set_stability(generated, reference, cfg) if num_windows > 1 else {}
    return SetSummary(len(generated.clips), num_windows, {w: distances(generated, reference, w, cfg) for w in WINDOWS},
                      adherence, means, measured, stability)
