"""``python -m trainer.data.preview``: render one sampled clip to a PNG strip and print its caption.

For eyeballing the renderer: the strip is a row of evenly spaced frames; ``--mask`` adds a
second row with the ground-truth mask tinted over the frames and the centre marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from trainer.data.attributes import SPLITS, attribute_dict, sample_clip_spec
from trainer.data.captions import caption
from trainer.data.renderer import RenderedClip, render_clip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="spec and render seed (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="attribute split to sample from")
    parser.add_argument("--frames", type=int, default=32, help="clip length in frames (default 32)")
    parser.add_argument("--size", type=int, default=128, help="frame height and width in pixels (default 128)")
    parser.add_argument("--fps", type=float, default=16.0, help="frames per second (default 16)")
    parser.add_argument("--columns", type=int, default=8, help="frames shown in the strip (default 8)")
    parser.add_argument("--mask", action="store_true", help="add a row showing the ground-truth mask and centre")
    parser.add_argument("--out", default="strip.png", help="output PNG path (default strip.png)")
    return parser.parse_args(argv)


def strip_image(clip: RenderedClip, columns: int, with_mask: bool = False) -> np.ndarray:
    """``[rows * H, columns * W, 3]`` uint8 strip of evenly spaced frames."""
    picks = np.unique(np.linspace(0, clip.num_frames - 1, max(1, columns)).round().astype(int))
    row = np.concatenate([clip.frames[i] for i in picks], axis=1)
    if not with_mask:
        return row
    overlays = []
    height, width = clip.frames.shape[1:3]
    for i in picks:
        frame = clip.frames[i].astype(np.float32)
        frame[clip.mask[i]] = 0.5 * frame[clip.mask[i]] + 0.5 * np.array([255.0, 0.0, 255.0])
        cx, cy = (clip.center[i] * [width, height]).astype(int)
        frame[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2] = (0.0, 255.0, 0.0)
        overlays.append(frame.astype(np.uint8))
    return np.concatenate([row, np.concatenate(overlays, axis=1)], axis=0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.frames < 1 or args.size < 8 or args.columns < 1:
        print("--frames and --columns must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    spec = sample_clip_spec(args.seed, split=args.split)
    clip = render_clip(spec, args.frames, height=args.size, width=args.size, fps=args.fps, seed=args.seed)
    Image.fromarray(strip_image(clip, args.columns, args.mask)).save(args.out)
    print(caption(spec))
    print(json.dumps({"out": args.out, "attributes": attribute_dict(spec)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
