"""``python -m trainer.gallery``: PNG strips and GIFs of a student's clips, for the README gallery.

Each prompt is generated as it is served (4-step causal student, chunked KV-cache generation,
streaming VAE decode; :func:`trainer.eval.inputs.generate_videos`) and written as

* ``<out>/<i>.gif``: the whole clip, looping, at the model's frame rate;
* ``<out>/<i>.png``: ``--strip-frames`` evenly spaced frames side by side;
* ``<out>/gallery.md``: a Markdown table (split, prompt, what the classifier reads, strip, GIF) to
  paste into the README.

Prompts are either given (``--prompt``) or drawn: ``--draw N`` takes N captions per evaluation
split (``--splits``: ``in_distribution``, trained combinations on unseen clips, and ``heldout``,
combinations never trained on) from the caption template's seeded dataset (``--draw-seed``), so
nobody picks the flattering ones. Unless ``--classifier none``, the evaluation's attribute
classifier (``checkpoints/attr_classifier.safetensors``) reads each clip's first window, and the
table says which of the kind and colour asked for it saw: the failures are captioned by the same
instrument as docs/quality.md, not by hand.

    python -m trainer.gallery --draw 4 --seconds 4 --out docs/gallery       # the README's gallery
    python -m trainer.gallery --prompt "a glossy red bottle ..." --out DIR   # your own prompts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.captions import caption_attributes
from trainer.eval.classifier import adherence

DEFAULT_PROMPTS = (
    "a glossy red bottle turning slowly on a white table, soft lighting",
    "a matte blue mug on a wooden table, camera zooming in",
    "a yellow can turning quickly in a dark studio, static camera",
    "a white box on a kitchen counter, camera panning left",
)


def strip(frames: np.ndarray, num: int) -> Image.Image:
    """``num`` evenly spaced frames of ``[N, H, W, 3]`` uint8, left to right."""
    ids = np.linspace(0, frames.shape[0] - 1, num).round().astype(int)
    return Image.fromarray(np.concatenate([frames[i] for i in ids], axis=1))


def save_gif(frames: np.ndarray, fps: float, path: Path) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.gallery", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--transformer", type=Path, default=Path("checkpoints/student_default.safetensors"),
                   help="student checkpoint")
    p.add_argument("--vae", type=Path, default=Path("checkpoints/vae_default.safetensors"), help="VAE checkpoint")
    p.add_argument("--preset", default="default", help="model preset")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: four examples unless --draw)")
    p.add_argument("--draw", type=int, default=0,
                   help="draw this many captions per split from the seeded caption template instead of --prompt")
    p.add_argument("--splits", default="in_distribution,heldout",
                   help="comma-separated evaluation splits --draw takes captions from")
    p.add_argument("--draw-seed", type=int, default=0, help="dataset seed the drawn captions come from")
    p.add_argument("--classifier", default="checkpoints/attr_classifier.safetensors",
                   help="attribute classifier that reads each clip's first window ('none': skip)")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first clip (then +1 per clip)")
    p.add_argument("--strip-frames", type=int, default=6, help="frames per PNG strip")
    p.add_argument("--text-encoder", choices=["minilm", "hash"], default="minilm",
                   help="prompt encoder; 'hash' is a model-free stand-in for tests")
    p.add_argument("--out", type=Path, required=True, help="output directory, e.g. docs/gallery")
    return p


READ_KEYS = ("kind", "colour")  # what a viewer notices first; both readable on rendered clips (docs/quality.md)


def draw_prompts(count: int, splits: list[str], seed: int) -> list[tuple[str, str]]:
    """``(split, caption)`` pairs: the first ``count`` captions of each split's seeded dataset."""
    from trainer.eval.inputs import PROMPT_SPLITS, split_prompts

    unknown = [s for s in splits if s not in PROMPT_SPLITS]
    if unknown or not splits:
        raise ValueError(f"unknown split(s) {unknown or splits}; valid: {list(PROMPT_SPLITS)}")
    return [(split, prompt) for split in splits for prompt in split_prompts(split, count, seed)]


def first_window_readings(classifier_path: str, videos: list) -> list[dict[str, str] | None]:
    """What the evaluation's attribute classifier reads in each clip's first window
    (:func:`trainer.eval.suite.classify_clip`); ``None`` where the prompt is not a template caption, whose
    attributes cannot be compared."""
    from trainer.eval.classifier import load_classifier
    from trainer.eval.suite import SuiteConfig, classify_clip, prompt_attributes

    model, cfg = load_classifier(classifier_path), SuiteConfig()
    readings: list[dict[str, str] | None] = []
    for video in videos:
        asked = prompt_attributes(video.prompt)
        seen = classify_clip(video.frames, video.fps, model, asked, cfg).predictions[0]
        readings.append(None if asked is None else {key: seen[key] for key in READ_KEYS})
    return readings


def describe_reading(prompt: str, reading: dict[str, str] | None) -> str:
    """``"blue bottle (colour wrong: asked teal)"`` style cell of the gallery table."""
    if reading is None:
        return "-"
    asked = caption_attributes(prompt)
    right = adherence(reading, asked, READ_KEYS)
    wrong = [f"{key} wrong: asked {asked[key]}" for key in READ_KEYS if not right[key]]
    seen = " ".join(reading[key] for key in READ_KEYS[::-1])  # "colour kind"
    return f"{seen} (" + "; ".join(wrong) + ")" if wrong else f"{seen} (both right)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.seconds <= 0 or args.strip_frames < 1 or args.draw < 0:
            raise ValueError("--seconds must be > 0, --strip-frames >= 1 and --draw >= 0")
        if args.draw and args.prompt:
            raise ValueError("give either --prompt or --draw, not both")
        paths = [args.transformer, args.vae] + ([] if args.classifier == "none" else [Path(args.classifier)])
        for path in paths:
            if not path.is_file():
                raise ValueError(f"{path} does not exist")
        from streamgen.config import get_preset
        from trainer.eval.inputs import generate_videos

        preset = get_preset(args.preset)
        if args.draw:
            drawn = draw_prompts(args.draw, [s.strip() for s in args.splits.split(",") if s.strip()], args.draw_seed)
        else:
            drawn = [("given", p) for p in (args.prompt or DEFAULT_PROMPTS)]
        prompts = [p for _, p in drawn]
        num_frames = max(1, round(args.seconds * preset.video.fps))
        videos = generate_videos(args.transformer, args.vae, args.preset, prompts, num_frames, args.seed,
                                 text=args.text_encoder)
        readings = [None] * len(videos) if args.classifier == "none" else \
            first_window_readings(args.classifier, videos)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = ["| split | prompt | classifier reads (first window) | frames | clip |", "|---|---|---|---|---|"]
        for i, ((split, prompt), video, reading) in enumerate(zip(drawn, videos, readings, strict=True)):
            strip(video.frames, args.strip_frames).save(args.out / f"{i}.png")
            save_gif(video.frames, video.fps, args.out / f"{i}.gif")
            rows.append(f"| {split} | {prompt} | {describe_reading(prompt, reading)} | ![]({i}.png) | ![]({i}.gif) |")
        source = (f"{args.draw} captions per split drawn from dataset seed {args.draw_seed}" if args.draw
                  else "prompts given")
        scored = [adherence(r, caption_attributes(p), READ_KEYS) for (_, p), r in zip(drawn, readings, strict=True)
                  if r is not None]
        right = {key: sum(a[key] for a in scored) for key in READ_KEYS}
        tally = (" Classifier: " + ", ".join(f"{key} right in {right[key]} of {len(scored)}" for key in READ_KEYS)
                 + "." if scored else "")
        (args.out / "gallery.md").write_text(
            f"Generated by `{args.transformer}` ({source}; noise seed {args.seed} + clip index, {num_frames} frames "
            f"at {preset.video.fps} fps).{tally}\n\n" + "\n".join(rows) + "\n")
        print(json.dumps({"out": str(args.out), "clips": len(videos), "frames": num_frames,
                          "classifier_right": right if scored else None, "classified": len(scored)}))
    except ValueError as exc:
        print(f"trainer.gallery: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
