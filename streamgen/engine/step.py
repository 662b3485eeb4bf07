"""One chunk's few-step sampler, split at its forwards: the step inference and training both call.

A chunk is ``len(denoising_steps)`` denoising forwards (predict ``x_0``, re-noise it to the next
level with fresh noise) and one cache-writing forward of the clean result at
``context_timestep``. :class:`ChunkStep` holds everything between those forwards: the noise
draws, the ``x_0`` prediction and the re-noise. The offline generator and the trainer's rollout
run it through :meth:`ChunkStep.sample`; the engine's runner, which batches sessions that sit at
different steps, calls :meth:`ChunkStep.initial_noise`, :meth:`ChunkStep.advance` and
:meth:`ChunkStep.commit_input` per session between its batched forwards. Because all three
draw from a session's own ``torch.Generator`` through these methods, "rollout exactly as
inference" and "batched equals alone" hold by construction, not by keeping three loops equal.

Noise order per chunk (pinned by the equivalence tests and the committed-model tests): the
chunk's initial noise, one draw before each later step up to the exit step, then (if
``context_timestep > 0``) one draw for the cache-writing input.

This module never runs the model or touches a cache: its callers own both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from streamgen.config import SamplerConfig
from streamgen.model.sampler import add_noise, student_timesteps, x0_from_velocity

# One generator draws the whole batch (the offline generator, a trainer batch), or one
# generator per row draws that row (the engine's sessions; a trainer run that mirrors them).
Generators = torch.Generator | Sequence[torch.Generator]


def draw_noise(shape: tuple[int, ...], generators: Generators, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise ``shape = [B, ...]``, drawn in fp32 by CPU generators and then moved to
    ``device`` in ``dtype``: a seed gives the same noise, hence the same video up to the device's
    arithmetic, on every device (CUDA generators draw other numbers than CPU ones).

    A sequence of ``B`` generators draws one row each, so a row's values do not depend on the
    rows beside it.
    """
    if isinstance(generators, torch.Generator):
        noise = torch.randn(shape, generator=generators, dtype=torch.float32)
    else:
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype, non_blocking=True)


@dataclass(frozen=True)
class ChunkStep:
    """The sampler of one chunk between its forwards; ``dtype`` and ``device`` are the model's (noise is
    drawn on the CPU, see :func:`draw_noise`, and moved there)."""

    sampler: SamplerConfig
    dtype: torch.dtype
    device: torch.device | str = "cpu"
    timesteps: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(student_timesteps(self.sampler)))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def commit_timestep(self) -> float:
        """The level the cache-writing forward is told its input sits at."""
        return self.sampler.context_timestep

    def check_exit_step(self, exit_step: int | None) -> int:
        """``exit_step`` (``None`` = the last step, i.e. inference), checked to be a step index."""
        exit_step = self.num_steps - 1 if exit_step is None else exit_step
        if not 0 <= exit_step < self.num_steps:
            raise ValueError(f"exit_step must lie in [0, {self.num_steps}), got {exit_step}")
        return exit_step

    def initial_noise(self, shape: tuple[int, ...], generators: Generators) -> torch.Tensor:
        """The chunk's input to step 0, ``shape = [B, C, F, h, w]``."""
        return draw_noise(shape, generators, self.dtype, self.device)

    def advance(self, x: torch.Tensor, velocity: torch.Tensor, step: int, generators: Generators,
                exit_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After step ``step``'s forward: its ``x_0`` prediction, and the next step's input.

        The next input is ``x_0`` re-noised with a fresh draw to the next level, or ``None`` once
        ``step`` is the exit step (nothing is drawn then).
        """
        t = self.timesteps[step]
        x0 = x0_from_velocity(x, velocity, t, self.sampler.num_train_timesteps)
        if step >= self.check_exit_step(exit_step):
            return x0, None
        noise = draw_noise(tuple(x0.shape), generators, self.dtype, x0.device)
        return x0, add_noise(x0, noise, self.timesteps[step + 1], self.sampler.num_train_timesteps)

    def commit_input(self, x0: torch.Tensor, generators: Generators) -> torch.Tensor:
        """What the cache-writing forward sees: ``x_0``, re-noised to ``context_timestep`` if that is > 0."""
        if self.sampler.context_timestep <= 0:
            return x0
        noise = draw_noise(tuple(x0.shape), generators, x0.dtype, x0.device)
        return add_noise(x0, noise, self.sampler.context_timestep, self.sampler.num_train_timesteps)

    def sample(self, velocity: Callable[[torch.Tensor, float], torch.Tensor], shape: tuple[int, ...],
               generators: Generators, *, exit_step: int | None = None, grad_at_exit: bool = False
               ) -> torch.Tensor:
        """Denoise one chunk up to ``exit_step``: returns that step's ``x_0``, ``shape = [B, C, F, h, w]``.

        ``velocity(x_t, t)`` runs the model on the chunk against the cache without committing.
        Steps before the exit step run without gradient; the exit step's forward takes gradient
        iff ``grad_at_exit`` (Self-Forcing's stochastic gradient truncation, arXiv 2506.08009 s3.2).
        """
        exit_step = self.check_exit_step(exit_step)
        x: torch.Tensor | None = self.initial_noise(shape, generators)
        x0 = x
        for i in range(exit_step + 1):
            with torch.set_grad_enabled(grad_at_exit and i == exit_step):
                x0, x = self.advance(x, velocity(x, self.timesteps[i]), i, generators,  # type: ignore[arg-type]
                                     exit_step)
        return x0  # type: ignore[return-value]
