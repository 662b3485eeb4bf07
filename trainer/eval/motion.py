"""``python -m trainer.eval.motion``: how a stored set's clips move -- camera moves by caption, and judder.

Two measurements the attribute classifier cannot explain on its own, each printed beside the rendered clips
of the same captions (``--rendered``) so every number has its reference:

* **Camera moves by caption.** For each captioned camera (static, zoom in/out, pan left/right): the
  subject's area in the last ``--window`` frames over the first ``--window`` (segmentation,
  :mod:`trainer.eval.segment`; frames whose mask is unreliable are left out, clips with too few reliable
  frames are skipped) and the shift of its centroid in frame widths (positive: to the right). A zoom-in
  grows the subject, a zoom-out shrinks it, panning left moves the scene right.
* **Judder.** The mean absolute frame-to-frame change (uint8 levels), its median over clips at each
  phase ``t mod --group`` of the pixel frames (``--group`` = the VAE's temporal factor, so each phase is one
  position inside a latent frame's pixel frames), and ``judder`` = the largest phase over the mean of the
  phases: ~1 for motion spread evenly over frames, large where frames are held and the motion comes in
  one jump; printed with its 95 % bootstrap interval (clips resampled).

    python -m trainer.eval.motion runs/eval_x/teacher_in_distribution_1x --rendered
    python -m trainer.eval.motion SET_DIR [SET_DIR ...] --frames 48 --out motion.json
    python -m trainer.eval.motion SET_DIR --rendered --vae-row checkpoints/vae_default.safetensors OTHER.safetensors

``--vae-row VAE ...`` adds, for each VAE, the rendered clips encoded and decoded by it (what any model in its
latent space could at best show; ``trainer.compare --vae-row``'s row).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CAMERAS = ("static", "zoom_in", "zoom_out", "pan_left", "pan_right")


def _judder(diff: np.ndarray, group: int) -> tuple[list[float], float]:
    """Per-phase median (over clips and latent frames) of ``diff [N, F - 1]`` and largest / mean phase."""
    phases = [float(np.median(diff[:, p::group])) for p in range(group)]
    mean = float(np.mean(phases))
    return phases, (max(phases) / mean if mean > 0 else float("nan"))


def phase_profile(clips: np.ndarray, group: int = 4) -> dict[str, Any]:
    """``clips: uint8 [N, F, H, W, 3]`` -> per-phase median frame-to-frame change and the judder ratio,
    with the judder's 95 % bootstrap interval over clips (``judder_interval``: [low, high])."""
    from trainer.eval.stats import bootstrap

    if clips.ndim != 5 or clips.shape[1] < group + 1:
        raise ValueError(f"need clips [N, F, H, W, 3] with more than {group} frames, got {clips.shape}")
    diff = np.abs(np.diff(clips.astype(np.float32), axis=1)).mean(axis=(2, 3, 4))  # [N, F - 1]
    phases, judder = _judder(diff, group)
    interval = bootstrap(lambda idx: _judder(diff[idx], group)[1], len(diff), num_resamples=1000)
    return {"mean_change": float(diff.mean()), "phase_median_change": phases, "judder": judder,
            "judder_interval": [interval.low, interval.high]}


def subject_track(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: subject area (share of the frame), centroid x (share of the width), reliable mask
    (:func:`trainer.eval.oracle.subject_geometry` on :func:`trainer.eval.segment.segment_object`)."""
    from trainer.eval.oracle import subject_geometry
    from trainer.eval.segment import segment_object

    seg = segment_object(frames)
    area, x, _ = subject_geometry(seg)
    return area, x, seg.reliable


def camera_moves(clips: np.ndarray, prompts: Sequence[str | None], window: int = 12,
                 min_reliable: int = 6) -> dict[str, dict[str, Any]]:
    """Per captioned camera: clips measured, median / quartiles of the area ratio (last window over first) and
    the median centroid shift. Clips without a parseable caption or with fewer than ``min_reliable`` reliable
    frames in either window are skipped (counted in ``skipped``)."""
    from trainer.data.captions import parse_caption

    if clips.shape[1] < 2 * window:
        raise ValueError(f"clips of {clips.shape[1]} frames are shorter than two windows of {window}")
    per: dict[str, list[tuple[float, float]]] = {c: [] for c in CAMERAS}
    skipped = 0
    for frames, prompt in zip(clips, prompts, strict=True):
        try:
            camera = parse_caption(prompt).camera if prompt else None
        except ValueError:
            camera = None
        area, x, ok = subject_track(frames)
        first, last = slice(0, window), slice(clips.shape[1] - window, clips.shape[1])
        if camera is None or ok[first].sum() < min_reliable or ok[last].sum() < min_reliable:
            skipped += 1
            continue
        ratio = float(area[last][ok[last]].mean() / max(area[first][ok[first]].mean(), 1e-6))
        shift = float(np.nanmean(x[last][ok[last]]) - np.nanmean(x[first][ok[first]]))
        per[camera].append((ratio, shift))
    out: dict[str, dict[str, Any]] = {}
    for camera, values in per.items():
        v = np.array(values).reshape(-1, 2)
        out[camera] = {"clips": len(values),
                       "area_ratio": None if not len(values) else {
                           "median": float(np.median(v[:, 0])), "p25": float(np.percentile(v[:, 0], 25)),
                           "p75": float(np.percentile(v[:, 0], 75))},
                       "centroid_shift": None if not len(values) else float(np.median(v[:, 1]))}
    out["skipped"] = {"clips": skipped}
    return out


def measure(clips: np.ndarray, prompts: Sequence[str | None], window: int, group: int) -> dict[str, Any]:
    return {"clips": int(clips.shape[0]), "frames": int(clips.shape[1]), "judder": phase_profile(clips, group),
            "camera": camera_moves(clips, prompts, window)}


def table(name: str, result: dict[str, Any]) -> str:
    j = result["judder"]
    lines = [f"{name}: {result['clips']} clips x {result['frames']} frames; frame-to-frame change by phase "
             + " / ".join(f"{p:.2f}" for p in j["phase_median_change"])
             + f", judder {j['judder']:.2f} [{j['judder_interval'][0]:.2f}, {j['judder_interval'][1]:.2f}]",
             "| camera | clips | area last / first, median [p25, p75] | centroid shift (widths) |", "|---|---|---|---|"]
    for camera in CAMERAS:
        c = result["camera"][camera]
        if not c["clips"]:
            continue
        a = c["area_ratio"]
        lines.append(f"| {camera} | {c['clips']} | {a['median']:.2f} [{a['p25']:.2f}, {a['p75']:.2f}] | "
                     f"{c['centroid_shift']:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.eval.motion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sets", nargs="+", type=Path, help="set directories (clips.npz + clips.json, trainer.compare)")
    p.add_argument("--frames", type=int, default=48, help="leading frames of each clip measured")
    p.add_argument("--window", type=int, default=12, help="frames in the first and the last window")
    p.add_argument("--group", type=int, default=4, help="pixel frames per latent frame (judder phases)")
    p.add_argument("--rendered", action="store_true",
                   help="also the rendered clips of the first set's captions (render seeds as trainer.compare's)")
    p.add_argument("--vae-row", nargs="+", default=[], metavar="VAE",
                   help="also the rendered clips reconstructed by each of these VAE checkpoints (implies --rendered)")
    p.add_argument("--preset", default="default", help="the VAEs' preset (for --vae-row)")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    args = p.parse_args(argv)
    try:
        if args.frames < 2 * args.window or args.window < 6 or args.group < 1:
            raise ValueError("need --window >= 6 (a window needs 6 reliable frames), --group >= 1 and "
                             "--frames >= 2 x --window")
        from trainer.eval.paired import load_set

        results: dict[str, Any] = {}
        first_meta: dict[str, Any] | None = None
        size = 0  # the first set's frame size, for its rendered reference
        for directory in args.sets:
            videos, meta = load_set(directory)
            if first_meta is None:
                first_meta, size = meta, int(videos[0].frames.shape[1])
            if min(v.frames.shape[0] for v in videos) < args.frames:
                raise ValueError(f"{directory}: clips shorter than --frames {args.frames}")
            clips = np.stack([v.frames[:args.frames] for v in videos])
            results[str(directory)] = measure(clips, [v.prompt for v in videos], args.window, args.group)
        for vae in args.vae_row:
            if not Path(vae).is_file():
                raise ValueError(f"VAE checkpoint {vae} does not exist")
        if args.rendered or args.vae_row:
            from trainer.eval.inputs import reconstruct_videos, render_reference

            assert first_meta is not None
            rendered = render_reference(first_meta["prompts"], args.frames, size, float(first_meta["fps"]),
                                        int(first_meta.get("seed", 0)) + 1000)
            clips = np.stack([v.frames for v in rendered])
            captions = [v.prompt for v in rendered]  # a free-text prompt was rendered from a spec with a caption
            results["rendered"] = measure(clips, captions, args.window, args.group)
            for vae in args.vae_row:
                rebuilt = reconstruct_videos(rendered, vae, args.preset)
                results[f"vae row {vae}"] = measure(np.stack([v.frames for v in rebuilt]), captions,
                                                    args.window, args.group)
    except ValueError as exc:
        print(f"trainer.eval.motion: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    for name, result in results.items():
        print("\n" + table(name, result))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
