"""Chunked autoregressive generation with a KV cache (the student's inference loop).

One chunk = ``len(denoising_steps)`` denoising forwards (predict ``x_0``, re-noise to the
next level with fresh noise) + one forward of the clean result at ``context_timestep``
whose keys/values are committed to the cache. The same :func:`denoise_chunk` is used by
offline generation here, by the trainer's rollout and (batched) by the engine, so all of
them draw the same noise in the same order from a session's own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import Preset, SamplerConfig
from streamgen.model.sampler import add_noise, student_timesteps, x0_from_velocity
from streamgen.model.transformer import CausalWanTransformer, TextContext


@dataclass(frozen=True)
class ChunkPlan:
    """Frames ``[start, start + num_frames)`` of a stream."""

    start: int
    num_frames: int


def plan_chunks(num_latent_frames: int, chunk_frames: int, start: int = 0) -> list[ChunkPlan]:
    """Split ``num_latent_frames`` into chunks of ``chunk_frames`` (the last may be shorter)."""
    if num_latent_frames <= 0:
        raise ValueError(f"num_latent_frames must be > 0, got {num_latent_frames}")
    return [ChunkPlan(start + s, min(chunk_frames, num_latent_frames - s))
            for s in range(0, num_latent_frames, chunk_frames)]


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise from a session's generator (CPU draw, so results match across devices)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


def denoise_chunk(velocity: Callable[[torch.Tensor, float], torch.Tensor], shape: tuple[int, ...],
                  cfg: SamplerConfig, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Few-step sampling of one chunk: returns clean ``x_0`` of ``shape = [B, C, F, H, W]``.

    ``velocity(x_t, t)`` runs the model on the chunk against the cache (not committing).
    Noise order: the chunk's initial noise, then one fresh draw before each later step.
    """
    timesteps = student_timesteps(cfg)
    x = draw_noise(shape, generator, dtype)
    x0 = x
    for i, t in enumerate(timesteps):
        x0 = x0_from_velocity(x, velocity(x, t), t, cfg.num_train_timesteps)
        if i + 1 < len(timesteps):
            x = add_noise(x0, draw_noise(shape, generator, dtype), timesteps[i + 1], cfg.num_train_timesteps)
    return x0


def context_input(x0: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator) -> torch.Tensor:
    """What the cache-writing forward sees: ``x_0``, re-noised to ``context_timestep`` if that is > 0."""
    if cfg.context_timestep <= 0:
        return x0
    return add_noise(x0, draw_noise(tuple(x0.shape), generator, x0.dtype), cfg.context_timestep,
                     cfg.num_train_timesteps)


@torch.no_grad()
def generate_latents(
    model: CausalWanTransformer,
    context: TextContext,
    preset: Preset,
    num_latent_frames: int,
    generator: torch.Generator,
    *,
    progress: Callable[[int], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield clean latent chunks ``[B, C, F_chunk, h, w]`` of a new stream, chunk by chunk."""
    cfg = preset.sampler
    batch = context.batch_size
    dtype = model.proj_out.weight.dtype
    cache = ContiguousKVCache(model.cfg.num_layers, preset.tokens_per_frame, preset.cache, model.backend)
    for chunk in plan_chunks(num_latent_frames, cfg.chunk_frames):
        shape = (batch, model.cfg.latent_channels, chunk.num_frames, preset.latent_height, preset.latent_width)

        def velocity(x_t: torch.Tensor, t: float, _chunk: ChunkPlan = chunk) -> torch.Tensor:
            view = cache.view(_chunk.start, _chunk.num_frames)
            ts = torch.full((batch, _chunk.num_frames), t)
            return model(x_t, ts, context, frame_offsets=_chunk.start, kv_cache=view)

        x0 = denoise_chunk(velocity, shape, cfg, generator, dtype)
        view = cache.view(chunk.start, chunk.num_frames)
        ts = torch.full((batch, chunk.num_frames), cfg.context_timestep)
        model(context_input(x0, cfg, generator), ts, context, frame_offsets=chunk.start, kv_cache=view)
        cache.commit(view)
        if progress is not None:
            progress(chunk.num_frames)
        yield x0
