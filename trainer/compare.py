"""``python -m trainer.compare``: teacher vs students on the same held-out prompts, at 1x and Nx the horizon.

The evidence that the trainer works (issue "Trainer II"): one table and a few plots that put
the bidirectional teacher (many steps, its own horizon only) beside the 4-step causal
students (Self-Forcing, Self-Forcing++, Teacher Forcing, Diffusion Forcing, ...) on

* the Frechet distance of attribute-classifier features to rendered clips of the same prompts
  (per 1 s window, so it is also a drift curve),
* prompt adherence (attribute classifier, first window, mean over attributes),
* long-horizon stability: for a few per-window quantities (luma, motion, subject area,
  adherence, Frechet distance) the last window's value over the first window's.

Every generated set uses the same prompts and seeds; the rendered reference is rendered once
per length. Each (model, length) also gets a full per-set report (``trainer.eval.report``)
under ``OUT/<model>_<k>x/``; the comparison itself is ``OUT/compare.md`` / ``compare.json``
and ``OUT/*.png``.

    python -m trainer.compare --teacher checkpoints/teacher_default.safetensors \\
        --student sf=runs/sf_default/student.safetensors --student sfpp=runs/sfpp_default/student.safetensors \\
        --num-clips 16 --multiples 1 10 --out reports/self_forcing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Per-window quantities whose last/first ratio is the "no collapse" check (stable = near 1).
STABILITY_CURVES: dict[str, str] = {
    "luma": "overexposure/luma",
    "motion": "motion/frame_diff",
    "subject area": "subject_drift/area_fraction",
    "adherence": "adherence/whole_clip_keys",
}
STABILITY_TOLERANCE = 0.20  # |last / first - 1| within this counts as "no collapse"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "teacher" (bidirectional, many steps, its horizon only) or "student" (causal, 4 steps, any length)
    checkpoint: Path


def parse_student(text: str) -> ModelSpec:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--student takes NAME=CHECKPOINT, got {text!r}")
    return ModelSpec(name, "student", Path(path))


def teacher_horizon(path: Path) -> int:
    """The teacher's horizon in latent frames, from its checkpoint metadata."""
    from streamgen.model.weights import read_metadata

    value = read_metadata(path).get("num_latent_frames")
    if value is None:
        raise ValueError(f"teacher checkpoint {path} records no num_latent_frames; pass --horizon")
    return int(value)


def ratio(curve: np.ndarray | None) -> float:
    """Last finite window value over the first (nan when undefined)."""
    if curve is None:
        return math.nan
    finite = np.asarray(curve, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 2 or abs(finite[0]) < 1e-9:
        return math.nan
    return float(finite[-1] / finite[0])


def summarise(set_eval: Any, frechet: dict[int, Any], fps: float) -> dict[str, Any]:
    """The comparison row of one evaluated set."""
    distances = [r.distance for _, r in sorted(frechet.items())]
    row: dict[str, Any] = {
        "clips": len(set_eval.clips),
        "frames": int(max(c.num_frames for c in set_eval.clips)),
        "frechet_mean": float(np.mean(distances)) if distances else math.nan,
        "frechet_first": distances[0] if distances else math.nan,
        "frechet_last": distances[-1] if distances else math.nan,
        "frechet_curve": [{"start_s": s / fps, "distance": r.distance} for s, r in sorted(frechet.items())],
        "adherence_mean": set_eval.adherence_per_head.get("mean", math.nan),
        "adherence_per_head": dict(set_eval.adherence_per_head),
        "flag_rates": dict(set_eval.flag_rates),
        "stability": {label: ratio(set_eval.curves.get(key)) for label, key in STABILITY_CURVES.items()},
        "curves": {label: np.asarray(set_eval.curves[key]).tolist()
                   for label, key in STABILITY_CURVES.items() if key in set_eval.curves},
    }
    if len(distances) >= 2:
        row["stability"]["frechet"] = distances[-1] / distances[0] if distances[0] > 0 else math.nan
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: dict[str, dict[str, Any]], meta: dict[str, Any], images: list[str]) -> str:
    lines = ["# Teacher vs students", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "## Quality", "",
              "| model | length | frames | Frechet (mean over windows) | Frechet first / last window | "
              "adherence (mean) |", "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        model, length = key.rsplit("@", 1)
        lines.append(f"| {model} | {length} | {r['frames']} | {_fmt(r['frechet_mean'], 2)} | "
                     f"{_fmt(r['frechet_first'], 2)} / {_fmt(r['frechet_last'], 2)} | {_fmt(r['adherence_mean'])} |")
    labels = list(STABILITY_CURVES) + ["frechet"]
    lines += ["", f"## Stability: last window / first window (no collapse: within +-{STABILITY_TOLERANCE:.0%})", "",
              "| model | length | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, r in rows.items():
        model, length = key.rsplit("@", 1)
        cells = []
        for label in labels:
            v = r["stability"].get(label, math.nan)
            ok = math.isfinite(v) and abs(v - 1) <= STABILITY_TOLERANCE
            cells.append(_fmt(v, 2) + ("" if not math.isfinite(v) else " ok" if ok else " **drift**"))
        lines.append(f"| {model} | {length} | " + " | ".join(cells) + " |")
    metrics = sorted({m for r in rows.values() for m in r["flag_rates"]})
    lines += ["", "## Failure flags (fraction of clips)", "",
              "| model | length | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for key, r in rows.items():
        model, length = key.rsplit("@", 1)
        lines.append(f"| {model} | {length} | " + " | ".join(_fmt(r["flag_rates"].get(m), 2) for m in metrics) + " |")
    if images:
        lines += ["", "## Curves", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", "Per-set details (clips, metric summaries, drift curves): the `<model>_<k>x/report.md` files.", ""]
    return "\n".join(lines)


def plot(out: Path, rows: dict[str, dict[str, Any]], window_s: float) -> list[str]:
    """One PNG per length: Frechet distance and stability curves over time, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    lengths = sorted({k.rsplit("@", 1)[1] for k in rows}, key=lambda s: int(s.rstrip("x")))
    for length in lengths:
        keys = [k for k in rows if k.endswith("@" + length)]
        panels = ["frechet"] + list(STABILITY_CURVES)
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
        for ax, panel in zip(axes, panels, strict=True):
            for key in keys:
                r = rows[key]
                if panel == "frechet":
                    xs = [p["start_s"] for p in r["frechet_curve"]]
                    ys = [p["distance"] for p in r["frechet_curve"]]
                else:
                    ys = r["curves"].get(panel, [])
                    xs = [i * window_s for i in range(len(ys))]
                if ys:
                    ax.plot(xs, ys, marker=".", label=key.rsplit("@", 1)[0])
            ax.set_title(panel)
            ax.set_xlabel("time (s)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"length {length} the teacher's horizon")
        fig.tight_layout()
        name = f"curves_{length}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.eval import inputs
    from trainer.eval.classifier import load_classifier
    from trainer.eval.report import write_report
    from trainer.eval.suite import SuiteConfig, evaluate_set, frechet_by_window

    torch.set_num_threads(args.threads)
    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = ([ModelSpec("teacher", "teacher", args.teacher)] if args.teacher else []) + \
        [parse_student(s) for s in args.student]
    if not models:
        raise ValueError("nothing to compare: give --teacher and/or --student NAME=CHECKPOINT")
    for m in models:
        if not m.checkpoint.is_file():
            raise ValueError(f"{m.name}: checkpoint {m.checkpoint} does not exist")
    if not Path(args.classifier).is_file():
        raise ValueError(f"classifier {args.classifier} does not exist (train it: python -m trainer.eval.classifier)")
    horizon = args.horizon or (teacher_horizon(args.teacher) if args.teacher else None)
    if horizon is None:
        raise ValueError("give --horizon (latent frames) when no --teacher is compared")
    from streamgen.config import get_preset

    preset = get_preset(args.preset)
    fps = float(preset.video.fps)
    classifier = load_classifier(args.classifier)
    cfg = SuiteConfig(min_frechet_samples=min(8, args.num_clips))
    prompts = inputs.heldout_prompts(args.num_clips, args.seed)
    rows: dict[str, dict[str, Any]] = {}
    for k in args.multiples:
        num_frames = preset.pixel_frames(horizon * k)
        reference_videos = inputs.render_reference(prompts, num_frames, preset.video.height, fps, args.seed + 1000)
        reference = evaluate_set(reference_videos, classifier, cfg)
        for m in models:
            if m.kind == "teacher" and k != 1:
                continue  # the bidirectional teacher only exists at its own horizon
            print(f"[{time.time() - t0:6.0f} s] {m.name} at {k}x ({num_frames} frames, {len(prompts)} clips)",
                  flush=True)
            set_dir = out / f"{m.name}_{k}x"
            if m.kind == "teacher":
                videos = inputs.generate_teacher_videos(m.checkpoint, args.vae, args.preset, prompts, num_frames,
                                                        args.seed, set_dir / "videos", args.teacher_steps,
                                                        args.cfg_scale, text=args.text_encoder)
            else:
                videos = inputs.generate_videos(m.checkpoint, args.vae, args.preset, prompts, num_frames, args.seed,
                                                set_dir / "videos", text=args.text_encoder)
            evaluated = evaluate_set(videos, classifier, cfg)
            frechet = frechet_by_window(evaluated, reference, cfg)
            write_report(set_dir, f"{m.name} at {k}x", {m.name: evaluated, "reference (rendered)": reference},
                         frechet, fps, {"checkpoint": str(m.checkpoint), "length": f"{k}x ({num_frames} frames)"},
                         cfg)
            rows[f"{m.name}@{k}x"] = summarise(evaluated, frechet, fps)
    meta = {"prompts": f"{len(prompts)} held-out captions (seed {args.seed})",
            "teacher horizon": f"{horizon} latent frames ({preset.pixel_frames(horizon)} pixel frames, "
                               f"{preset.pixel_frames(horizon) / fps:.2f} s)",
            "teacher sampler": f"{args.teacher_steps} Euler steps, CFG {args.cfg_scale}",
            "students": "4 steps, chunked KV-cache generation (rolling window) as served",
            "VAE": str(args.vae), "classifier": str(args.classifier),
            "wall time (s)": round(time.time() - t0)}
    images = plot(out, rows, cfg.oracle.window_seconds)
    (out / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    (out / "compare.md").write_text(markdown(rows, meta, images))
    return {"out": str(out), "rows": {k: {"frechet_mean": r["frechet_mean"], "adherence_mean": r["adherence_mean"]}
                                      for k, r in rows.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", type=Path, help="bidirectional teacher checkpoint (evaluated at 1x only)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a causal student to compare (repeatable)")
    p.add_argument("--vae", type=Path, default=Path("checkpoints/vae_default.safetensors"), help="VAE checkpoint")
    p.add_argument("--classifier", default="checkpoints/attr_classifier.safetensors",
                   help="attribute classifier checkpoint (adherence and Frechet features)")
    p.add_argument("--preset", default="default", help="model preset")
    p.add_argument("--horizon", type=int, help="teacher horizon in latent frames (default: teacher metadata)")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 10], help="lengths, in teacher horizons")
    p.add_argument("--num-clips", type=int, default=16, help="held-out prompts (one clip each per set)")
    p.add_argument("--seed", type=int, default=0, help="prompt, noise and render seed")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher Euler steps")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="teacher guidance scale")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--text-encoder", choices=["minilm", "hash"], default="minilm",
                   help="prompt encoder; 'hash' is a model-free stand-in for tests")
    p.add_argument("--out", type=Path, required=True, help="output directory, e.g. reports/self_forcing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_clips < 2 or any(k < 1 for k in args.multiples):
            raise ValueError("--num-clips must be >= 2 and --multiples >= 1")
        print(json.dumps(run(args)))
    except ValueError as exc:
        print(f"trainer.compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
