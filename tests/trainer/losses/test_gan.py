"""DMD2 GAN head: losses, and gradient flow through critic features on the ``test`` preset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamgen.config import Preset
from streamgen.model.transformer import CausalWanTransformer
from trainer.losses.gan import (
    GANHead,
    critic_features,
    critic_forward_with_features,
    gan_discriminator_loss,
    gan_generator_loss,
)


def _inputs(preset: Preset, model: CausalWanTransformer, batch: int = 2) -> tuple[torch.Tensor, ...]:
    cfg = preset.model
    x_t = torch.randn(batch, cfg.latent_channels, 2, 4, 4, requires_grad=True)
    timesteps = torch.tensor([500.0, 800.0][:batch])
    text = torch.randn(batch, 5, cfg.text_dim)
    return x_t, timesteps, text


def test_gan_losses_exact() -> None:
    zero = torch.zeros(4)
    assert float(gan_generator_loss(zero)) == pytest.approx(math.log(2.0))
    assert float(gan_discriminator_loss(zero, zero)) == pytest.approx(2 * math.log(2.0))
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    expected = (F.softplus(-real) + F.softplus(fake)).mean()
    torch.testing.assert_close(gan_discriminator_loss(real, fake), expected)
    # Non-saturating: the generator still gets a strong gradient when D is confident it is fake.
    logits = torch.tensor([-8.0], requires_grad=True)
    gan_generator_loss(logits).backward()
    assert logits.grad is not None and float(logits.grad) < -0.99


def test_gan_head_shapes_and_validation() -> None:
    head = GANHead(dim=32, hidden=16)
    assert head(torch.randn(3, 7, 32)).shape == (3,)
    assert head(torch.randn(3, 7, 32, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(3, 32))


def test_critic_features_shapes_hook_removal_and_gradient(test_preset: Preset) -> None:
    torch.manual_seed(0)
    model = CausalWanTransformer(test_preset.model).eval()
    x_t, timesteps, text = _inputs(test_preset, model)
    context = model.encode_text(text)
    velocity, feats = critic_forward_with_features(model, x_t, timesteps, context, layer=0)
    num_tokens = 2 * (4 // test_preset.model.patch_size[1]) * (4 // test_preset.model.patch_size[2])
    assert feats.shape == (2, num_tokens, test_preset.model.dim)
    torch.testing.assert_close(velocity, model(x_t, timesteps, context))
    assert not model.blocks[0]._forward_hooks  # the hook is gone after the call
    last = critic_features(model, x_t, timesteps, context)  # layer -1
    assert last.shape == feats.shape and not torch.allclose(last, feats)

    head = GANHead(test_preset.model.dim, hidden=16)
    loss = gan_generator_loss(head(last))
    loss.backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0  # reaches the generator's sample
    block_grads = [p.grad for p in model.blocks[-1].parameters() if p.grad is not None]
    assert block_grads and any(g.abs().sum() > 0 for g in block_grads)  # and the critic


def test_critic_features_discriminator_step_trains_head_and_critic(test_preset: Preset) -> None:
    torch.manual_seed(0)
    model = CausalWanTransformer(test_preset.model)
    x_t, timesteps, text = _inputs(test_preset, model)
    context = model.encode_text(text)
    head = GANHead(test_preset.model.dim, hidden=16)
    real = critic_features(model, x_t.detach(), timesteps, context, layer=1)
    fake = critic_features(model, x_t.detach() + 1.0, timesteps, context, layer=1)
    gan_discriminator_loss(head(real), head(fake)).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert model.blocks[1].ffn.net[2].weight.grad is not None


def test_critic_features_rejects_bad_layer(test_preset: Preset) -> None:
    model = CausalWanTransformer(test_preset.model)
    x_t, timesteps, text = _inputs(test_preset, model)
    with pytest.raises(ValueError, match="layer"):
        critic_features(model, x_t, timesteps, model.encode_text(text), layer=5)
