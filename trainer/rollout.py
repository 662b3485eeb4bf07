"""The student's self-rollout for training: the inference loop of :mod:`streamgen.generate`, with gradients.

Self-Forcing (Huang et al. 2025, arXiv 2506.08009, Algorithm 1) trains the causal student on
videos it generated itself, chunk by chunk, with the KV cache it uses at inference. This module
runs exactly that loop, through the same primitives as the offline generator and the engine
(:func:`~streamgen.generate.plan_chunks`, :func:`~streamgen.generate.draw_noise`,
:func:`~streamgen.generate.context_input`, :class:`~streamgen.cache.contiguous.ContiguousKVCache`
with its rolling window + sinks) and in the same noise-draw order, so a no-grad rollout that
exits at the last step *is* inference (``tests/trainer/test_rollout.py`` holds it to the engine).

Per chunk (Self-Forcing's stochastic gradient truncation, section 3.2):

* the few-step denoise runs up to a random **exit step** ``k`` (one index into the student's
  timesteps per rollout, shared by every chunk); steps ``< k`` run under ``no_grad``, the exit
  step's forward runs with gradient and its ``x_0`` prediction is the chunk's output;
* the **cache refresh** (the forward of the detached chunk at ``context_timestep`` whose keys/values
  are committed) runs under ``no_grad``, so a chunk's gradient never flows into earlier chunks;
* only chunks overlapping ``grad_span`` take gradient at all (Self-Forcing's "last 21 frames";
  Self-Forcing++'s window); the others are plain inference.

Teacher-/Diffusion-Forcing baselines replace what is written into the cache by ground truth
(:class:`ContextSource`). This module never computes a loss and never owns an optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import CacheConfig, Preset, SamplerConfig
from streamgen.generate import ChunkPlan, context_input, draw_noise, plan_chunks
from streamgen.model.sampler import add_noise, student_timesteps, x0_from_velocity
from streamgen.model.transformer import CausalWanTransformer, TextContext
from trainer.common.runtime import sample_generator

Generators = torch.Generator | Sequence[torch.Generator]


@dataclass(frozen=True)
class ContextSource:
    """What the cache refresh writes instead of the student's own chunk (Teacher / Diffusion Forcing).

    ``latents``: ``[B, C, N, h, w]`` ground-truth clip (clean for Teacher Forcing, or already noised
    per frame for Diffusion Forcing); ``timesteps``: ``[B, N]`` the level each frame is presented at
    (zeros for clean context).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class RolloutResult:
    """``latents``: ``[B, C, N, h, w]`` chunk outputs (the exit step's ``x_0``), concatenated over frames.

    Frames of chunks that took gradient carry a graph through *only* their exit forward;
    ``grad_chunks`` lists those chunks; ``chunk_outputs`` holds each chunk's ``[B, C, F_chunk, h, w]``.
    """

    latents: torch.Tensor
    chunk_outputs: list[torch.Tensor]
    chunks: list[ChunkPlan]
    grad_chunks: list[ChunkPlan]
    exit_step: int


def sample_exit_step(seed: int, step: int, num_steps: int, turn: int = 0) -> int:
    """The exit step of rollout ``turn`` of training step ``step``: uniform over ``[0, num_steps)``.

    Keyed on ``(seed, step, turn)`` only, never on the rank, so every rank draws the same one
    (Self-Forcing broadcasts it from rank 0; a shared key needs no communication) and a resumed
    run replays it.
    """
    g = sample_generator(seed, step, turn, stream=11)
    return int(torch.randint(num_steps, (1,), generator=g).item())


def first_evicting_chunk(cache: CacheConfig, chunk_frames: int) -> int | None:
    """First frame of the first chunk whose context has lost a frame to the rolling cache (``None``: never).

    A chunk ``[s, s + chunk)`` sees the sinks and the frames ``>= s + chunk - recent``
    (:class:`~streamgen.cache.contiguous.ContiguousKVCache`), so it misses one once
    ``s + chunk - recent > sink``, i.e. ``s > window - chunk``; chunks start at multiples of the chunk.
    For the ``default`` preset (window 12 incl. 3 sinks, chunk 3) that is frame 12.
    """
    if cache.window_frames is None:
        return None
    return chunk_frames * ((cache.window_frames - chunk_frames) // chunk_frames + 1)


def last_frames_span(num_frames: int, grad_frames: int | None) -> tuple[int, int]:
    """``[num_frames - grad_frames, num_frames)``, or every frame for ``None``."""
    if grad_frames is None:
        return (0, num_frames)
    if grad_frames <= 0:
        raise ValueError(f"grad_frames must be > 0 or None, got {grad_frames}")
    return (max(0, num_frames - grad_frames), num_frames)


def _draw(shape: tuple[int, ...], generators: Generators, dtype: torch.dtype) -> torch.Tensor:
    """Noise ``shape = [B, ...]``: one generator draws the whole batch (as :func:`generate_latents`),
    a sequence of ``B`` generators draws one row each (as the engine's per-session generators)."""
    if isinstance(generators, torch.Generator):
        return draw_noise(shape, generators, dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return torch.cat([draw_noise((1, *shape[1:]), g, dtype) for g in generators])


def _context_input(x0: torch.Tensor, cfg: SamplerConfig, generators: Generators) -> torch.Tensor:
    """:func:`streamgen.generate.context_input` with per-row generators (same draw, same formula)."""
    if isinstance(generators, torch.Generator):
        return context_input(x0, cfg, generators)
    if cfg.context_timestep <= 0:
        return x0
    noise = _draw(tuple(x0.shape), generators, x0.dtype)
    return add_noise(x0, noise, cfg.context_timestep, cfg.num_train_timesteps)


def rollout(
    model: CausalWanTransformer,
    context: TextContext,
    preset: Preset,
    num_frames: int,
    generators: Generators,
    *,
    exit_step: int | None = None,
    grad_span: tuple[int, int] | None = None,
    context_source: ContextSource | None = None,
    refresh_last: bool = False,
) -> RolloutResult:
    """Generate ``num_frames`` latent frames chunk by chunk with the rolling KV cache.

    Args:
        model: the causal student (any dtype; runs under the caller's autocast).
        context: its text context for the ``B`` prompts (``model.encode_text``; may carry a graph).
        preset: sizes, sampler (timesteps, ``chunk_frames``, ``context_timestep``) and cache policy.
        num_frames: rollout length ``N`` in latent frames.
        generators: one generator for the batch or one per row (see :func:`_draw`).
        exit_step: index into the student's timesteps at which every chunk stops; ``None`` = the
            last step (plain inference).
        grad_span: frames ``[lo, hi)`` whose chunks take gradient at their exit step; ``None`` = all.
            Nothing takes gradient when grad mode is off (``torch.no_grad``).
        context_source: ground truth to write into the cache instead of the student's chunks.
        refresh_last: also refresh the cache after the final chunk (inference does; a rollout whose
            cache is discarded need not).

    Returns:
        :class:`RolloutResult` with ``latents [B, C, N, h, w]``.
    """
    cfg = preset.sampler
    timesteps = student_timesteps(cfg)
    exit_step = len(timesteps) - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < len(timesteps):
        raise ValueError(f"exit_step must lie in [0, {len(timesteps)}), got {exit_step}")
    lo, hi = (0, num_frames) if grad_span is None else grad_span
    if context_source is not None and context_source.latents.shape[2] < num_frames:
        raise ValueError(f"context source has {context_source.latents.shape[2]} frames, rollout needs {num_frames}")
    batch = context.batch_size
    dtype = model.proj_out.weight.dtype
    cache = ContiguousKVCache(model.cfg.num_layers, preset.tokens_per_frame, preset.cache, model.backend)
    grad_on = torch.is_grad_enabled()
    chunks = plan_chunks(num_frames, cfg.chunk_frames)
    outputs: list[torch.Tensor] = []
    grad_chunks: list[ChunkPlan] = []
    for n, chunk in enumerate(chunks):
        shape = (batch, model.cfg.latent_channels, chunk.num_frames, preset.latent_height, preset.latent_width)
        with_grad = grad_on and chunk.start < hi and chunk.start + chunk.num_frames > lo
        x = _draw(shape, generators, dtype)
        x0 = x
        for i in range(exit_step + 1):
            t = timesteps[i]
            with torch.set_grad_enabled(with_grad and i == exit_step):
                view = cache.view(chunk.start, chunk.num_frames)  # attends; never committed
                v = model(x, torch.full((batch, chunk.num_frames), t), context, frame_offsets=chunk.start,
                          kv_cache=view)
                x0 = x0_from_velocity(x, v, t, cfg.num_train_timesteps)
            if i < exit_step:
                x = add_noise(x0, _draw(shape, generators, dtype), timesteps[i + 1], cfg.num_train_timesteps)
        outputs.append(x0)
        if with_grad:
            grad_chunks.append(chunk)
        if n + 1 < len(chunks) or refresh_last:
            with torch.no_grad():
                end = chunk.start + chunk.num_frames
                if context_source is None:
                    inp = _context_input(x0.detach(), cfg, generators)
                    ts = torch.full((batch, chunk.num_frames), cfg.context_timestep)
                else:
                    inp = context_source.latents[:, :, chunk.start:end].to(dtype)
                    ts = context_source.timesteps[:, chunk.start:end].float()
                view = cache.view(chunk.start, chunk.num_frames)
                model(inp, ts, context, frame_offsets=chunk.start, kv_cache=view)
                cache.commit(view)
    return RolloutResult(torch.cat(outputs, dim=2), outputs, chunks, grad_chunks, exit_step)
