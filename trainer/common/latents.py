"""The VAE latent normalisation that teacher, student and serving must all share.

Our VAE encoder is deterministic (no KL head); the VAE trainer regularises each channel's
RMS towards 1 and then *measures* per-channel mean and std on training clips. Those are
stored in the VAE checkpoint's safetensors metadata (``latent_mean`` / ``latent_std``, JSON
lists, one number per latent channel), so the file alone defines the latent space:

* diffusion space ``z = (vae.encode(video) - mean) / std`` (what the teacher is trained on);
* decoding a diffusion sample: ``vae.decode(z * std + mean)``.

This module never loads model weights; it only reads metadata and applies the affine map.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

MEAN_KEY = "latent_mean"
STD_KEY = "latent_std"


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of VAE latents on training clips."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"latent mean/std need one value per channel, got {len(self.mean)} / {len(self.std)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"latent std must be > 0, got {self.std}")

    @staticmethod
    def measure(latents: Sequence[torch.Tensor]) -> LatentStats:
        """Stats over all of ``latents`` (each ``[B, C, n, h, w]``), per channel, in float64."""
        flat = torch.cat([z.double().transpose(0, 1).reshape(z.shape[1], -1) for z in latents], dim=1)  # [C, M]
        return LatentStats(tuple(flat.mean(1).tolist()), tuple(flat.std(1).tolist()))

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        if like.shape[1] != len(values):
            raise ValueError(f"latents have {like.shape[1]} channels, stats have {len(values)}")
        return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, n, h, w]`` -> diffusion space (zero mean, unit std per channel)."""
        return ((latents.float() - self._view(self.mean, latents)) / self._view(self.std, latents)).to(latents.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents -> VAE latents for ``decode``."""
        return (z.float() * self._view(self.std, z) + self._view(self.mean, z)).to(z.dtype)

    def metadata(self) -> dict[str, str]:
        return {MEAN_KEY: json.dumps(list(self.mean)), STD_KEY: json.dumps(list(self.std))}

    @staticmethod
    def from_checkpoint(path: str | Path) -> LatentStats:
        """Read the stats recorded in a VAE checkpoint; a file without them raises ``ValueError``."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read VAE checkpoint {path}: {exc}") from exc
        if MEAN_KEY not in metadata or STD_KEY not in metadata:
            raise ValueError(f"VAE checkpoint {path} has no {MEAN_KEY}/{STD_KEY} metadata; export it with trainer.vae")
        return LatentStats(tuple(json.loads(metadata[MEAN_KEY])), tuple(json.loads(metadata[STD_KEY])))
