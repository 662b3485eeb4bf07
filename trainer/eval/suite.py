"""All metrics on one clip and on a set of clips: oracle metrics, drift curves, classifier adherence, Frechet.

A clip is evaluated on its own (:func:`evaluate_clip`): the oracle metrics, their per-window
means over time (the drift curves), and, with a classifier, its predictions on windows
``hop_seconds`` apart. Prompt adherence is judged on every window for the attributes that
hold for the whole clip (:data:`WHOLE_CLIP_KEYS`) and on the first window only for the camera
(:data:`FIRST_WINDOW_KEYS`): the renderer's camera moves ease out with a 3 s time constant,
so later windows of a correct clip barely move. A set (:func:`evaluate_set`) adds flag rates,
mean summaries, per-head adherence and the Frechet distance of its classifier features to a
reference set, per window position.

This module never reads or writes files and never builds a model: videos, the classifier
and the reference arrive as arguments.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.data.attributes import ATTRIBUTE_KEYS
from trainer.data.captions import caption_attributes
from trainer.eval.classifier import (
    AttributeClassifier,
    adherence,
    labels_from_probs,
    predict_probs,
    resize_frames,
    window,
    window_starts,
)
from trainer.eval.frechet import (
    MIN_SAMPLES_PER_DIM,
    SQRTM_BACKENDS,
    FrechetResult,
    frechet_distance,
    pca_projection,
)
from trainer.eval.oracle import MetricResult, OracleConfig, frames_for, oracle_metrics, window_means

FIRST_WINDOW_KEYS: tuple[str, ...] = ("camera",)
# Per-frame series that are labels, not quantities: never averaged into drift curves.
CATEGORICAL_SERIES: frozenset[str] = frozenset({"nearest_colour_index"})
WHOLE_CLIP_KEYS: tuple[str, ...] = tuple(k for k in ATTRIBUTE_KEYS if k not in FIRST_WINDOW_KEYS)
TRUE_AREA_CURVE = "truth/object_area"  # per-window true object area of a rendered clip


@dataclass(frozen=True)
class SuiteConfig:
    """What to measure and how often."""

    oracle: OracleConfig = field(default_factory=OracleConfig)
    hop_seconds: float = 1.0  # between classifier windows
    frechet_backend: str = "eigh"
    # The Frechet distance is taken on the reference's top principal components of the classifier
    # features (its 256 dimensions would need 512+ clips per set): 16 need 32 clips per window position.
    frechet_dims: int = 16
    classifier_batch: int = 32
    # False: classifier only. The oracle metrics (segmentation) are most of the cost of a short clip
    # and, with a single window, say nothing about drift.
    oracle_metrics: bool = True

    def __post_init__(self) -> None:
        if not self.hop_seconds > 0:
            raise ValueError(f"SuiteConfig.hop_seconds must be > 0, got {self.hop_seconds}")
        if self.frechet_backend not in SQRTM_BACKENDS:
            raise ValueError(f"unknown frechet_backend {self.frechet_backend!r}; valid: {list(SQRTM_BACKENDS)}")
        if self.frechet_dims < 1:
            raise ValueError("SuiteConfig.frechet_dims must be >= 1")


@dataclass(frozen=True)
class Video:
    """One clip to evaluate: uint8 ``frames [N, H, W, 3]`` at ``fps``, with its prompt if known.

    ``object_area``: the true object area per frame ``[N]`` (fraction of the frame), known only
    for rendered clips; it lets a comparison check what the segmentation reads against the truth.
    """

    name: str
    frames: np.ndarray
    fps: float
    prompt: str | None = None
    object_area: np.ndarray | None = None


@dataclass
class ClassifierEvaluation:
    """Classifier output on the windows of one clip (window ``i`` starts at frame ``starts[i]``)."""

    starts: list[int]
    predictions: list[dict[str, str]]
    features: np.ndarray  # [num_windows, feature_dim]
    adherence_first: dict[str, bool] | None  # every attribute, first window
    adherence_windows: list[float] | None  # per window: fraction of WHOLE_CLIP_KEYS as prompted


@dataclass
class ClipEvaluation:
    name: str
    prompt: str | None
    attributes: dict[str, str] | None
    num_frames: int
    fps: float
    metrics: dict[str, MetricResult]
    window_seconds: float
    curves: dict[str, np.ndarray]  # "metric/series" -> per-window means
    classifier: ClassifierEvaluation | None

    @property
    def flags(self) -> dict[str, bool]:
        return {name: m.flagged for name, m in self.metrics.items()}


def prompt_attributes(prompt: str | None) -> dict[str, str] | None:
    """Attributes of a caption-template prompt; ``None`` for free text (prompt checks are then skipped)."""
    if prompt is None:
        return None
    try:
        return caption_attributes(prompt)
    except ValueError:
        return None


@torch.no_grad()
def classify_clip(frames: np.ndarray, fps: float, model: AttributeClassifier, attributes: dict[str, str] | None,
                  cfg: SuiteConfig) -> ClassifierEvaluation:
    """Classifier predictions and features on windows ``hop_seconds`` apart (at least one window)."""
    mc = model.cfg
    resized = resize_frames(frames, mc.image_size)  # [3, N, S, S]
    starts = window_starts(frames.shape[0], mc, frames_for(cfg.hop_seconds, fps, frames.shape[0]))
    batch = torch.stack([window(resized, s, mc) for s in starts])  # [W, 3, T, S, S]
    probs, feats = predict_probs(model, batch, cfg.classifier_batch)
    predictions = labels_from_probs(probs)
    first = windows = None
    if attributes is not None:
        first = adherence(predictions[0], attributes)
        windows = [float(np.mean(list(adherence(p, attributes, WHOLE_CLIP_KEYS).values()))) for p in predictions]
    return ClassifierEvaluation(starts, predictions, feats.numpy(), first, windows)


def evaluate_clip(video: Video, model: AttributeClassifier | None = None, cfg: SuiteConfig | None = None
                  ) -> ClipEvaluation:
    """Oracle metrics, drift curves and (with ``model``) classifier adherence of one clip."""
    cfg = cfg or SuiteConfig()
    attributes = prompt_attributes(video.prompt)
    metrics = oracle_metrics(video.frames, video.fps, attributes, cfg.oracle)[0] if cfg.oracle_metrics else {}
    window_frames = frames_for(cfg.oracle.window_seconds, video.fps, video.frames.shape[0])
    curves = {f"{name}/{series}": window_means(values, window_frames)
              for name, m in metrics.items() for series, values in m.per_frame.items()
              if series not in CATEGORICAL_SERIES}
    if video.object_area is not None:
        curves[TRUE_AREA_CURVE] = window_means(np.asarray(video.object_area, dtype=np.float64), window_frames)
    classified = None
    if model is not None:
        classified = classify_clip(video.frames, video.fps, model, attributes, cfg)
        if classified.adherence_windows is not None:
            curves["adherence/whole_clip_keys"] = np.array(classified.adherence_windows)
    return ClipEvaluation(video.name, video.prompt, attributes, int(video.frames.shape[0]), video.fps, metrics,
                          window_frames / video.fps, curves, classified)


@dataclass
class SetEvaluation:
    """Aggregates over clips. Curves are averaged per window index over the clips that reach it."""

    clips: list[ClipEvaluation]
    flag_rates: dict[str, float]
    summary_means: dict[str, dict[str, float]]
    adherence_per_head: dict[str, float]  # first window, over clips with a parseable prompt
    curves: dict[str, np.ndarray]
    window_seconds: float


def _nanmean_ragged(series: Sequence[np.ndarray]) -> np.ndarray:
    length = max(len(s) for s in series)
    stacked = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        stacked[i, :len(s)] = s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": a window no clip reached
        return np.nanmean(stacked, axis=0)


def aggregate(clips: list[ClipEvaluation]) -> SetEvaluation:
    """Flag rates, mean summaries, per-head adherence and mean curves of evaluated clips."""
    if not clips:
        raise ValueError("no clips to aggregate")
    names = list(clips[0].metrics)
    flag_rates = {n: float(np.mean([c.metrics[n].flagged for c in clips])) for n in names}
    summary_means: dict[str, dict[str, float]] = {}
    for n in names:
        # Union over clips: prompt-dependent summaries exist only for clips with a parseable prompt.
        keys = list(dict.fromkeys(k for c in clips for k in c.metrics[n].summary))
        summary_means[n] = {}
        for k in keys:
            values = np.array([c.metrics[n].summary.get(k, math.nan) for c in clips], dtype=np.float64)
            summary_means[n][k] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    judged = [c.classifier.adherence_first for c in clips if c.classifier and c.classifier.adherence_first]
    adherence_per_head = {k: float(np.mean([a[k] for a in judged])) for k in ATTRIBUTE_KEYS} if judged else {}
    if adherence_per_head:
        adherence_per_head["mean"] = float(np.mean([adherence_per_head[k] for k in ATTRIBUTE_KEYS]))
    curve_keys = sorted(set().union(*(c.curves.keys() for c in clips)))
    curves = {k: _nanmean_ragged([c.curves[k] for c in clips if k in c.curves]) for k in curve_keys}
    return SetEvaluation(clips, flag_rates, summary_means, adherence_per_head, curves, clips[0].window_seconds)


def evaluate_set(videos: Sequence[Video], model: AttributeClassifier | None = None, cfg: SuiteConfig | None = None,
                 progress: bool = False) -> SetEvaluation:
    """:func:`evaluate_clip` on every video, then :func:`aggregate`."""
    cfg = cfg or SuiteConfig()
    clips = []
    for i, v in enumerate(videos):
        clips.append(evaluate_clip(v, model, cfg))
        if progress:
            print(f"evaluated {i + 1}/{len(videos)}: {v.name}", flush=True)
    return aggregate(clips)


def frechet_by_window(generated: SetEvaluation, reference: SetEvaluation, cfg: SuiteConfig | None = None
                      ) -> dict[int, FrechetResult]:
    """Frechet distance per window start frame present in both sets with enough clips.

    On the reference's top ``cfg.frechet_dims`` principal components of the classifier features
    (:func:`~trainer.eval.frechet.pca_projection`); a window position with fewer than
    ``MIN_SAMPLES_PER_DIM * frechet_dims`` clips on either side is left out, never reported biased.
    """
    cfg = cfg or SuiteConfig()

    def by_start(s: SetEvaluation) -> dict[int, list[np.ndarray]]:
        out: dict[int, list[np.ndarray]] = {}
        for c in s.clips:
            if c.classifier is None:
                raise ValueError(f"clip {c.name} was evaluated without a classifier; no features")
            for start, f in zip(c.classifier.starts, c.classifier.features, strict=True):
                out.setdefault(start, []).append(f)
        return out

    gen, ref = by_start(generated), by_start(reference)
    results = {}
    for start in sorted(set(gen) & set(ref)):
        g, r = np.stack(gen[start]), np.stack(ref[start])
        dims = min(cfg.frechet_dims, r.shape[1])
        if min(len(g), len(r)) >= math.ceil(MIN_SAMPLES_PER_DIM * dims) and len(r) > dims:
            mean, axes = pca_projection(r, dims)
            results[start] = frechet_distance((g - mean) @ axes, (r - mean) @ axes, cfg.frechet_backend)
    return results
