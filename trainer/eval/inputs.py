"""Where evaluated videos come from: MP4 files + a prompt file, rendered reference clips, or a model.

* **Files**: ``videos`` is a directory (every ``*.mp4`` in it, sorted) or a glob. Prompts
  come from a JSON file, either ``{"clip.mp4": "a glossy red bottle ...", ...}`` (keys may
  also be file stems) or ``[{"video": "clip.mp4", "prompt": "..."}, ...]``; a video
  without an entry is evaluated without prompt checks.
* **Rendered**: held-out clips (or the clips of given prompts) drawn by the renderer, the
  "real" set of the Frechet distance and a baseline for every oracle metric.
* **Generated** (optional): a student checkpoint + VAE checkpoint generate clips for prompts
  with :func:`streamgen.generate.generate_latents`, decoded chunk by chunk as in
  ``streamgen generate``; or the bidirectional teacher samples its horizon with
  :func:`trainer.sampling.sample_teacher`. Latents are de-normalised with the VAE
  checkpoint's stats (:mod:`trainer.common.latents`).

This module reads and writes video files and may run a model; it computes no metric.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

from streamgen.video_io import read_video, write_mp4
from trainer.data.captions import caption, parse_caption
from trainer.data.dataset import clip_identity
from trainer.data.renderer import render_clip
from trainer.eval.suite import Video


def find_videos(pattern: str | os.PathLike[str]) -> list[Path]:
    """A directory's ``*.mp4`` files, or the files a glob matches, sorted; none found raises ``ValueError``."""
    path = Path(pattern)
    files = sorted(path.glob("*.mp4")) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(pattern)))
    files = [f for f in files if f.is_file()]
    if not files:
        raise ValueError(f"no videos found at {pattern!r} (a directory of .mp4 files or a glob)")
    return files


def load_prompts(path: str | os.PathLike[str]) -> dict[str, str]:
    """Prompt per video file name from a JSON mapping or a list of ``{"video", "prompt"}`` objects."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read prompts file {path}: {exc}") from exc
    if isinstance(data, dict):
        entries = data.items()
    elif isinstance(data, list) and all(isinstance(e, dict) and {"video", "prompt"} <= set(e) for e in data):
        entries = ((e["video"], e["prompt"]) for e in data)
    else:
        raise ValueError(f"prompts file {path} must hold an object {{video: prompt}} or a list of "
                         f"{{'video': ..., 'prompt': ...}} objects")
    out = {}
    for name, prompt in entries:
        if not isinstance(name, str) or not isinstance(prompt, str):
            raise ValueError(f"prompts file {path}: video names and prompts must be strings, got {name!r}: {prompt!r}")
        out[name] = prompt
    return out


def video_fps(path: str | os.PathLike[str]) -> float:
    """Frame rate recorded in a video file's first video stream."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
    if rate is None or float(rate) <= 0:
        raise ValueError(f"{path} records no frame rate; pass --fps")
    return float(rate)


def load_videos(pattern: str | os.PathLike[str], prompts: dict[str, str] | None = None,
                fps: float | None = None, max_frames: int | None = None) -> list[Video]:
    """Decode the videos at ``pattern`` with their prompts (matched by file name, then stem)."""
    prompts = prompts or {}
    videos = []
    for f in find_videos(pattern):
        frames = read_video(f)
        if max_frames is not None:
            frames = frames[:max_frames]
        prompt = prompts.get(f.name, prompts.get(f.stem))
        videos.append(Video(f.name, frames, fps if fps is not None else video_fps(f), prompt))
    return videos


def heldout_prompts(num_clips: int, seed: int = 0) -> list[str]:
    """Captions of the first ``num_clips`` held-out clips of the dataset seeded ``seed``."""
    return [caption(clip_identity(seed, "heldout", i)[0]) for i in range(num_clips)]


# The committed models trained on train-split clips of dataset seeds 0 and 1, so in-distribution
# prompts come from a seed no training run used: the (kind, colour) combinations were trained on,
# the exact clips (captions, render seeds) were not.
IN_DISTRIBUTION_SEED_OFFSET = 100
PROMPT_SPLITS: tuple[str, ...] = ("in_distribution", "heldout")


def in_distribution_prompts(num_clips: int, seed: int = 0) -> list[str]:
    """Captions of train-split clips (trained combinations) of dataset seed ``seed + IN_DISTRIBUTION_SEED_OFFSET``."""
    return [caption(clip_identity(seed + IN_DISTRIBUTION_SEED_OFFSET, "train", i)[0]) for i in range(num_clips)]


def split_prompts(split: str, num_clips: int, seed: int = 0) -> list[str]:
    """The prompts of one evaluation split (:data:`PROMPT_SPLITS`)."""
    if split == "in_distribution":
        return in_distribution_prompts(num_clips, seed)
    if split == "heldout":
        return heldout_prompts(num_clips, seed)
    raise ValueError(f"unknown prompt split {split!r}; valid: {list(PROMPT_SPLITS)}")


def save_clips(directory: str | os.PathLike[str], videos: Sequence[Video], meta: dict[str, Any]) -> None:
    """Store generated clips losslessly (``clips.npz``, uint8) with what made them (``clips.json``).

    Generation is the slow part of an evaluation on a CPU; a later run with the same ``meta``
    (checkpoint, prompts, seed, length) reuses the clips through :func:`load_clips`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lengths = {v.frames.shape for v in videos}
    if len(lengths) != 1:
        raise ValueError(f"clips to store must share one shape, got {sorted(lengths)}")
    np.savez(out / "clips.npz", frames=np.stack([v.frames for v in videos]))
    record = {**meta, "names": [v.name for v in videos], "prompts": [v.prompt for v in videos],
              "fps": videos[0].fps}
    (out / "clips.json").write_text(json.dumps(record, indent=1))


def load_clips(directory: str | os.PathLike[str], meta: dict[str, Any]) -> list[Video] | None:
    """Clips stored by :func:`save_clips` if they were made with exactly ``meta``; else ``None``."""
    path = Path(directory)
    if not (path / "clips.npz").is_file() or not (path / "clips.json").is_file():
        return None
    record = json.loads((path / "clips.json").read_text())
    if any(record.get(k) != v for k, v in meta.items()):
        return None
    frames = np.load(path / "clips.npz")["frames"]
    return [Video(n, f, float(record["fps"]), p) for n, f, p in zip(record["names"], frames, record["prompts"],
                                                                    strict=True)]


def render_reference(prompts: Sequence[str | None], num_frames: int, size: int, fps: float, seed: int = 0
                     ) -> list[Video]:
    """One rendered clip per prompt (a caption; ``None`` or free text: a held-out spec), render seeds from ``seed``.

    Rendering the generated clips' own prompts makes the reference differ only in what the
    model got wrong, not in what was asked for.
    """
    videos = []
    for i, prompt in enumerate(prompts):
        spec, render_seed = clip_identity(seed, "heldout", i)
        if prompt is not None:
            # Free text cannot be rendered: such a clip keeps the held-out spec drawn above.
            with contextlib.suppress(ValueError):
                spec = parse_caption(prompt)
        clip = render_clip(spec, num_frames, height=size, width=size, fps=fps, seed=render_seed)
        videos.append(Video(f"rendered_{i:04d}", clip.frames, fps, caption(spec), clip.mask.mean(axis=(1, 2))))
    return videos


def reconstruct_videos(videos: Sequence[Video], vae_path: str | os.PathLike[str], preset_name: str,
                       batch_size: int = 8, chunk_frames: int = 16) -> list[Video]:
    """Each clip encoded and decoded by the VAE (a fresh stream per clip), named ``vae_<i>``.

    What any model working in this VAE's latent space could at best produce for the clip: the
    row that tells the VAE's share of an attribute the models miss from the generator's share.
    Prompts and true object areas are kept (the object's pixels are the rendered clip's).
    """
    import torch

    from streamgen.config import get_preset
    from streamgen.model.weights import load_vae
    from streamgen.video_io import frames_to_uint8, uint8_to_frames

    preset = get_preset(preset_name)
    tf = preset.vae.temporal_factor
    if batch_size < 1 or chunk_frames < tf or chunk_frames % tf:
        raise ValueError(f"batch_size must be >= 1 and chunk_frames a positive multiple of {tf}, "
                         f"got {batch_size} and {chunk_frames}")
    vae = load_vae(vae_path, expected=preset.vae).eval()
    out = []
    for start in range(0, len(videos), batch_size):
        group = videos[start:start + batch_size]
        shapes = {v.frames.shape for v in group}
        if len(shapes) != 1:
            raise ValueError(f"clips to reconstruct must share one shape, got {sorted(shapes)}")
        batch = torch.stack([uint8_to_frames(v.frames) for v in group])  # [B, 3, N, H, W]
        enc, dec = vae.init_encoder_state(len(group)), vae.init_decoder_state(len(group))
        pieces = []
        with torch.no_grad():  # chunk by chunk (equal to the whole-clip pass): activations of one chunk at a time
            for t in range(0, batch.shape[2], chunk_frames):
                latents, enc = vae.encode_chunk(batch[:, :, t:t + chunk_frames], enc)
                video, dec = vae.decode_chunk(latents, dec)
                pieces.append(video)
        decoded = torch.cat(pieces, dim=2)
        for j, v in enumerate(group):
            out.append(Video(f"vae_{start + j:04d}", frames_to_uint8(decoded[j]), v.fps, v.prompt, v.object_area))
    return out


def text_encoder(max_tokens: int, kind: str = "minilm") -> Any:
    """The prompt encoder: ``"minilm"`` (what the models were trained with) or ``"hash"`` (tests only)."""
    from streamgen.model.text import HashTokenEncoder, TextEncoder

    if kind not in ("minilm", "hash"):
        raise ValueError(f"unknown text encoder {kind!r}; valid: ['hash', 'minilm']")
    return TextEncoder(max_tokens=max_tokens, token_encoder=HashTokenEncoder() if kind == "hash" else None)


def _finish(frames: np.ndarray, name: str, fps: int, prompt: str, out_dir: Path | None) -> Video:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_mp4(out_dir / name, frames, fps)
    return Video(name, frames, float(fps), prompt)


def generate_videos(transformer: str | os.PathLike[str], vae_path: str | os.PathLike[str], preset_name: str,
                    prompts: Sequence[str], num_frames: int, seed: int, out_dir: Path | None = None,
                    dtype: str = "auto", text: str = "minilm", latents_out: list[np.ndarray] | None = None
                    ) -> list[Video]:
    """Generate one clip per prompt with the causal student (seed ``seed + i``); also write MP4s to ``out_dir``.

    ``latents_out``: if given, each clip's normalised latents ``[C, F, h, w]`` (float32) are appended
    to it, so that :func:`decode_latents` can decode them again with another VAE decoder.
    """
    import torch

    from streamgen.config import get_preset
    from streamgen.generate import generate_latents
    from streamgen.model.weights import load_transformer, load_vae
    from streamgen.precision import resolve_dtype
    from streamgen.video_io import frames_to_uint8
    from trainer.common.latents import LatentStats

    preset = get_preset(preset_name)
    model = load_transformer(transformer, expected=preset.model).eval()
    model = model.to(resolve_dtype(dtype).dtype)
    vae = load_vae(vae_path, expected=preset.vae).eval()
    stats = LatentStats.from_checkpoint(vae_path)
    encoder = text_encoder(preset.model.text_max_tokens, text)
    num_latent = math.ceil(num_frames / preset.vae.temporal_factor)
    videos = []
    for i, prompt in enumerate(prompts):
        emb, _ = encoder.encode([prompt])
        generator = torch.Generator().manual_seed(seed + i)
        chunks = []
        pieces = []
        with torch.no_grad():
            context = model.encode_text(emb)
            decoder = vae.init_decoder_state(batch_size=1)
            for latents in generate_latents(model, context, preset, num_latent, generator):
                video, decoder = vae.decode_chunk(stats.denormalize(latents.float()), decoder)
                chunks.append(frames_to_uint8(video[0]))
                pieces.append(latents[0].float())
        if latents_out is not None:
            latents_out.append(torch.cat(pieces, dim=1).numpy())
        frames = np.concatenate(chunks)[:num_frames]
        videos.append(_finish(frames, f"generated_{i:04d}.mp4", preset.video.fps, prompt, out_dir))
    return videos


def generate_teacher_videos(teacher: str | os.PathLike[str], vae_path: str | os.PathLike[str], preset_name: str,
                            prompts: Sequence[str], num_frames: int, seed: int, out_dir: Path | None = None,
                            num_steps: int = 50, cfg_scale: float = 4.0, shift: float = 5.0, text: str = "minilm",
                            latents_out: list[np.ndarray] | None = None) -> list[Video]:
    """Sample one clip per prompt with the bidirectional teacher (:func:`trainer.sampling.sample_teacher`).

    ``latents_out``: as in :func:`generate_videos` (decoded again by :func:`decode_latents`).

    The teacher sees its whole horizon at once, so ``num_frames`` should not exceed what it was
    trained on (``ceil(num_frames / temporal_factor)`` latent frames).
    """
    import torch

    from streamgen.config import get_preset
    from streamgen.model.weights import load_transformer, load_vae
    from streamgen.video_io import frames_to_uint8
    from trainer.common.latents import LatentStats
    from trainer.sampling import sample_teacher

    preset = get_preset(preset_name)
    model = load_transformer(teacher, expected=preset.model).eval()
    vae = load_vae(vae_path, expected=preset.vae).eval()
    stats = LatentStats.from_checkpoint(vae_path)
    encoder = text_encoder(preset.model.text_max_tokens, text)
    shape = (1, preset.model.latent_channels, math.ceil(num_frames / preset.vae.temporal_factor),
             preset.latent_height, preset.latent_width)
    videos = []
    for i, prompt in enumerate(prompts):
        cond, _ = encoder.encode([prompt])
        uncond, _ = encoder.encode([""])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
        z = sample_teacher(model, noise, cond, uncond, num_steps=num_steps, cfg_scale=cfg_scale, shift=shift)
        if latents_out is not None:
            latents_out.append(z[0].float().numpy())
        with torch.no_grad():
            video = vae.decode(stats.denormalize(z))  # [1, 3, N, H, W]
        frames = frames_to_uint8(video[0])[:num_frames]
        videos.append(_finish(frames, f"teacher_{i:04d}.mp4", preset.video.fps, prompt, out_dir))
    return videos


def save_latents(directory: str | os.PathLike[str], latents: Sequence[np.ndarray], meta: dict[str, Any]) -> None:
    """Store generated clips' normalised latents (``latents.npz``, float32) with what made them (``latents.json``).

    The latents do not depend on the VAE decoder, so a comparison under another decoder (same encoder,
    same latent space) decodes these instead of generating again: :func:`load_latents`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "latents.npz", latents=np.stack(latents).astype(np.float32))
    (out / "latents.json").write_text(json.dumps(meta, indent=1))


def load_latents(directory: str | os.PathLike[str], meta: dict[str, Any]) -> np.ndarray | None:
    """Latents stored by :func:`save_latents` if they were made with exactly ``meta``; else ``None``."""
    path = Path(directory)
    if not (path / "latents.npz").is_file() or not (path / "latents.json").is_file():
        return None
    if json.loads((path / "latents.json").read_text()) != meta:
        return None
    return np.load(path / "latents.npz")["latents"]


def decode_latents(latents: np.ndarray, vae_path: str | os.PathLike[str], preset_name: str,
                   prompts: Sequence[str], num_frames: int, model: str) -> list[Video]:
    """Decode stored latents ``[B, C, F, h, w]`` as generation decoded them.

    ``model="student"``: chunk by chunk through the streaming decoder (:func:`generate_videos`);
    ``"teacher"``: the whole horizon at once (:func:`generate_teacher_videos`).
    """
    import torch

    from streamgen.config import get_preset
    from streamgen.generate import plan_chunks
    from streamgen.model.weights import load_vae
    from streamgen.video_io import frames_to_uint8
    from trainer.common.latents import LatentStats

    if model not in ("student", "teacher"):
        raise ValueError(f"model must be 'student' or 'teacher', got {model!r}")
    preset = get_preset(preset_name)
    vae = load_vae(vae_path, expected=preset.vae).eval()
    stats = LatentStats.from_checkpoint(vae_path)
    videos = []
    for z, prompt in zip(latents, prompts, strict=True):
        pieces = [(0, z.shape[1])] if model == "teacher" else \
            [(c.start, c.num_frames) for c in plan_chunks(z.shape[1], preset.sampler.chunk_frames)]
        decoder = vae.init_decoder_state(batch_size=1)
        chunks = []
        with torch.no_grad():
            for start, count in pieces:
                piece = torch.from_numpy(np.ascontiguousarray(z[None, :, start:start + count]))
                video, decoder = vae.decode_chunk(stats.denormalize(piece), decoder)
                chunks.append(frames_to_uint8(video[0]))
        name = "teacher" if model == "teacher" else "generated"
        videos.append(Video(f"{name}_{len(videos):04d}.mp4", np.concatenate(chunks)[:num_frames],
                            float(preset.video.fps), prompt))
    return videos


def latent_space_id(vae_path: str | os.PathLike[str]) -> str:
    """SHA-256 of a VAE's config, encoder weights and latent mean/std: equal exactly when two share a latent space.

    A decoder fine-tune (``trainer.vae`` with ``train_encoder: false``) keeps it; stored latents
    (:func:`save_latents`) are decoded by another VAE only when its id is theirs.
    """
    import hashlib

    from streamgen.config import to_dict
    from streamgen.model.weights import load_vae

    vae = load_vae(vae_path)
    digest = hashlib.sha256(json.dumps(to_dict(vae.cfg), sort_keys=True).encode())
    for p in vae.encoder_parameters():
        digest.update(p.detach().float().contiguous().numpy().tobytes())
    for b in (vae.latent_mean, vae.latent_std):
        digest.update(b.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
