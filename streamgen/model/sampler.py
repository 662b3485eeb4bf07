"""Flow-matching step math (pure functions) for the few-step causal student.

Conventions (Wan / Self-Forcing): a timestep ``t`` in ``[0, 1000]`` maps to a noise level
``s = t / 1000``; ``x_t = (1 - s) x_0 + s e`` and the model predicts velocity
``v = e - x_0``, so ``x_0 = x_t - s v``. Sampling timesteps are warped by the shift
``t' = T * k s / (1 + (k - 1) s)`` with ``k = 5``, which turns the student's
``[1000, 750, 500, 250]`` into about ``[1000, 937.5, 833.3, 625]``.
Nothing here touches a model, cache or random state it was not handed.
"""

from __future__ import annotations

import torch

from streamgen.config import SamplerConfig


def shift_timesteps(t: torch.Tensor | float, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Warp timesteps: ``sigma' = k sigma / (1 + (k - 1) sigma)`` with ``sigma = t / T``."""
    sigma = torch.as_tensor(t, dtype=torch.float64) / num_train_timesteps
    return (shift * sigma / (1 + (shift - 1) * sigma) * num_train_timesteps).float()


def student_timesteps(cfg: SamplerConfig) -> list[float]:
    """The warped denoising timesteps, e.g. ``[1000, 937.5, 833.33, 625]`` for shift 5."""
    warped = shift_timesteps(torch.tensor(cfg.denoising_steps), cfg.shift, cfg.num_train_timesteps)
    return [float(t) for t in warped]


def noise_level(t: torch.Tensor | float, num_train_timesteps: int = 1000) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32) / num_train_timesteps


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a level of shape ``[]``, ``[B]`` or ``[B, F]`` against ``[B, C, F, H, W]``."""
    if s.ndim == 0:
        return s
    if s.ndim == 1:
        return s.view(-1, 1, 1, 1, 1)
    return s[:, None, :, None, None]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float,
              num_train_timesteps: int = 1000) -> torch.Tensor:
    """``x_t = (1 - s) x_0 + s e`` (rectified flow forward process)."""
    s = _expand(noise_level(t, num_train_timesteps).to(x0.device), x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor | float,
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """``x_0 = x_t - s v``."""
    s = _expand(noise_level(t, num_train_timesteps).to(x_t.device), x_t)
    return (x_t.float() - s * velocity.float()).to(x_t.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target ``v = e - x_0``."""
    return noise - x0


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, t: float, t_next: float,
               num_train_timesteps: int = 1000) -> torch.Tensor:
    """Deterministic ODE step ``x_{t'} = x_t + (s' - s) v`` (the teacher's many-step sampler)."""
    ds = (t_next - t) / num_train_timesteps
    return (x_t.float() + ds * velocity.float()).to(x_t.dtype)
