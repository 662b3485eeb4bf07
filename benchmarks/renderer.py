"""Benchmark the procedural product-video renderer: frames per second, single process.

Renders ``--clips`` clips sampled from the train split (all kinds, backgrounds, camera
moves) of ``--frames`` frames each and prints one JSON line, then a one-line table:

    python benchmarks/renderer.py --clips 48 --frames 32 --size 128

numpy element-wise kernels are single-threaded, so this is the throughput of one data
loader worker. Ground truth (mask, centre, colours, exposure) is included in the timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(num_clips: int, num_frames: int, size: int, seed: int) -> dict[str, object]:
    from trainer.data.attributes import sample_clip_spec
    from trainer.data.renderer import render_clip

    specs = [sample_clip_spec(seed + i) for i in range(num_clips)]
    render_clip(specs[0], 2, height=size, width=size)  # warm-up: caches, allocator
    per_kind_s: dict[str, float] = defaultdict(float)
    per_kind_frames: dict[str, int] = defaultdict(int)
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        render_clip(spec, num_frames, height=size, width=size, seed=seed + i)
        per_kind_s[spec.kind] += time.perf_counter() - t0
        per_kind_frames[spec.kind] += num_frames
    elapsed = time.perf_counter() - start
    total = num_clips * num_frames
    return {
        "frames_per_second": round(total / elapsed, 1),
        "ms_per_frame": round(1000.0 * elapsed / total, 3),
        "height": size,
        "width": size,
        "num_clips": num_clips,
        "num_frames": total,
        "per_kind_frames_per_second": {k: round(per_kind_frames[k] / per_kind_s[k], 1) for k in sorted(per_kind_s)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the product-video renderer (frames/s).")
    parser.add_argument("--clips", type=int, default=48, help="number of sampled clips (default 48)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--size", type=int, default=128, help="frame height and width (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="first spec seed (default 0)")
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:  # `python benchmarks/renderer.py` without installing
        sys.path.insert(0, str(REPO_ROOT))
    result = run(args.clips, args.frames, args.size, args.seed)
    print(json.dumps(result))
    print(f"| renderer | {args.size}x{args.size} | {result['num_frames']} frames | "
          f"{result['frames_per_second']} frames/s | {result['ms_per_frame']} ms/frame |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
