"""Write an evaluation as ``report.md`` + ``report.json`` + PNG drift curves in one directory.

The JSON holds everything the Markdown shows plus per-clip summaries and per-window curves
(no per-frame series: a 100 s rollout would make it megabytes); NaN becomes ``null``.
Plots use matplotlib's object API with the Agg canvas, so writing a report never touches
global pyplot state or needs a display. This module never computes a metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trainer.eval.frechet import FrechetResult
from trainer.eval.suite import ClipEvaluation, SetEvaluation

# The drift curves plotted, in order: (curve key, axis label).
PLOTTED_CURVES: tuple[tuple[str, str], ...] = (
    ("overexposure/luma", "mean luminance"),
    ("overexposure/clipped_fraction", "clipped pixel fraction"),
    ("motion/frame_diff", "mean |frame diff|"),
    ("motion/changed_fraction", "changed fraction (0.5 s)"),
    ("colour_drift/chroma_delta_vs_start", "object chroma Delta E vs start"),
    ("colour_drift/prompt_colour_match", "object colour = prompt colour"),
    ("subject_drift/shift_vs_start", "subject shift vs start (frame units)"),
    ("subject_drift/log_area_ratio_vs_start", "log subject area vs start"),
    ("background_stability/change_vs_start", "background change vs start"),
    ("adherence/whole_clip_keys", "classifier adherence (whole-clip attributes)"),
)


# A head this inaccurate on rendered held-out clips says little about a generated clip's adherence.
UNRELIABLE_HEAD_ACCURACY = 0.7


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python, recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def clip_json(c: ClipEvaluation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": c.name, "prompt": c.prompt, "attributes": c.attributes, "num_frames": c.num_frames, "fps": c.fps,
        "flags": c.flags, "notes": {n: m.note for n, m in c.metrics.items()},
        "summaries": {n: m.summary for n, m in c.metrics.items()}, "curves": c.curves,
    }
    if c.classifier is not None:
        out["classifier"] = {"window_starts": c.classifier.starts, "predictions": c.classifier.predictions,
                             "adherence_first": c.classifier.adherence_first,
                             "adherence_windows": c.classifier.adherence_windows}
    return out


def set_json(s: SetEvaluation) -> dict[str, Any]:
    return {"num_clips": len(s.clips), "window_seconds": s.window_seconds, "flag_rates": s.flag_rates,
            "summary_means": s.summary_means, "adherence_per_head": s.adherence_per_head, "curves": s.curves,
            "clips": [clip_json(c) for c in s.clips]}


def frechet_json(results: Mapping[int, FrechetResult], fps: float) -> list[dict[str, Any]]:
    return [{"window_start_frame": start, "window_start_s": start / fps, "distance": r.distance,
             "num_generated": r.num_a, "num_reference": r.num_b, "feature_dim": r.feature_dim,
             "rank_deficient": r.rank_deficient} for start, r in sorted(results.items())]


def plot_curves(path: Path, sets: Mapping[str, SetEvaluation]) -> Path | None:
    """Grid of the :data:`PLOTTED_CURVES` present in any set, one line per set, x = window start (s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [(k, label) for k, label in PLOTTED_CURVES if any(k in s.curves for s in sets.values())]
    if not keys:
        return None
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.2 * cols, 2.6 * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, s in sets.items():
            if key in s.curves:
                y = s.curves[key]
                ax.plot(np.arange(len(y)) * s.window_seconds, y, marker="o", markersize=2.5, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("time (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def plot_frechet(path: Path, results: Mapping[int, FrechetResult], fps: float) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        return None
    starts = sorted(results)
    fig = Figure(figsize=(5.2, 2.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([s / fps for s in starts], [results[s].distance for s in starts], marker="o")
    ax.set_xlabel("window start (s)")
    ax.set_ylabel("Frechet distance")
    ax.set_title("classifier-feature Frechet distance to the reference", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(name: str, sets: Mapping[str, SetEvaluation], frechet: Mapping[int, FrechetResult], fps: float,
             meta: Mapping[str, Any], images: Mapping[str, str],
             classifier_accuracy: Mapping[str, float] | None = None) -> str:
    names = list(sets)
    lines = [f"# Evaluation report: {name}", ""]
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Failure modes (fraction of clips flagged)", "",
              "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    first = next(iter(sets.values()))
    for metric in first.flag_rates:
        lines.append(f"| {metric} | " + " | ".join(_fmt(sets[n].flag_rates.get(metric), 2) for n in names) + " |")
    lines += ["", "## Metric summaries (mean over clips)", "",
              "| metric | value | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for metric, summary in first.summary_means.items():
        for key in summary:
            lines.append(f"| {metric} | {key} | "
                         + " | ".join(_fmt(sets[n].summary_means.get(metric, {}).get(key)) for n in names) + " |")
    if any(s.adherence_per_head for s in sets.values()):
        heads = next(s.adherence_per_head for s in sets.values() if s.adherence_per_head)
        acc = dict(classifier_accuracy or {})
        # The classifier's own accuracy on rendered held-out clips bounds what adherence can show.
        extra = " classifier accuracy (rendered held-out) |" if acc else ""
        lines += ["", "## Prompt adherence (attribute classifier, first window)", "",
                  "| attribute | " + " | ".join(names) + " |" + extra, "|---|" + "---|" * (len(names) + bool(acc))]
        for head in heads:
            weak = head in acc and acc[head] < UNRELIABLE_HEAD_ACCURACY
            lines.append(f"| {head}{' (unreliable head)' if weak else ''} | "
                         + " | ".join(_fmt(sets[n].adherence_per_head.get(head), 3) for n in names)
                         + " |" + (f" {_fmt(acc.get(head), 3)} |" if acc else ""))
    if frechet:
        dims = next(iter(frechet.values())).feature_dim
        lines += ["", f"## Frechet distance to the reference (top {dims} principal components of the reference's "
                  "classifier features)", "",
                  "| window start (s) | distance | clips (gen / ref) | note |", "|---|---|---|---|"]
        for start, r in sorted(frechet.items()):
            note = "fewer clips than feature dims: biased upwards" if r.rank_deficient else ""
            lines.append(f"| {start / fps:.2f} | {r.distance:.3f} | {r.num_a} / {r.num_b} | {note} |")
    if images:
        lines += ["", "## Drift curves", ""]
        lines += [f"![{label}]({file})" for label, file in images.items()]
    for set_name, s in sets.items():
        lines += ["", f"## Clips: {set_name}", "", "| clip | frames | flagged | notes |", "|---|---|---|---|"]
        for c in s.clips:
            flagged = ", ".join(n for n, f in c.flags.items() if f) or "-"
            notes = "; ".join(f"{n}: {m.note}" for n, m in c.metrics.items() if m.flagged) or "-"
            lines.append(f"| {c.name} | {c.num_frames} | {flagged} | {notes} |")
    lines += ["", "## How to read this", "",
              "- Oracle metrics compare each clip with its own first window; the object is found by "
              "border-palette segmentation (trainer/eval/segment.py), which fails on products coloured like "
              "their background, so those clips' colour/subject verdicts are withheld (see notes).",
              "- Camera moves are subtracted from subject drift; background stability is only judged with a "
              "static camera; freezing is not flagged when the prompt asks for a still product.",
              "- Frechet distances use the attribute classifier's features and are comparable only between reports "
              "made with the same classifier checkpoint.", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, name: str, sets: Mapping[str, SetEvaluation],
                 frechet: Mapping[int, FrechetResult] | None = None, fps: float = 16.0,
                 meta: Mapping[str, Any] | None = None, config: Any = None,
                 classifier_accuracy: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and PNGs to ``out_dir``; returns their paths by kind.

    ``classifier_accuracy``: the classifier's per-head accuracy on rendered held-out clips (its
    checkpoint metadata), shown beside the adherence numbers.
    """
    if not sets:
        raise ValueError("write_report needs at least one evaluated set")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frechet = dict(frechet or {})
    meta = dict(meta or {})
    paths: dict[str, Path] = {}
    images: dict[str, str] = {}
    curves = plot_curves(out / "drift_curves.png", sets)
    if curves is not None:
        paths["drift_curves"] = curves
        images["drift curves"] = curves.name
    fd_plot = plot_frechet(out / "frechet.png", frechet, fps)
    if fd_plot is not None:
        paths["frechet_plot"] = fd_plot
        images["Frechet distance over time"] = fd_plot.name
    is_config = dataclasses.is_dataclass(config) and not isinstance(config, type)
    payload = {"name": name, "meta": meta, "config": dataclasses.asdict(config) if is_config else config,
               "classifier_accuracy": dict(classifier_accuracy or {}),
               "sets": {k: set_json(s) for k, s in sets.items()}, "frechet": frechet_json(frechet, fps)}
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(json_safe(payload), indent=1))
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown(name, sets, frechet, fps, meta, images, classifier_accuracy))
    return paths
