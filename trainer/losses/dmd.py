"""Distribution Matching Distillation (DMD, Yin et al. 2024, arXiv 2311.18828) as pure functions.

DMD trains a few-step generator ``G`` so that its output distribution ``p_fake`` matches the
teacher's ``p_real`` by descending the reverse KL. Its gradient (eq. 7) is the difference of two
scores evaluated on a re-noised generator sample ``x_t``::

    grad_theta KL = E_{z, t, e}[ -w_t (s_real(x_t, t) - s_fake(x_t, t)) dG/dtheta ]

With x_0-predicting denoisers (``s ~ (mu(x_t) - x_t) alpha_t / sigma_t^2``) the score difference is
proportional to ``fake_x0 - real_x0``, and eq. 8 sets ``w_t`` to ``1 / mean|x - real_x0|`` (the
per-sample L1 distance between the sample and the real denoiser's estimate, times constants
that cancel). Self-Forcing (arXiv 2506.08009) implements exactly this with
``real_x0`` from the teacher with CFG, ``fake_x0`` from a critic trained online by flow matching
on detached generator samples, score timesteps uniform, shifted by 5 and clamped to [20, 980],
and the surrogate loss ``0.5 * mse(x, (x - grad).detach())``.

Conventions are those of :mod:`streamgen.model.sampler`: ``x_t = (1 - s) x_0 + s e`` with
``s = t / 1000``, velocity ``v = e - x_0``. Shapes: latents ``[B, C, F, H, W]`` (any ``[B, ...]``
works; reductions are over all non-batch dims). This module never runs a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamgen.model.sampler import shift_timesteps, velocity_target


def sample_score_timesteps(batch: int, generator: torch.Generator, *, shift: float = 5.0, min_t: float = 20.0,
                           max_t: float = 980.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Timesteps at which the real and fake scores are compared, one per sample.

    ``u ~ U(0, 1)``, ``t = u * T``, warped by :func:`~streamgen.model.sampler.shift_timesteps`
    (``shift = 5`` puts most mass at high noise: the median is ``T * 5/6``), then clamped to
    ``[min_t, max_t]`` (DMD's ``[0.02 T, 0.98 T]``: near ``t = 0`` both denoisers return the sample
    itself and the normaliser of :func:`dmd_gradient` vanishes; near ``t = T`` both see pure noise).

    Returns:
        ``[batch]`` float32 timesteps in ``[min_t, max_t]``.
    """
    if not 0.0 <= min_t <= max_t <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_t <= max_t <= {num_train_timesteps}, got min_t={min_t}, max_t={max_t}")
    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=generator.device)
    t = shift_timesteps(u * num_train_timesteps, shift, num_train_timesteps)
    return t.clamp(min_t, max_t).float()


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (``scale = 1``: no guidance).

    Works on velocities or x_0 predictions alike (the combination is affine). Self-Forcing writes
    its real score as ``cond + 3.0 * (cond - uncond)``, which is ``scale = 4.0`` here.
    """
    return uncond + scale * (cond - uncond)


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """The DMD gradient on the generator sample, ``(fake_x0 - real_x0) / mean|x - real_x0|``.

    Args:
        x: ``[B, C, F, H, W]`` generator output (the clean sample that was re-noised to ``x_t``).
        real_x0: ``[B, C, F, H, W]`` the real (teacher, CFG) denoiser's x_0 estimate at ``x_t``.
        fake_x0: ``[B, C, F, H, W]`` the fake (critic) denoiser's x_0 estimate at the same ``x_t``.
        eps: floor of the normaliser, so a sample the teacher already reproduces exactly does not
            divide by zero.

    Returns:
        ``[B, C, F, H, W]`` float32, no graph. ``fake - real`` is eq. 7's score difference (up to the
        sign convention: ``x - grad`` moves towards ``p_real``); the per-sample normaliser
        ``mean|x - real_x0|`` over all non-batch dims is eq. 8's weight ``w_t``. Non-finite
        entries are zeroed (``torch.nan_to_num``), as Self-Forcing does.
    """
    x, real_x0, fake_x0 = x.detach().float(), real_x0.detach().float(), fake_x0.detach().float()
    dims = tuple(range(1, x.ndim))
    normaliser = (x - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(eps)  # [B, 1, 1, 1, 1]
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient w.r.t. ``x`` is the DMD gradient: ``0.5 * mse(x, (x - grad).detach())``.

    ``d/dx 0.5 * mean((x - (x - g))^2) = g / x.numel()``: backpropagating it hands ``grad`` (scaled by
    ``1 / numel``) to the generator without differentiating through either score network.
    The value itself is ``0.5 * mean(g^2)`` and means nothing as a quality measure.

    Args:
        x: ``[B, C, F, H, W]`` generator output, with graph.
        grad: ``[B, C, F, H, W]`` from :func:`dmd_gradient`.
    Returns:
        scalar float32.
    """
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad.float()).detach())


def critic_flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The fake score's (critic's) denoising loss: flow-matching MSE on detached generator samples.

    ``v_pred`` is the critic's velocity at ``x_t = (1 - s) x0 + s noise``; the target is
    ``noise - x0`` (:func:`~streamgen.model.sampler.velocity_target`). ``x0`` must be the *detached*
    generator sample: the critic tracks ``p_fake``, it never pushes the generator.

    Args:
        v_pred: ``[B, C, F, H, W]`` critic output.
        x0: ``[B, C, F, H, W]`` generator sample.
        noise: ``[B, C, F, H, W]`` the noise used to make ``x_t``.
    Returns:
        scalar float32.
    """
    target = velocity_target(x0.detach().float(), noise.float())
    return F.mse_loss(v_pred.float(), target)
