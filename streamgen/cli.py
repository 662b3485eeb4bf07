"""Command line: ``streamgen generate | info``.

Each sub-command validates its arguments before doing any work and exits non-zero with a
one-line message on bad input (``ValueError`` -> exit 2). Heavy imports (torch, the text
encoder) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video offline (chunked, KV-cached) and write an MP4",
                       description="Generate a video chunk by chunk with the causal student and its rolling "
                                   "KV cache, decode it with the VAE as it is made, and write H.264 MP4.")
    p.add_argument("--preset", default="default", help="model preset: test, default, wan-1.3b (default: default)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--num-frames", type=int, required=True, help="number of pixel frames to write (> 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same video)")
    p.add_argument("--out", type=Path, required=True, help="output .mp4 path")
    p.add_argument("--transformer", type=Path, help="transformer checkpoint (.safetensors)")
    p.add_argument("--vae", type=Path, help="VAE checkpoint (.safetensors)")
    p.add_argument("--random-init", action="store_true",
                   help="use randomly initialised weights (no checkpoints; output is noise-like)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="inference precision of the transformer (default: bfloat16)")
    p.add_argument("--attention", default="sdpa", help="attention backend: sdpa, flex, xformers, flash")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a preset's configuration and derived sizes as JSON")
    p.add_argument("--preset", default="default", help="model preset (default: default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description="Real-time autoregressive video generation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_info(sub)
    return parser


def cmd_info(args: argparse.Namespace) -> int:
    from streamgen.config import get_preset, to_dict

    preset = get_preset(args.preset)
    info = to_dict(preset)
    info["derived"] = {"dim": preset.model.dim, "latent_height": preset.latent_height,
                       "latent_width": preset.latent_width, "tokens_per_frame": preset.tokens_per_frame,
                       "pixel_frames_per_chunk": preset.pixel_frames(preset.sampler.chunk_frames)}
    print(json.dumps(info, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from streamgen.config import get_preset

    preset = get_preset(args.preset)
    if args.num_frames <= 0:
        raise ValueError(f"--num-frames must be > 0, got {args.num_frames}")
    if not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    if args.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {args.out}")
    if not args.random_init and (args.transformer is None or args.vae is None):
        raise ValueError("give --transformer and --vae checkpoints, or --random-init for random weights")

    import math

    import torch
    from tqdm import tqdm

    from streamgen.generate import generate_latents
    from streamgen.model.text import TextEncoder
    from streamgen.model.transformer import CausalWanTransformer
    from streamgen.model.vae import CausalVideoVAE
    from streamgen.model.weights import load_transformer, load_vae
    from streamgen.video_io import Mp4Writer, frames_to_uint8

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.random_init:
        torch.manual_seed(args.seed)
        model = CausalWanTransformer(preset.model, args.attention)
        vae = CausalVideoVAE(preset.vae)
    else:
        model = load_transformer(args.transformer, expected=preset.model, attention_backend=args.attention)
        vae = load_vae(args.vae, expected=preset.vae)
    model = model.eval().to(dtype)
    vae = vae.eval()

    text = TextEncoder(max_tokens=preset.model.text_max_tokens)
    emb, _ = text.encode([args.prompt])
    num_latent = math.ceil(args.num_frames / preset.vae.temporal_factor)
    generator = torch.Generator().manual_seed(args.seed)
    written = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), Mp4Writer(args.out, preset.video.width, preset.video.height, preset.video.fps) as writer, \
            tqdm(total=args.num_frames, unit="frame", desc="generate", disable=args.no_progress) as bar:
        context = model.encode_text(emb)
        decoder = vae.init_decoder_state(batch_size=1)
        for latents in generate_latents(model, context, preset, num_latent, generator):
            video, decoder = vae.decode_chunk(latents.float(), decoder)
            frames = frames_to_uint8(video[0])[: args.num_frames - written]
            writer.write(frames)
            written += len(frames)
            bar.update(len(frames))
    print(json.dumps({"out": str(args.out), "frames": written, "width": preset.video.width,
                      "height": preset.video.height, "fps": preset.video.fps}))
    return 0


COMMANDS = {"generate": cmd_generate, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:
        print(f"streamgen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
