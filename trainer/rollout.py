"""The student's self-rollout for training: the inference loop of :mod:`streamgen.generate`, with gradients.

Self-Forcing (Huang et al. 2025, arXiv 2506.08009, Algorithm 1) trains the causal student on
videos it generated itself, chunk by chunk, with the KV cache it uses at inference. This module
runs exactly that loop: the chunk step is :class:`~streamgen.engine.step.ChunkStep`, the one the
offline generator and the engine call, over :func:`~streamgen.generate.plan_chunks` and
:class:`~streamgen.cache.contiguous.ContiguousKVCache` with its rolling window + sinks, so a
no-grad rollout that exits at the last step *is* inference by construction
(``tests/trainer/test_rollout.py`` still holds it to the engine).

Per chunk (Self-Forcing's stochastic gradient truncation, section 3.2):

* the few-step denoise runs up to a random **exit step** ``k`` (one index into the student's
  timesteps per rollout, shared by every chunk); steps ``< k`` run under ``no_grad``, the exit
  step's forward runs with gradient and its ``x_0`` prediction is the chunk's output;
* the **cache refresh** (the forward of the detached chunk at ``context_timestep`` whose keys/values
  are committed) runs under ``no_grad``, so a chunk's gradient never flows into earlier chunks;
* only chunks overlapping ``grad_span`` take gradient at all (Self-Forcing's "last 21 frames";
  Self-Forcing++'s window); the others are plain inference.

Teacher-/Diffusion-Forcing baselines replace what is written into the cache by ground truth
(:class:`ContextSource`). Everything runs on the model's device: noise is drawn on the CPU by the
generators and moved (:func:`~streamgen.engine.step.draw_noise`), the per-frame levels every forward
sees are made there, and a context source is moved there. This module never computes a loss and never
owns an optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import CacheConfig, Preset
from streamgen.engine.step import ChunkStep, Generators
from streamgen.generate import ChunkPlan, cache_forward, plan_chunks
from streamgen.model.transformer import CausalWanTransformer, TextContext
from trainer.common.runtime import sample_generator


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
        generators: one generator for the batch or one per row (see :func:`~streamgen.engine.step.draw_noise`).
        exit_step: index into the student's timesteps at which every chunk stops; ``None`` = the
            last step (plain inference).
        grad_span: frames ``[lo, hi)`` whose chunks take gradient at their exit step; ``None`` = all.
            Nothing takes gradient when grad mode is off (``torch.no_grad``).
        context_source: ground truth to write into the cache instead of the student's chunks (moved to
            the model's device chunk by chunk).
        refresh_last: also refresh the cache after the final chunk (inference does; a rollout whose
            cache is discarded need not).

    Returns:
        :class:`RolloutResult` with ``latents [B, C, N, h, w]``.
    """
    step = ChunkStep(preset.sampler, model.proj_out.weight.dtype, model.proj_out.weight.device)
    exit_step = step.check_exit_step(exit_step)
    lo, hi = (0, num_frames) if grad_span is None else grad_span
    if context_source is not None and context_source.latents.shape[2] < num_frames:
        raise ValueError(f"context source has {context_source.latents.shape[2]} frames, rollout needs {num_frames}")
    batch = context.batch_size
    cache = ContiguousKVCache(model.cfg.num_layers, preset.tokens_per_frame, preset.cache, model.backend)
    grad_on = torch.is_grad_enabled()
    chunks = plan_chunks(num_frames, preset.sampler.chunk_frames)
    outputs: list[torch.Tensor] = []
    grad_chunks: list[ChunkPlan] = []
    for n, chunk in enumerate(chunks):
        shape = (batch, model.cfg.latent_channels, chunk.num_frames, preset.latent_height, preset.latent_width)
        with_grad = grad_on and chunk.start < hi and chunk.start + chunk.num_frames > lo

        def velocity(x_t: torch.Tensor, t: float, _chunk: ChunkPlan = chunk) -> torch.Tensor:
            return cache_forward(model, cache, context, _chunk, x_t, t)  # attends; not committed

        x0 = step.sample(velocity, shape, generators, exit_step=exit_step, grad_at_exit=with_grad)
        outputs.append(x0)
        if with_grad:
            grad_chunks.append(chunk)
        if n + 1 < len(chunks) or refresh_last:
            with torch.no_grad():
                if context_source is None:
                    inp = step.commit_input(x0.detach(), generators)
                    ts: float | torch.Tensor = step.commit_timestep
                else:
                    end = chunk.start + chunk.num_frames
                    inp = context_source.latents[:, :, chunk.start:end].to(step.device, step.dtype)
                    ts = context_source.timesteps[:, chunk.start:end].to(step.device, torch.float32)
                cache_forward(model, cache, context, chunk, inp, ts, commit=True)
    return RolloutResult(torch.cat(outputs, dim=2), outputs, chunks, grad_chunks, exit_step)
