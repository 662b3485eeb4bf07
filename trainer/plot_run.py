"""``python -m trainer.plot_run``: loss and evaluation curves of training runs, side by side.

Reads the TensorBoard scalars every stage writes under ``<run dir>/tb`` (all event files of the run:
a resumed run continues the curve, and where a resume repeats steps the later value wins), draws
one panel per tag with one line per run (the raw values faint, a trailing moving average over
``--smooth`` points solid) and prints a JSON summary per run and tag: steps covered, points, and the
mean of the first and of the last fifth of the points, so a trend is stated in numbers too.

    python -m trainer.plot_run runs/sf_h12 runs/tf_h12 runs/sfpp_h12 \\
        --tags train/generator train/critic eval/adherence --out docs/img/h12_training.png

Exit code 2 with a message for a run directory without event files or a tag no run has (the
message lists the tags there are).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_TAGS = ("train/generator", "train/critic", "eval/adherence")


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` of every scalar under ``run_dir/tb``, sorted by step, one value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tb"
    files = sorted(tb.glob("events.out.tfevents.*")) if tb.is_dir() else []
    if not files:
        raise ValueError(f"{run_dir}: no TensorBoard event files under {tb} (is it a training run directory?)")
    by_tag: dict[str, dict[int, float]] = {}
    for path in sorted(files, key=lambda p: p.stat().st_mtime):  # written in this order: later files win
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            per_step = by_tag.setdefault(tag, {})
            for event in acc.Scalars(tag):
                per_step[int(event.step)] = float(event.value)
    out = {}
    for tag, per_step in by_tag.items():
        steps = np.array(sorted(per_step), dtype=np.int64)
        out[tag] = (steps, np.array([per_step[s] for s in steps], dtype=np.float64))
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (fewer at the start)."""
    if window <= 1 or values.size == 0:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def summarise(steps: np.ndarray, values: np.ndarray) -> dict[str, float | int]:
    fifth = max(1, values.size // 5)
    return {"first_step": int(steps[0]), "last_step": int(steps[-1]), "points": int(values.size),
            "mean_first_fifth": float(values[:fifth].mean()), "mean_last_fifth": float(values[-fifth:].mean())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.plot_run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    p.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS), help="scalar tags, one panel each")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window, in logged points")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.smooth < 1:
            raise ValueError("--smooth must be >= 1")
        runs = {str(run): read_scalars(run) for run in args.runs}
        available = sorted({tag for scalars in runs.values() for tag in scalars})
        missing = [tag for tag in args.tags if not any(tag in scalars for scalars in runs.values())]
        if missing:
            raise ValueError(f"no run has tag(s) {missing}; tags there are: {available}")
    except ValueError as exc:
        print(f"trainer.plot_run: error: {exc}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tags), figsize=(5 * len(args.tags), 3.6), squeeze=False)
    summary: dict[str, dict[str, object]] = {}
    for ax, tag in zip(axes[0], args.tags, strict=True):
        for i, (name, scalars) in enumerate(runs.items()):
            if tag not in scalars:
                continue
            steps, values = scalars[tag]
            colour = f"C{i}"
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, args.smooth), color=colour, linewidth=1.6, label=Path(name).name)
            summary.setdefault(name, {})[tag] = summarise(steps, values)
        ax.set_title(tag)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(json.dumps({"out": str(args.out), "runs": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
