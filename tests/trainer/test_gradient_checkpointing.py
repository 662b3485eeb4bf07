"""run.gradient_checkpointing: the DiT blocks recomputed in backward give the same loss and gradients."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.checkpoint

from streamgen.config import get_preset
from streamgen.model.masks import block_causal_mask
from trainer import teacher as teacher_stage
from trainer import vae as vae_stage

from .conftest import final_weights, tiny_teacher_config, tiny_vae_config


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    v = model(x, t, model.encode_text(emb), attn_mask=mask)
    loss = (v.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_loss_and_gradients(tiny_model: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on CPU: the recomputation repeats the same ops in the same order, so the loss is bit-equal and the
    gradients agree to 1e-6 (only the order of the gradient accumulations may differ)."""
    preset = get_preset("test")
    plain = tiny_model(preset.model).train()
    checkpointed = copy.deepcopy(plain).set_gradient_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    num_frames = 2 * preset.sampler.chunk_frames
    x = torch.randn(2, preset.model.latent_channels, num_frames, preset.latent_height, preset.latent_width,
                    generator=g)
    t = torch.rand(2, num_frames, generator=g) * 1000
    emb = torch.randn(2, 5, preset.model.text_dim, generator=g)
    mask = block_causal_mask(num_frames, preset.tokens_per_frame, preset.sampler.chunk_frames,
                             preset.cache.window_frames, preset.cache.sink_frames)
    calls: list[int] = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    loss_a, grads_a = _loss_and_grads(plain, x, t, emb, mask)
    assert calls == []
    loss_b, grads_b = _loss_and_grads(checkpointed, x, t, emb, mask)
    assert len(calls) == preset.model.num_layers  # every block, once
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    with torch.no_grad():  # no graph, nothing to save: the blocks run plainly
        checkpointed(x, t, checkpointed.encode_text(emb), attn_mask=mask)
    assert len(calls) == preset.model.num_layers


def test_teacher_stage_with_run_gradient_checkpointing_trains_the_same(tmp_path: Path, tiny_vae_checkpoint: Path,
                                                                       tiny_latents: Path) -> None:
    """``run.gradient_checkpointing: true`` through a whole (tiny, fp32) teacher run: the same losses and
    weights after 3 AdamW steps, to float tolerance."""
    plain = tiny_teacher_config(tmp_path / "plain", tiny_vae_checkpoint, tiny_latents, max_steps=3, save_every=3)
    ckpt = tiny_teacher_config(tmp_path / "ckpt", tiny_vae_checkpoint, tiny_latents, max_steps=3, save_every=3,
                               gradient_checkpointing=True)
    a = teacher_stage.train(plain, export=False)
    b = teacher_stage.train(ckpt, export=False)
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-5, atol=1e-6)
    wa, wb = final_weights(plain.run.run_dir), final_weights(ckpt.run.run_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-5, msg=key)


def test_vae_stage_refuses_gradient_checkpointing(tmp_path: Path) -> None:
    cfg = tiny_vae_config(tmp_path, max_steps=1, save_every=1)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, gradient_checkpointing=True))
    with pytest.raises(ValueError, match="run.gradient_checkpointing applies to the DiT stages"):
        vae_stage.train(cfg)
