"""``python -m trainer.eval.latent_probe``: how much of the product's colour a VAE's encoder keeps.

For rendered clips (train split of a dataset seed no model trained on), the latent of the first
latent frame is averaged over the latent pixels that lie on the object (object mask pooled to the
latent grid, > 0.5), and a linear map with a bias is fitted from that mean latent to the object's
mean RGB (true mask, first frames) on two thirds of the clips. The R^2 per channel on the other
third says how linearly each colour channel can be read back from the latents: a channel the encoder
keeps reads near 1, one it drops reads low, and no decoder can restore what the latents lack.

    python -m trainer.eval.latent_probe --vae checkpoints/vae_stage1.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

MIN_CLIPS = 40  # two thirds must exceed the latent channels + 1 with room to spare


def linear_probe_r2(features: np.ndarray, targets: np.ndarray, train_fraction: float = 2 / 3) -> np.ndarray:
    """Least-squares fit (with bias) on the first ``train_fraction`` of rows; R^2 per target column on the rest."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features [N, D] and targets [N, K] with the same N, got {x.shape} and {y.shape}")
    n_train = int(len(x) * train_fraction)
    if n_train <= x.shape[1] + 1 or len(x) - n_train < 2:
        raise ValueError(f"{len(x)} rows are too few for a {x.shape[1]}-feature probe with a held-out part")
    a = np.c_[x, np.ones(len(x))]
    w, *_ = np.linalg.lstsq(a[:n_train], y[:n_train], rcond=None)
    pred, test = a[n_train:] @ w, y[n_train:]
    return 1.0 - ((pred - test) ** 2).sum(0) / ((test - test.mean(0)) ** 2).sum(0)


def object_latents(vae_path: str, num_clips: int, seed: int, frames: int = 4, preset_name: str = "default"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean latent on the object ``[N, C]`` and the object's mean RGB ``[N, 3]`` of rendered clips."""
    import torch
    import torch.nn.functional as F

    from streamgen.config import get_preset
    from streamgen.model.weights import load_vae
    from streamgen.video_io import uint8_to_frames
    from trainer.data.dataset import ClipConfig, render_dataset_clip

    preset = get_preset(preset_name)
    vae = load_vae(vae_path, expected=preset.vae).eval()
    sf, video = vae.cfg.spatial_factor, preset.video
    clip_cfg = ClipConfig(num_frames=frames, height=video.height, width=video.width, fps=float(video.fps))
    feats, rgb = [], []
    for i in range(num_clips):
        clip = render_dataset_clip(seed, "train", i, clip_cfg)[1]
        on = F.avg_pool2d(torch.from_numpy(clip.mask[:frames].mean(0)).float()[None, None], sf)[0, 0] > 0.5
        if not on.any():
            continue  # the object covers no latent pixel (out of frame or tiny)
        with torch.no_grad():
            z = vae.encode(uint8_to_frames(clip.frames[:frames])[None])[0, :, 0]  # [C, h, w]
        feats.append(z[:, on].mean(1).numpy())
        rgb.append(clip.frames[:frames][clip.mask[:frames]].mean(0))
    return np.array(feats), np.array(rgb)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.eval.latent_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="VAE checkpoint")
    p.add_argument("--num-clips", type=int, default=240, help="rendered clips (those with no object pixel are skipped)")
    p.add_argument("--seed", type=int, default=7, help="dataset seed of the rendered clips")
    p.add_argument("--preset", default="default", help="preset whose VAE config and frame size the clips use")
    args = p.parse_args(argv)
    try:
        if args.num_clips < MIN_CLIPS:
            raise ValueError(f"--num-clips must be >= {MIN_CLIPS}")
        feats, rgb = object_latents(args.vae, args.num_clips, args.seed, preset_name=args.preset)
        r2 = linear_probe_r2(feats, rgb)
    except ValueError as exc:
        print(f"trainer.eval.latent_probe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"vae": args.vae, "clips": len(feats), "r2": dict(zip("RGB", map(float, r2), strict=True))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
