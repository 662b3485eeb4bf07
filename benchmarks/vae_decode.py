"""Streaming VAE decode time of several VAE checkpoints, alternated in one run: what a decoder layout costs.

    python benchmarks/vae_decode.py checkpoints/vae_default.safetensors runs/vae_decoder_fresh.safetensors
    python benchmarks/vae_decode.py A.safetensors B.safetensors --threads 2 --dtype bfloat16 float32 --rounds 5

Each VAE decodes one chunk of ``--latent-frames`` latent frames of the preset's size through ``decode_chunk``
with a warm stream state, as the engine does after a stream's first chunk; per round every VAE (and every
``--dtype``) is timed over ``--repeats`` decodes in turn, so load from other jobs hits all alike, and the
median over ``--rounds`` rounds is reported with its ratio to the first VAE's. The analytic decode FLOPs of
each layout (``torch.utils.flop_counter``) are printed beside it. Weights do not change the time, so any
checkpoint of the layout will do. Prints one JSON document, then a short table; the CPU model and its
bf16/AMX flags are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trees import cpu_description  # noqa: E402

from streamgen.config import get_preset  # noqa: E402
from streamgen.model.weights import load_vae  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_flops(vae: Any, latents: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode_chunk(latents, vae.init_decoder_state(latents.shape[0]))
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vaes", nargs="+", help="VAE checkpoints (the first is the baseline of the ratios)")
    p.add_argument("--preset", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    p.add_argument("--latent-frames", type=int, default=3, help="latent frames per decoded chunk (the default chunk)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="decodes timed per VAE per round")
    args = p.parse_args(argv)
    for path in args.vaes:
        if not Path(path).is_file():
            p.error(f"VAE checkpoint {path} does not exist")
    if min(args.threads, args.latent_frames, args.rounds, args.repeats) < 1:
        p.error("--threads, --latent-frames, --rounds and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    try:
        vaes = {path: load_vae(path, expected=preset.vae).eval() for path in args.vaes}
    except ValueError as exc:
        p.error(str(exc))
    torch.manual_seed(0)
    latents = torch.randn(1, preset.vae.latent_channels, args.latent_frames, preset.latent_height,
                          preset.latent_width)
    flops = {path: decode_flops(vae, latents) for path, vae in vaes.items()}
    times: dict[str, dict[str, list[float]]] = {d: {path: [] for path in vaes} for d in args.dtype}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in args.dtype:
                x = latents.to(DTYPES[name])
                for path, vae in vaes.items():
                    vae.to(DTYPES[name])
                    _, state = vae.decode_chunk(x, vae.init_decoder_state(1))  # warm state, warm kernels
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        vae.decode_chunk(x, state)
                    elapsed = (time.perf_counter() - t0) / args.repeats
                    if not elapsed > 0:
                        raise RuntimeError(f"impossible decode time {elapsed} s for {path}")
                    times[name][path].append(1e3 * elapsed)
    base = args.vaes[0]
    result: dict[str, Any] = {
        "cpu": cpu_description(), "threads": args.threads, "preset": args.preset,
        "latent_frames": args.latent_frames, "rounds": args.rounds, "repeats": args.repeats,
        "vaes": {path: {"post_grow_blocks": vae.cfg.post_grow_blocks, "pre_pool_blocks": vae.cfg.pre_pool_blocks,
                        "decode_gflop": flops[path] / 1e9,
                        "ms": {d: statistics.median(times[d][path]) for d in args.dtype},
                        "over_first": {d: statistics.median(times[d][path]) / statistics.median(times[d][base])
                                       for d in args.dtype}}
                 for path, vae in vaes.items()},
    }
    print(json.dumps(result, indent=2))
    print(f"\n{result['cpu']}, {args.threads} thread(s), {args.latent_frames} latent frames, median of {args.rounds}")
    print("| VAE | post-grow / pre-pool blocks | GFLOP | " + " | ".join(f"{d} ms (x first)" for d in args.dtype) + " |")
    print("|---|---|---|" + "---|" * len(args.dtype))
    for path, r in result["vaes"].items():
        cells = " | ".join(f"{r['ms'][d]:.1f} ({r['over_first'][d]:.2f})" for d in args.dtype)
        print(f"| {path} | {r['post_grow_blocks']} / {r['pre_pool_blocks']} | {r['decode_gflop']:.2f} | {cells} |")
    return result


if __name__ == "__main__":
    main()
