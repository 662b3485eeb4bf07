"""``python -m trainer.evaluate``: evaluate videos and write a report (Markdown + JSON + drift-curve PNGs).

Where the videos come from (exactly one):

* ``--videos DIR_OR_GLOB [--prompts FILE]``: MP4 files, with prompts from a JSON file
  (``{"clip.mp4": "caption", ...}`` or ``[{"video": ..., "prompt": ...}]``);
* ``--transformer CKPT --vae CKPT``: generate ``--num-clips`` held-out prompts (or the prompts
  of ``--prompts``, a JSON list of captions or the same formats) with the causal student;
* ``--teacher CKPT --vae CKPT``: the same prompts sampled by the bidirectional teacher
  (many-step Euler with CFG) over its short horizon;
* ``--rendered N``: N rendered held-out clips (the suite run on ground truth: a self-check).

``--reference rendered`` also renders one clip per evaluated video (the same prompt, length
and size) as the "real" set: every metric is reported for both, and the Frechet distance of
classifier features is computed per window position. The attribute classifier
(``--classifier``, default ``checkpoints/attr_classifier.safetensors``) adds prompt adherence
and the features; without it those parts are skipped and the report says so.

This module parses arguments and wires the pieces together; all behaviour lives in
:mod:`trainer.eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CLASSIFIER = "checkpoints/attr_classifier.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("videos to evaluate (exactly one source)")
    src.add_argument("--videos", help="directory of .mp4 files, or a glob")
    src.add_argument("--transformer", type=Path, help="student checkpoint: generate the videos (needs --vae)")
    src.add_argument("--teacher", type=Path, help="teacher checkpoint: sample the videos (needs --vae)")
    src.add_argument("--rendered", type=int, metavar="N", help="evaluate N rendered held-out clips")
    src.add_argument("--prompts", type=Path, help="JSON prompts: {video: caption} or [{video, prompt}] "
                                                  "(with --transformer: a list of captions also works)")
    src.add_argument("--fps", type=float, help="frame rate of --videos (default: read from each file)")
    src.add_argument("--max-frames", type=int, help="evaluate only the first N frames of each video")
    gen = p.add_argument_group("generation (with --transformer)")
    gen.add_argument("--vae", type=Path, help="VAE checkpoint (its latent stats de-normalise the latents)")
    gen.add_argument("--preset", default="default", help="model preset")
    gen.add_argument("--num-clips", type=int, default=8, help="held-out prompts to generate when --prompts is absent")
    gen.add_argument("--num-frames", type=int, default=80, help="pixel frames per generated or rendered clip")
    gen.add_argument("--size", type=int, default=128, help="frame size of --rendered clips")
    gen.add_argument("--seed", type=int, default=0, help="generation / render seed")
    gen.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                     help="student precision (auto: bfloat16 only where the CPU has native bf16)")
    gen.add_argument("--teacher-steps", type=int, default=50, help="teacher Euler steps")
    gen.add_argument("--cfg-scale", type=float, default=4.0, help="teacher guidance scale (1 = none)")
    gen.add_argument("--text-encoder", choices=["minilm", "hash"], default="minilm",
                     help="prompt encoder for generation; 'hash' is a model-free stand-in for tests")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--reference", choices=["none", "rendered"], default="none",
                    help="'rendered': also evaluate rendered clips of the same prompts as the real set")
    ev.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="attribute classifier checkpoint")
    ev.add_argument("--no-classifier", action="store_true", help="skip adherence and Frechet distance")
    ev.add_argument("--hop-seconds", type=float, default=1.0, help="time between classifier windows")
    ev.add_argument("--window-seconds", type=float, default=1.0, help="drift-curve window length")
    ev.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", type=Path, required=True, help="report directory, e.g. reports/NAME")
    return p


def _check(args: argparse.Namespace) -> None:
    sources = [args.videos, args.transformer, args.teacher, args.rendered]
    if sum(s is not None for s in sources) != 1:
        raise ValueError("give exactly one of --videos, --transformer or --teacher (with --vae), or --rendered N")
    if (args.transformer is not None or args.teacher is not None) and args.vae is None:
        raise ValueError("--transformer and --teacher need --vae")
    for name in ("num_clips", "num_frames", "size", "teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.rendered is not None and args.rendered < 1:
        raise ValueError("--rendered must be >= 1")
    if args.prompts is not None and not args.prompts.is_file():
        raise ValueError(f"--prompts {args.prompts} is not a file")


def _generation_prompts(args: argparse.Namespace) -> list[str]:
    from trainer.eval.inputs import heldout_prompts, load_prompts

    if args.prompts is None:
        return heldout_prompts(args.num_clips, args.seed)
    data = json.loads(args.prompts.read_text())
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return data
    return list(load_prompts(args.prompts).values())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.eval import inputs
    from trainer.eval.classifier import checkpoint_metadata, load_classifier
    from trainer.eval.oracle import OracleConfig
    from trainer.eval.report import write_report
    from trainer.eval.suite import SuiteConfig, evaluate_set, frechet_by_window

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    meta: dict[str, Any] = {}
    if args.videos is not None:
        prompts = inputs.load_prompts(args.prompts) if args.prompts else {}
        videos = inputs.load_videos(args.videos, prompts, args.fps, args.max_frames)
        meta["source"] = f"files {args.videos}" + (f", prompts {args.prompts}" if args.prompts else "")
    elif args.transformer is not None:
        videos = inputs.generate_videos(args.transformer, args.vae, args.preset, _generation_prompts(args),
                                        args.num_frames, args.seed, args.out / "videos", args.dtype, args.text_encoder)
        meta["source"] = f"student {args.transformer} (VAE {args.vae}, preset {args.preset}, seed {args.seed})"
    elif args.teacher is not None:
        videos = inputs.generate_teacher_videos(args.teacher, args.vae, args.preset, _generation_prompts(args),
                                                args.num_frames, args.seed, args.out / "videos", args.teacher_steps,
                                                args.cfg_scale, text=args.text_encoder)
        meta["source"] = (f"teacher {args.teacher} (VAE {args.vae}, preset {args.preset}, {args.teacher_steps} steps, "
                          f"cfg {args.cfg_scale}, seed {args.seed})")
    else:
        videos = inputs.render_reference([None] * args.rendered, args.num_frames, args.size, 16.0, args.seed + 1)
        meta["source"] = f"{args.rendered} rendered held-out clips (render seed {args.seed + 1})"
    meta["videos"] = len(videos)
    meta["frames per video"] = sorted({v.frames.shape[0] for v in videos})
    model = None
    classifier_accuracy = None
    if args.no_classifier:
        meta["classifier"] = "skipped (--no-classifier)"
    elif not Path(args.classifier).is_file():
        meta["classifier"] = (f"skipped: {args.classifier} not found "
                              "(train it: python -m trainer.eval.classifier --train)")
    else:
        model = load_classifier(args.classifier)
        recorded = checkpoint_metadata(args.classifier).get("heldout_accuracy")
        classifier_accuracy = json.loads(recorded) if recorded else None
        meta["classifier"] = str(args.classifier)
    cfg = SuiteConfig(oracle=OracleConfig(window_seconds=args.window_seconds), hop_seconds=args.hop_seconds)
    label = "student" if args.transformer else "teacher" if args.teacher else "evaluated"
    sets = {label: evaluate_set(videos, model, cfg, True)}
    frechet = {}
    if args.reference == "rendered":
        first = videos[0]
        reference = inputs.render_reference([v.prompt for v in videos], max(v.frames.shape[0] for v in videos),
                                            first.frames.shape[1], first.fps, args.seed + 1000)
        sets["reference (rendered)"] = evaluate_set(reference, model, cfg, True)
        if model is None:
            meta["frechet"] = "skipped: needs the attribute classifier's features"
        else:
            frechet = frechet_by_window(next(iter(sets.values())), sets["reference (rendered)"], cfg)
            if not frechet:
                meta["frechet"] = (f"skipped: fewer than {2 * cfg.frechet_dims} clips per window position "
                                   f"(on {cfg.frechet_dims} principal components of the classifier features)")
            meta.update(_against_reference(sets[label], sets["reference (rendered)"], args.out))
    meta["wall time (s)"] = round(time.time() - t0, 1)
    paths = write_report(args.out, args.out.name, sets, frechet, videos[0].fps, meta, cfg, classifier_accuracy)
    return {"out": str(args.out), **{k: str(v) for k, v in paths.items()},
            "flag_rates": {k: s.flag_rates for k, s in sets.items()}}


def _against_reference(generated: Any, reference: Any, out: Path) -> dict[str, str]:
    """KID, adherence of readable attributes and per-clip stability against the rendered clips (report lines)."""
    from trainer.eval.reference import summarise_against_reference
    from trainer.eval.report import json_safe
    from trainer.eval.stats import MIN_KID_SAMPLES

    if len(generated.clips) < MIN_KID_SAMPLES:
        return {"against the reference": f"skipped: KID and its interval need {MIN_KID_SAMPLES} clips"}
    if any(c.attributes is None for c in generated.clips):
        return {"against the reference": "skipped: some prompts are not captions, so no rendered clip matches them"}
    summary = summarise_against_reference(generated, reference)
    out.mkdir(parents=True, exist_ok=True)
    (out / "against_reference.json").write_text(json.dumps(json_safe(summary.as_dict()), indent=1))
    lines = {}
    for window in ("first", "last"):
        k = summary.distances[window].kid
        lines[f"KID x 1000, {window} window (95 % interval)"] = k.format(1, 1000) if k else "n/a"
        lines[f"adherence of readable attributes, {window} window"] = (
            f"{summary.adherence_mean[window].format(2)} over {', '.join(summary.measured[window])}")
    for q, st in summary.stability.items():
        lines[f"stability of {q} vs the rendered clips"] = st.note
    lines["against the reference (details)"] = "against_reference.json"
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        print(json.dumps(run(args)))
    except ValueError as exc:
        print(f"trainer.evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
