"""INT8 against float32 on the committed default model: speed and what it costs in quality.

    python benchmarks/quantize.py                       # 16 prompts x 4 s, 2 threads
    python benchmarks/quantize.py --num-prompts 4 --seconds 2   # smoke run

INT8 here is PyTorch's dynamic INT8 linear, a CPU kernel: ``--device`` exists for symmetry with the
other benchmarks, and anything but a CPU is refused in one line (exit 2) before any weights load.

For each prompt (drawn, seeded, from the training caption template: train combinations) both models
generate the same clip from the same seed, chunk by chunk through the rolling KV cache, and the same
float32 VAE decodes both. Printed as one JSON document and a short table:

* ``transformer_speedup``: float32 over INT8 transformer seconds per clip, measured interleaved
  (float32 clip, INT8 clip, next prompt...) so load on a shared machine hits both alike. The float32
  model is the one serving runs (``--linear auto``: prepacked oneDNN linears where they run; ``--linear``).
* ``psnr_db``: PSNR of the INT8 clip's uint8 frames against the float32 clip's, per second of video
  (autoregressive generation compounds small differences, so later seconds drift further).
* ``adherence``: the attribute classifier (``checkpoints/attr_classifier.safetensors``) on each clip's
  first window, per attribute, for both models; and how many clips changed their reading.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from streamgen.config import get_preset
from streamgen.default_model import resolve
from streamgen.device import DEVICE_HELP, resolve_device
from streamgen.generate import generate_latents
from streamgen.model.prepack import LINEAR_KERNELS, prepack_linears, resolve_linear
from streamgen.model.quantize import check_quantize, quantize_transformer
from streamgen.model.text import TextEncoder
from streamgen.model.weights import load_transformer, load_vae
from streamgen.video_io import frames_to_uint8
from trainer.data.attributes import sample_clip_spec
from trainer.data.captions import caption, caption_attributes
from trainer.eval.classifier import adherence, labels_from_probs, load_classifier, predict_probs, resize_frames, window

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from compare_trees import cpu_description  # noqa: E402  (a sibling script: the CPU model and its bf16 flags)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def generate(model: torch.nn.Module, vae: torch.nn.Module, emb: torch.Tensor, num_latent: int, seed: int,
             num_frames: int) -> tuple[np.ndarray, float]:
    """uint8 frames ``[N, H, W, 3]`` and the transformer's seconds (the decode is timed apart)."""
    preset = get_preset("default")
    with torch.no_grad():
        context = model.encode_text(emb)
        decoder = vae.init_decoder_state(batch_size=1)
        frames, transformer_s = [], 0.0
        t0 = time.perf_counter()
        for latents in generate_latents(model, context, preset, num_latent, torch.Generator().manual_seed(seed)):
            transformer_s += time.perf_counter() - t0
            video, decoder = vae.decode_chunk(vae.from_diffusion(latents.float()), decoder)
            frames.append(frames_to_uint8(video[0]))
            t0 = time.perf_counter()
    return np.concatenate(frames)[:num_frames], transformer_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classifier", type=Path, default=REPO / "checkpoints" / "attr_classifier.safetensors")
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_HELP}; INT8 runs on cpu only")
    parser.add_argument("--linear", choices=LINEAR_KERNELS, default="auto",
                        help="the float32 model's linear layers, as `streamgen serve --linear`")
    args = parser.parse_args()
    if args.num_prompts <= 0 or args.seconds <= 0:
        parser.error("--num-prompts and --seconds must be > 0")
    try:
        check_quantize("int8", resolve_device(args.device), torch.float32)
        linear = resolve_linear(args.linear, "cpu", dtype=torch.float32)
    except ValueError as exc:
        print(f"benchmarks/quantize.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    preset = get_preset("default")
    transformer_path, vae_path = resolve("default", None, None, False)
    assert transformer_path is not None and vae_path is not None
    fp32 = load_transformer(transformer_path, expected=preset.model).eval().float()
    int8 = quantize_transformer(copy.deepcopy(fp32), "int8")
    if linear.kernel == "onednn":
        prepack_linears(fp32, preset.chunk_tokens)
    vae = load_vae(vae_path, expected=preset.vae).eval().float()
    classifier = load_classifier(args.classifier)
    text = TextEncoder(preset.model.text_max_tokens)
    fps = preset.video.fps
    num_frames = int(args.seconds * fps)
    num_latent = math.ceil(num_frames / preset.vae.temporal_factor)

    times = {"float32": 0.0, "int8": 0.0}
    psnr_by_second: list[list[float]] = []
    hits: dict[str, dict[str, int]] = {"float32": {}, "int8": {}}
    changed: dict[str, int] = {}
    for i in tqdm(range(args.num_prompts), desc="prompts", unit="prompt"):
        prompt = caption(sample_clip_spec(10_000 + i, "train"))
        target = caption_attributes(prompt)
        emb, _ = text.encode([prompt])
        clips = {}
        for name, model in (("float32", fp32), ("int8", int8)):
            clips[name], seconds = generate(model, vae, emb, num_latent, seed=i, num_frames=num_frames)
            times[name] += seconds
        psnr_by_second.append([psnr(clips["float32"][s:s + fps], clips["int8"][s:s + fps])
                               for s in range(0, num_frames, fps)])
        cc = classifier.cfg
        readings = {}
        for name, clip in clips.items():
            batch = window(resize_frames(clip, cc.image_size), 0, cc)[None]
            readings[name] = labels_from_probs(predict_probs(classifier, batch)[0])[0]
            for key, ok in adherence(readings[name], target).items():
                hits[name][key] = hits[name].get(key, 0) + int(ok)
        for key in target:
            changed[key] = changed.get(key, 0) + int(readings["float32"][key] != readings["int8"][key])

    per_second = np.array(psnr_by_second)  # [prompts, seconds]
    finite = np.where(np.isfinite(per_second), per_second, 99.0)
    result: dict[str, Any] = {
        "cpu": cpu_description(), "threads": args.threads, "float32_linear": linear.kernel,
        "num_prompts": args.num_prompts, "seconds": args.seconds,
        "transformer_s": times, "transformer_speedup": times["float32"] / times["int8"],
        "psnr_db": {"mean_by_second": finite.mean(axis=0).round(2).tolist(),
                    "min_by_second": finite.min(axis=0).round(2).tolist(), "mean": float(finite.mean())},
        "adherence": {name: {k: v / args.num_prompts for k, v in h.items()} for name, h in hits.items()},
        "readings_changed": changed,
    }
    print(json.dumps(result, indent=2))
    print(f"\nINT8 vs float32 ({linear.kernel} linears), {args.num_prompts} prompts x {args.seconds:g} s, "
          f"{args.threads} threads, {result['cpu']}")
    print(f"{'transformer speed-up':28} {result['transformer_speedup']:.2f}x")
    print(f"{'PSNR by second (mean, dB)':28} {' '.join(f'{v:.1f}' for v in result['psnr_db']['mean_by_second'])}")
    print(f"{'attribute':12} {'float32':>8} {'int8':>8} {'changed':>8}")
    for key in sorted(changed):
        print(f"{key:12} {result['adherence']['float32'][key]:8.2f} {result['adherence']['int8'][key]:8.2f} "
              f"{changed[key]:8d}")


if __name__ == "__main__":
    main()
