"""DMD2's GAN head on the critic's features (Yin et al. 2024, arXiv 2405.14867, section 4.3).

DMD2 adds a discriminator that shares the fake-score network (the critic): a small classifier
reads the critic's intermediate features of a noised sample and tells real (teacher data) from
fake (generator output). The critic and its head are trained with the discriminator loss, the
generator with the non-saturating generator loss, next to the DMD gradient. Here the head is a
per-token MLP over the hidden states after one transformer block, its token logits averaged
(a patch-GAN over latent tokens).

:func:`critic_features` reads those hidden states with a forward hook that it registers and
removes inside the call, so the model file stays untouched and gradients flow to the critic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.model.transformer import CausalWanTransformer, TextContext


class GANHead(nn.Module):
    """``[B, N, dim]`` token features -> ``[B]`` real/fake logits (per-token MLP, mean over tokens)."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(f"features must be [B, N, {self.norm.normalized_shape[0]}], got {tuple(features.shape)}")
        h = self.norm(features.to(self.fc1.weight.dtype))
        logits = self.fc2(F.silu(self.fc1(h)))  # [B, N, 1]
        return logits.squeeze(-1).mean(dim=1)  # [B]


def critic_forward_with_features(model: CausalWanTransformer, x_t: torch.Tensor, timesteps: torch.Tensor,
                                 context: TextContext, *, layer: int = -1,
                                 frame_offsets: int | torch.Tensor = 0,
                                 attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One critic forward returning both its velocity and the hidden states after block ``layer``.

    Use this when the same forward feeds the critic's flow loss and the GAN head (DMD2 shares them).

    Args:
        model: the critic (fake score), a :class:`CausalWanTransformer`.
        x_t: ``[B, C, F, H, W]`` noised latents.
        timesteps: ``[B]`` or ``[B, F]`` in ``[0, 1000]``.
        context: :meth:`CausalWanTransformer.encode_text` of the prompts.
        layer: block index, Python-style (``-1`` = last block).
        frame_offsets, attn_mask: passed to the model's forward.
    Returns:
        ``(velocity [B, C, F, H, W], features [B, N, dim])`` with ``N = F * tokens per frame``;
        both carry the graph.
    """
    num_layers = len(model.blocks)
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for a model with {num_layers} blocks")
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(output)

    handle = model.blocks[layer].register_forward_hook(keep)
    try:
        velocity = model(x_t, timesteps, context, frame_offsets=frame_offsets, attn_mask=attn_mask)
    finally:
        handle.remove()
    return velocity, captured[0]


def critic_features(model: CausalWanTransformer, x_t: torch.Tensor, timesteps: torch.Tensor, context: TextContext,
                    *, layer: int = -1, frame_offsets: int | torch.Tensor = 0,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states ``[B, N, dim]`` after block ``layer`` of the critic on ``x_t`` (with graph).

    The whole forward runs (the head after ``layer`` is cheap next to the blocks); see
    :func:`critic_forward_with_features` to reuse the velocity of the same forward.
    """
    return critic_forward_with_features(model, x_t, timesteps, context, layer=layer,
                                        frame_offsets=frame_offsets, attn_mask=attn_mask)[1]


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(softplus(-D(fake)))`` = ``-log sigmoid(D(fake))``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``mean(softplus(-D(real))) + mean(softplus(D(fake)))`` (logistic GAN).

    ``logits_fake`` must come from *detached* generator samples when this trains the critic.
    """
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()
