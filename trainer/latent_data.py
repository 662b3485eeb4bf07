"""A pre-encoded latent dataset: rendered clips -> normalised VAE latents + prompt embeddings, on disk.

Teacher (and later student) steps should not pay for rendering and VAE encoding, so the
clips are encoded once into ``<dir>/``::

    latents.safetensors   latents [N, C, F, h, w] float32 in diffusion space (see trainer.common.latents),
                          text_emb [U, L, 384] float32 (one row per distinct caption), caption_ids [N] int64
    manifest.json         captions, attributes, clip indices, the VAE file and stats, geometry; written
                          last, so a directory without it is incomplete and gets re-encoded

Clip ``j`` is clip ``j`` of the ``train`` split (:func:`trainer.data.dataset.render_item`),
encoded from the start of a fresh stream (the first latent frame is a stream start, as in
serving). This module never trains anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from streamgen.model.text import TextEncoder, TokenEncoder
from streamgen.model.weights import atomic_save_safetensors, load_vae
from trainer.common.checkpoint import write_text_atomic
from trainer.common.latents import LatentStats
from trainer.data.dataset import ClipConfig, render_item

MANIFEST = "manifest.json"
TENSORS = "latents.safetensors"


@dataclass(frozen=True)
class LatentDatasetSpec:
    """What a latent dataset holds; a directory whose manifest disagrees is rebuilt, never mixed."""

    vae_checkpoint: str
    num_clips: int
    num_pixel_frames: int
    height: int
    width: int
    fps: int
    seed: int
    text_max_tokens: int

    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class LatentDataset:
    latents: torch.Tensor  # [N, C, F, h, w], diffusion space
    text_emb: torch.Tensor  # [U, L, 384]
    caption_ids: torch.Tensor  # [N]
    captions: list[str]  # per clip
    attributes: list[dict[str, str]]  # per clip

    def __len__(self) -> int:
        return self.latents.shape[0]


def _manifest_matches(directory: Path, spec: LatentDatasetSpec) -> bool:
    path = directory / MANIFEST
    if not path.is_file() or not (directory / TENSORS).is_file():
        return False
    return json.loads(path.read_text()).get("spec") == spec.key()


@torch.no_grad()
def build(directory: Path, spec: LatentDatasetSpec, batch: int = 8, log: bool = True,
          token_encoder: TokenEncoder | None = None) -> None:
    """Render, encode and store ``spec.num_clips`` training clips (skipped if ``directory`` already matches).

    ``token_encoder`` replaces the packaged MiniLM prompt encoder (tests pass a hash encoder).
    """
    directory = Path(directory)
    if _manifest_matches(directory, spec):
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # an outdated manifest must not survive a partial rebuild
    vae = load_vae(spec.vae_checkpoint).eval()
    stats = LatentStats.from_checkpoint(spec.vae_checkpoint)
    clip_cfg = ClipConfig(num_frames=spec.num_pixel_frames, height=spec.height, width=spec.width, fps=float(spec.fps))
    latents, captions, attributes = [], [], []
    t0 = time.perf_counter()
    if log:
        print(f"building latent dataset {directory}: {spec.num_clips} clips x {spec.num_pixel_frames} frames at "
              f"{spec.height}x{spec.width} (render + VAE encode)", flush=True)
    # A bar with rate and time left: building takes minutes to tens of minutes and must never look like a hang.
    bar = tqdm(total=spec.num_clips, desc="latent dataset", unit="clip", disable=not log, dynamic_ncols=True,
               mininterval=2.0)
    for start in range(0, spec.num_clips, batch):
        items = [render_item(spec.seed, "train", i, clip_cfg) for i in range(start, min(spec.num_clips, start + batch))]
        video = torch.stack([v for v, _, _ in items])  # [b, 3, N, H, W]
        latents.append(stats.normalize(vae.encode(video)))  # fp32: the VAE's convs are faster in fp32 on CPU
        captions += [c for _, c, _ in items]
        attributes += [a for _, _, a in items]
        bar.update(len(items))
    bar.close()
    unique = sorted(set(captions))
    ids = {c: i for i, c in enumerate(unique)}
    encoder = TextEncoder(spec.text_max_tokens, token_encoder=token_encoder)
    text_emb, _ = encoder.encode(unique)  # [U, L, 384]
    tensors = {"latents": torch.cat(latents), "text_emb": text_emb.float(),
               "caption_ids": torch.tensor([ids[c] for c in captions], dtype=torch.long)}
    atomic_save_safetensors(tensors, directory / TENSORS, {"spec": json.dumps(spec.key())})
    manifest = {"spec": spec.key(), "captions": captions, "attributes": attributes,
                "latent_stats": {"mean": stats.mean, "std": stats.std}}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest))
    if log:
        print(f"latent dataset: {len(captions)} clips, {len(unique)} captions, {time.perf_counter() - t0:.0f} s "
              f"-> {directory}", flush=True)


def load(directory: Path, spec: LatentDatasetSpec) -> LatentDataset:
    """Load a dataset built by :func:`build` for exactly ``spec``; anything else raises ``ValueError``."""
    directory = Path(directory)
    if not _manifest_matches(directory, spec):
        raise ValueError(f"{directory} holds no complete latent dataset for {spec}; build it first")
    manifest = json.loads((directory / MANIFEST).read_text())
    tensors = load_file(str(directory / TENSORS))
    return LatentDataset(tensors["latents"], tensors["text_emb"], tensors["caption_ids"], manifest["captions"],
                         manifest["attributes"])
