"""Chunked autoregressive generation with a KV cache (the student's inference loop).

One chunk = ``len(denoising_steps)`` denoising forwards (predict ``x_0``, re-noise to the
next level with fresh noise) + one forward of the clean result at ``context_timestep``
whose keys/values are committed to the cache. The step between forwards is
:class:`~streamgen.engine.step.ChunkStep`, shared with the trainer's rollout and (batched)
the engine, so all of them draw the same noise in the same order from a session's own
``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import Preset
from streamgen.engine.step import ChunkStep
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


def cache_forward(model: CausalWanTransformer, cache: ContiguousKVCache, context: TextContext, chunk: ChunkPlan,
                  x: torch.Tensor, t: float | torch.Tensor, *, commit: bool = False) -> torch.Tensor:
    """One forward of ``chunk`` (``x = [B, C, F, h, w]``) against the cache; ``commit`` stores its keys/values.

    ``t`` is one level for every frame or a ``[B, F]`` tensor of per-frame levels.
    """
    view = cache.view(chunk.start, chunk.num_frames)
    ts = t if isinstance(t, torch.Tensor) else torch.full((context.batch_size, chunk.num_frames), t, device=x.device)
    out = model(x, ts, context, frame_offsets=chunk.start, kv_cache=view)
    if commit:
        cache.commit(view)
    return out


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
    step = ChunkStep(preset.sampler, model.proj_out.weight.dtype, model.proj_out.weight.device)
    batch = context.batch_size
    cache = ContiguousKVCache(model.cfg.num_layers, preset.tokens_per_frame, preset.cache, model.backend)
    for chunk in plan_chunks(num_latent_frames, preset.sampler.chunk_frames):
        shape = (batch, model.cfg.latent_channels, chunk.num_frames, preset.latent_height, preset.latent_width)

        def velocity(x_t: torch.Tensor, t: float, _chunk: ChunkPlan = chunk) -> torch.Tensor:
            return cache_forward(model, cache, context, _chunk, x_t, t)

        x0 = step.sample(velocity, shape, generator)
        cache_forward(model, cache, context, chunk, step.commit_input(x0, generator), step.commit_timestep,
                      commit=True)
        if progress is not None:
            progress(chunk.num_frames)
        yield x0
