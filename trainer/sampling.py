"""The teacher's many-step sampler: Euler over the shifted flow-matching schedule with classifier-free guidance.

Imported by the teacher trainer (sample strips), the evaluation suite and the ODE-init stage
(which records the trajectory at the student's levels via ``return_trajectory``). Follows the
conventions of :mod:`streamgen.model.sampler`: ``x_t = (1 - s) x_0 + s e``, the model predicts
``v = e - x_0``, and timesteps are warped by ``shift`` (Wan / Self-Forcing use 5.0).
Guidance: ``v = v_uncond + cfg_scale * (v_cond - v_uncond)`` (``cfg_scale = 1`` is no guidance;
Self-Forcing's ``cond + 3 (cond - uncond)`` is ``cfg_scale = 4``).

This module never trains, loads files or touches global random state: noise comes in as a tensor.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from streamgen.model.sampler import euler_step, shift_timesteps


def teacher_timesteps(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """``num_steps + 1`` decreasing timesteps from ``T`` to 0: ``linspace(T, 0)`` warped by ``shift``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(float(num_train_timesteps), 0.0, num_steps + 1)
    return [float(t) for t in shift_timesteps(base, shift, num_train_timesteps)]


@torch.no_grad()
def sample_teacher(model: nn.Module, noise: torch.Tensor, cond_emb: torch.Tensor, uncond_emb: torch.Tensor,
                   num_steps: int = 50, cfg_scale: float = 4.0, shift: float = 5.0, bf16: bool | None = None,
                   return_trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate the teacher's probability-flow ODE from ``noise`` (t = 1000) to a clean sample (t = 0).

    Args:
        model: a :class:`~streamgen.model.transformer.CausalWanTransformer` (full attention: no mask, no cache).
        noise: ``[B, C, F, h, w]`` standard normal, in the normalised latent space.
        cond_emb / uncond_emb: ``[B, L, text_dim]`` prompt embeddings (``uncond`` = the empty prompt's zeros).
        num_steps: Euler steps over :func:`teacher_timesteps`.
        cfg_scale: guidance scale; ``1.0`` skips the unconditional pass.
        bf16: run the model under bf16 autocast on its device (the sample and update stay fp32); ``None``
            (the default): where bf16 is fast, by the same detection as the trainer's ``precision: auto``
            (:func:`streamgen.precision.resolve_precision`): on a CPU without bf16 matrix units bf16
            autocast is ~30-100x slower than fp32.
        return_trajectory: also return ``x_t`` before every step (``num_steps`` tensors, the first is ``noise``).

    Returns:
        ``x_0`` ``[B, C, F, h, w]`` float32 (and the trajectory).
    """
    guided = cfg_scale != 1.0
    device = next(model.parameters()).device  # inputs follow the model; the result returns to noise's device
    if bf16 is None:
        from streamgen.precision import resolve_precision

        bf16 = resolve_precision("auto", device)[0] == "bf16"
    emb = (torch.cat([cond_emb, uncond_emb]) if guided else cond_emb).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        context = model.encode_text(emb)
    x = noise.float().to(device)
    trajectory: list[torch.Tensor] = []
    steps = teacher_timesteps(num_steps, shift)
    for t, t_next in zip(steps[:-1], steps[1:], strict=True):
        if return_trajectory:
            trajectory.append(x.clone())
        x_in = torch.cat([x, x]) if guided else x
        timesteps = torch.full((x_in.shape[0],), t, device=device)
        with autocast:
            v = model(x_in, timesteps, context).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = euler_step(x, v, t, t_next)
    x = x.to(noise.device)
    return (x, [step.to(noise.device) for step in trajectory]) if return_trajectory else x
