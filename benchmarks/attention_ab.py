"""Two attention backends in the engine, side by side: chunk time alternated, and frames against float32.

    python benchmarks/attention_ab.py                          # sdpa against gemm, bf16, 1 and 4 streams
    python benchmarks/attention_ab.py --rounds 8 --psnr-prompts 4

1. Speed: two engines with the same random weights (``benchmarks/engine.py``'s ``build``), one per backend,
   each running ``--streams`` batched streams; after a warm-up, ``--rounds`` rounds of ``--chunks`` chunks,
   the backends' order alternating, so load from other jobs hits both alike. Reports per round
   ``a / b`` of the time per chunk (above 1: ``b`` faster) and the median.
2. Frames (``--psnr-prompts N > 0``): the committed default model (``checkpoints/default``) generates the
   same ``N`` captions and seeds in ``--dtype`` through each backend and in float32 through SDPA (the
   reference); the PSNR of each backend's frames against the reference, per caption.

Prints one JSON document, then a short table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_ab  # noqa: E402
from compare_trees import cpu_description  # noqa: E402
from engine import PROMPTS  # noqa: E402

from streamgen.config import ATTENTION_NAMES  # noqa: E402


def chunk_times(preset_name: str, dtype: torch.dtype, backends: list[str], streams: int, rounds: int,
                chunks: int) -> dict[str, list[float]]:
    """Per backend, the seconds per chunk (per stream) of each round (``engine_ab.chunk_times``, linears
    through ``F.linear`` in both engines)."""
    configs = {name: {"attention": name, "linear": "aten", "quantize": "none"} for name in backends}
    return engine_ab.chunk_times(preset_name, dtype, configs, streams, rounds, chunks)


def frames_psnr(dtype: str, backends: list[str], prompts: int, num_frames: int) -> dict[str, list[float]]:
    """Per backend, the PSNR (dB) of its frames in ``dtype`` against float32 SDPA, per caption."""
    from streamgen.pipeline import Pipeline

    def frames(d: str, attention: str) -> list[np.ndarray]:
        pipe = Pipeline.from_pretrained("checkpoints/default", dtype=d, attention=attention)
        return [pipe(p, num_frames=num_frames, seed=i).astype(np.float64) for i, p in enumerate(PROMPTS[:prompts])]

    ref = frames("float32", "sdpa")
    out = {}
    for name in backends:
        got = frames(dtype, name)
        out[name] = [float(10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2))) for a, b in zip(got, ref, strict=True)]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="sdpa", choices=ATTENTION_NAMES)
    p.add_argument("--b", default="gemm", choices=ATTENTION_NAMES)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--preset", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="batched streams per engine")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--chunks", type=int, default=4, help="chunks per round")
    p.add_argument("--psnr-prompts", type=int, default=4, help="captions for the frame comparison (0: skip)")
    p.add_argument("--psnr-frames", type=int, default=48)
    args = p.parse_args(argv)
    if args.a == args.b or args.rounds < 1 or args.chunks < 1 or min(args.streams) < 1:
        p.error("--a and --b must differ; --rounds, --chunks and --streams must be >= 1")
    if not 0 <= args.psnr_prompts <= len(PROMPTS):
        p.error(f"--psnr-prompts must lie in [0, {len(PROMPTS)}]")
    torch.set_num_threads(args.threads)
    backends = [args.a, args.b]
    result: dict[str, Any] = {"cpu": cpu_description(), "threads": args.threads, "dtype": args.dtype,
                              "preset": args.preset, "a": args.a, "b": args.b, "speed": {}}
    for n in args.streams:
        t = chunk_times(args.preset, getattr(torch, args.dtype), backends, n, args.rounds, args.chunks)
        result["speed"][str(n)] = engine_ab.summarise(t, args.a, args.b)
    if args.psnr_prompts:
        result["psnr_vs_float32_db"] = frames_psnr(args.dtype, backends, args.psnr_prompts, args.psnr_frames)
    print(json.dumps(result, indent=2))
    print(f"\n{result['cpu']}, {args.threads} threads, {args.dtype}: {args.a} against {args.b}")
    for n, r in result["speed"].items():
        print(f"  {n} stream(s): {args.a}/{args.b} chunk time median {r['a_over_b_median']:.2f} "
              f"(rounds {min(r['a_over_b_per_round']):.2f}-{max(r['a_over_b_per_round']):.2f}): {r['verdict']}")
    for name, values in result.get("psnr_vs_float32_db", {}).items():
        print(f"  PSNR against float32 sdpa, {name}: " + " / ".join(f"{v:.1f}" for v in values) + " dB")
    return result


if __name__ == "__main__":
    main()
