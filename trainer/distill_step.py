"""One distillation iteration's pieces: the scored window of each mode's rollout, the generator loss, the critic loss.

:mod:`trainer.distill_train` owns the optimizers and plugs the iteration into the shared loop; this module
turns a step index and global sample ids into tensors and losses (DMD, Yin et al. 2024, arXiv 2311.18828,
eq. 7-8, via :mod:`trainer.losses`). Every random draw is keyed on ``(seed, step, sample id)`` or on
``(seed, step, turn)`` (exit step, Self-Forcing++ window), never on the rank or on global RNG state,
so 1 and N processes draw the same numbers and a resumed run replays them. Those draws come from CPU
generators and are then moved to the run's device (:func:`~streamgen.engine.step.draw_noise`, as the engine
does), so a seed gives the same numbers on every device; models, batches and losses live on that device.
Loss parts are returned as detached device scalars; the train step reads each update's parts for the log
in one copy, not one by one. It never steps an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamgen.config import Preset
from streamgen.engine.step import draw_noise
from streamgen.model.masks import block_causal_mask
from streamgen.model.sampler import add_noise, x0_from_velocity
from streamgen.model.transformer import CausalWanTransformer, TextContext
from trainer import latent_data
from trainer.common.runtime import EpochOrder, sample_generator
from trainer.distill_config import DMDConfig, Geometry, SelfForcingConfig
from trainer.losses import dmd as dmd_losses
from trainer.ode_init import ODEPairs, load_pairs, regression_batch
from trainer.rollout import ContextSource, last_frames_span, rollout, sample_exit_step


@dataclass
class Models:
    """The four networks of DMD distillation (plus DMD2's optional GAN head on the critic).

    ``student`` (generator, trained), ``ema`` (its EMA, exported), ``critic`` (fake score, trained by
    flow matching), ``teacher`` (real score, frozen); metadata of the student-init and teacher files.
    """

    student: CausalWanTransformer
    ema: CausalWanTransformer
    critic: CausalWanTransformer
    teacher: CausalWanTransformer
    gan_head: nn.Module | None
    student_meta: dict[str, str]
    teacher_meta: dict[str, str]


def critic_modules(models: Models) -> list[nn.Module]:
    """What the critic optimizer trains: the critic and, with the GAN option, its head."""
    return [models.critic] + ([models.gan_head] if models.gan_head is not None else [])


class Batches:
    """Prompts, ground-truth clips and per-sample generators of a step, keyed on global sample indices.

    The dataset stays in host memory; a step's rows are gathered there and moved to ``device`` (the run's).
    """

    def __init__(self, data: latent_data.LatentDataset, seed: int, device: torch.device | str = "cpu") -> None:
        self.data, self.seed, self.device = data, seed, torch.device(device)
        self.clip = EpochOrder(len(data), seed, stream=21)  # global sample -> dataset clip

    def text(self, ids: list[int]) -> torch.Tensor:
        """``[B, L, D]`` caption embeddings on ``device``."""
        rows = torch.stack([self.data.text_emb[self.data.caption_ids[self.clip(i)]] for i in ids])
        return rows.to(self.device, non_blocking=True)

    def clips(self, ids: list[int], num_frames: int) -> torch.Tensor:
        """``[B, C, num_frames, h, w]`` ground-truth latents (diffusion space) on ``device``."""
        rows = torch.stack([self.data.latents[self.clip(i)][:, :num_frames] for i in ids])
        return rows.to(self.device, non_blocking=True)

    def generators(self, step: int, ids: list[int], stream: int) -> list[torch.Generator]:
        """One generator per sample, keyed on ``(seed, step, sample id, stream)``."""
        return [sample_generator(self.seed, step, i, stream=stream) for i in ids]


def randn_rows(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """``[B, ...]`` float32 standard normal noise on ``like``'s device, row ``b`` drawn on the CPU from
    ``generators[b]`` (:func:`~streamgen.engine.step.draw_noise`)."""
    return draw_noise(tuple(like.shape), generators, torch.float32, like.device)


def score_timesteps(generators: list[torch.Generator], dmd: DMDConfig, device: torch.device) -> torch.Tensor:
    """``[B]`` DMD score timesteps on ``device``, one per sample drawn on the CPU from its own generator."""
    t = torch.cat([dmd_losses.sample_score_timesteps(1, g, shift=dmd.shift, min_t=dmd.min_t, max_t=dmd.max_t)
                   for g in generators]).float()
    return t.to(device, non_blocking=True)


def window_start(seed: int, step: int, turn: int, num_frames: int, window: int, chunk_frames: int,
                 min_start: int = 0) -> int:
    """Self-Forcing++'s window: a chunk-aligned start in ``[min_start, N - T]`` drawn uniformly, shared by the
    batch and all ranks."""
    starts = list(range(min_start, num_frames - window + 1, chunk_frames))
    g = sample_generator(seed, step, turn, stream=12)
    return starts[int(torch.randint(len(starts), (1,), generator=g).item())]


def full_forward(model: CausalWanTransformer, x_t: torch.Tensor, t: torch.Tensor, context: TextContext,
                 num_train_timesteps: int) -> torch.Tensor:
    """Bidirectional ``x_0`` prediction over the whole window at positions ``0..T-1`` (teacher / critic)."""
    v = model(x_t, t, context)
    return x0_from_velocity(x_t.float(), v.float(), t, num_train_timesteps)


class DistillStep:
    """The pieces of one Self-Forcing / SF++ / TF / DF iteration: rollout, generator loss, critic loss.

    Runs on ``batches.device``, where :func:`trainer.distill_train.load_models` put the models; the
    LPIPS network and the VAE decoder of the LPIPS regression option are moved there too.
    """

    def __init__(self, cfg: SelfForcingConfig, preset: Preset, geom: Geometry, models: Models,
                 batches: Batches) -> None:
        self.cfg, self.preset, self.geom, self.m, self.batches = cfg, preset, geom, models, batches
        self.device = batches.device
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.num_train_timesteps = preset.sampler.num_train_timesteps
        self.pairs: ODEPairs | None = None
        self.lpips: nn.Module | None = None
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        if cfg.losses.regression > 0:
            self.pairs = load_pairs(Path(cfg.losses.regression_pairs))
            if self.pairs.x0.shape[2] != geom.teacher_horizon:
                raise ValueError(f"ODE pairs in {cfg.losses.regression_pairs} have {self.pairs.x0.shape[2]} frames, "
                                 f"the teacher horizon is {geom.teacher_horizon}")
            if cfg.losses.regression_kind == "lpips":
                from streamgen.model.weights import load_vae
                from trainer.losses.regression import build_lpips

                self.lpips = build_lpips(pretrained=True).to(self.device)
                vae = load_vae(cfg.data.vae_checkpoint, expected=preset.vae).eval().requires_grad_(False)
                vae.to(self.device)
                self.decode = lambda z: vae.decode(vae.from_diffusion(z))

    # ------------------------------------------------------------ generation
    def generate(self, step: int, turn: int, ids: list[int], text_emb: torch.Tensor, grad: bool) -> torch.Tensor:
        """The scored window ``[B, C, T, h, w]`` of this mode's rollout (with a graph iff ``grad``)."""
        cfg, geom, chunk = self.cfg, self.geom, self.preset.sampler.chunk_frames
        b = self.batches
        exit_step = sample_exit_step(cfg.run.seed, step, len(self.preset.sampler.denoising_steps), turn)
        gens = b.generators(step, ids, stream=30 + turn)
        source, span, start = None, last_frames_span(geom.num_frames, cfg.rollout.grad_frames), 0
        length = geom.num_frames
        if cfg.mode == "sfpp":
            start = window_start(cfg.run.seed, step, turn, geom.num_frames, geom.window_frames, chunk,
                                 geom.min_window_start)
            span = (start, start + geom.window_frames)
            length = start + geom.window_frames  # frames after the window cannot change it (causal): skip them
        elif cfg.mode in ("tf", "df"):
            clean = b.clips(ids, geom.num_frames)
            levels = torch.zeros(clean.shape[0], geom.num_frames, device=self.device)
            if cfg.mode == "df":
                noise_gens = b.generators(step, ids, stream=40 + turn)
                levels = torch.stack([torch.rand(geom.num_frames, generator=g) for g in noise_gens])
                levels = levels.to(self.device, non_blocking=True) * cfg.forcing.df_max_timestep
                clean = add_noise(clean, randn_rows(clean, noise_gens), levels, self.num_train_timesteps)
            source = ContextSource(clean, levels)
        with torch.set_grad_enabled(grad), self.autocast:
            context = self.m.student.encode_text(text_emb)
            out = rollout(self.m.student, context, self.preset, length, gens, exit_step=exit_step,
                          grad_span=span, context_source=source)
        return out.latents[:, :, start:start + geom.window_frames].float()

    # ------------------------------------------------------------ generator
    def generator_loss(self, step: int, ids: list[int], x: torch.Tensor, text_emb: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DMD (eq. 7-8) on the window ``x [B, C, T, h, w]`` plus the weighted options; the loss and its
        parts (detached scalars, still on the device)."""
        cfg, m, n = self.cfg, self.m, self.num_train_timesteps
        gens = self.batches.generators(step, ids, stream=50)
        t = score_timesteps(gens, cfg.dmd, self.device)
        noise = randn_rows(x, gens)
        with torch.no_grad(), self.autocast:
            x_t = add_noise(x.detach(), noise, t, n)  # backward noise initialisation (SF++) = DMD's re-noising
            both = m.teacher.encode_text(torch.cat([text_emb, torch.zeros_like(text_emb)]))
            real = full_forward(m.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both, n)
            real_cond, real_uncond = real.chunk(2)
            real_x0 = dmd_losses.cfg_combine(real_cond, real_uncond, cfg.dmd.cfg_scale)
            fake_x0 = full_forward(m.critic, x_t, t, m.critic.encode_text(text_emb), n)
            grad = dmd_losses.dmd_gradient(x.detach(), real_x0.float(), fake_x0.float())
        loss = dmd_losses.dmd_loss(x, grad)
        parts = {"dmd": loss.detach()}
        w = cfg.losses
        if w.gan > 0:
            from trainer.losses.gan import critic_features, gan_generator_loss

            assert m.gan_head is not None
            with self.autocast:
                feats = critic_features(m.critic, add_noise(x, noise, t, n), t, m.critic.encode_text(text_emb),
                                        layer=w.gan_layer)
            gan = gan_generator_loss(m.gan_head(feats.float()))
            loss = loss + w.gan * gan
            parts["gan_g"] = gan.detach()
        if w.regression > 0:
            reg = self.regression(step, ids)
            loss = loss + w.regression * reg
            parts["regression"] = reg.detach()
        if w.temporal > 0:
            from trainer.losses.temporal import temporal_consistency_loss

            tc = temporal_consistency_loss(x)
            loss = loss + w.temporal * tc
            parts["temporal"] = tc.detach()
        if w.background > 0:
            from trainer.losses.preservation import background_preservation_loss

            bg = background_preservation_loss(x, x[:, :, :1].detach().expand_as(x), self.border_mask(x))
            loss = loss + w.background * bg
            parts["background"] = bg.detach()
        if w.identity > 0:
            loss = loss + w.identity * self.identity(x, t, noise, text_emb, parts)
        return loss, parts

    def border_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, 1, 1, h, w]`` 1 on the latent border: rendered products sit in the middle, the edges are scene."""
        h, w = x.shape[-2:]
        k = self.cfg.losses.background_border
        mask = torch.ones(h, w, device=x.device)
        mask[k:h - k, k:w - k] = 0
        return mask.view(1, 1, 1, h, w)

    def identity(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, text_emb: torch.Tensor,
                 parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Critic features of each chunk vs the window's first chunk (detached), at the score timestep."""
        from trainer.losses.gan import critic_features
        from trainer.losses.preservation import identity_preservation_loss

        chunk, n = self.preset.sampler.chunk_frames, self.num_train_timesteps
        with self.autocast:
            feats = critic_features(self.m.critic, add_noise(x, noise, t, n), t,
                                    self.m.critic.encode_text(text_emb), layer=self.cfg.losses.gan_layer).float()
        tokens = self.preset.tokens_per_frame * chunk
        per_chunk = feats.split(tokens, dim=1)  # [B, tokens, dim] each (frame-major tokens)
        losses = [identity_preservation_loss(f, per_chunk[0]) for f in per_chunk[1:]]
        loss = torch.stack(losses).mean() if losses else feats.sum() * 0
        parts["identity"] = loss.detach()
        return loss

    def regression(self, step: int, ids: list[int]) -> torch.Tensor:
        """DMD's regression loss (section 3.3) on ODE pairs: student ``x_0`` from a trajectory vs teacher ``x_0``."""
        from trainer.losses.regression import regression_loss

        assert self.pairs is not None
        batch = regression_batch(self.pairs, ids, self.cfg.run.seed + 1, step, self.preset.sampler.chunk_frames)
        x_t, t, emb, x0 = (part.to(self.device, non_blocking=True) for part in batch)  # drawn on the CPU
        mask = block_causal_mask(x_t.shape[2], self.preset.tokens_per_frame, self.preset.sampler.chunk_frames,
                                 self.preset.cache.window_frames, self.preset.cache.sink_frames).to(self.device)
        student = self.m.student
        with self.autocast:
            v = student(x_t, t, student.encode_text(emb), attn_mask=mask)
        pred = x0_from_velocity(x_t, v.float(), t, self.num_train_timesteps)
        return regression_loss(pred, x0, decode=self.decode, lpips=self.lpips)

    # ------------------------------------------------------------ critic
    def critic_loss(self, step: int, turn: int, ids: list[int], x: torch.Tensor, text_emb: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow matching of the critic on the detached window (it models the student's distribution); the
        loss and its parts (detached device scalars)."""
        cfg, m, n = self.cfg, self.m, self.num_train_timesteps
        gens = self.batches.generators(step, ids, stream=60 + turn)
        t = score_timesteps(gens, cfg.dmd, self.device)
        noise = randn_rows(x, gens)
        x = x.detach()
        x_t = add_noise(x, noise, t, n)
        gan = cfg.losses.gan > 0
        with self.autocast:
            context = m.critic.encode_text(text_emb)
            if gan:  # DMD2 shares the fake-score forward between the flow loss and the discriminator
                from trainer.losses.gan import critic_features, critic_forward_with_features

                v, f_fake = critic_forward_with_features(m.critic, x_t, t, context, layer=cfg.losses.gan_layer)
            else:
                v = m.critic(x_t, t, context)
        loss = dmd_losses.critic_flow_loss(v.float(), x, noise)
        parts = {"critic": loss.detach()}
        if gan:
            from trainer.losses.gan import gan_discriminator_loss

            assert m.gan_head is not None
            real = self.batches.clips(ids, self.geom.window_frames)
            real_t = add_noise(real, randn_rows(real, gens), t, n)
            with self.autocast:
                f_real = critic_features(m.critic, real_t, t, context, layer=cfg.losses.gan_layer)
            disc = gan_discriminator_loss(m.gan_head(f_real.float()), m.gan_head(f_fake.float()))
            loss = loss + cfg.losses.gan_disc * disc
            parts["gan_d"] = disc.detach()
        return loss, parts
