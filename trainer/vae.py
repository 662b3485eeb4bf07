"""``python -m trainer.vae``: train the causal video VAE on rendered product clips and export it.

Loss per clip (all in pixel space [-1, 1] unless noted):

* ``l1 * |x - x'| + l2 * (x - x')^2`` reconstruction;
* ``edge * |grad x - grad x'|``: L1 between horizontal/vertical finite differences, a cheap
  download-free stand-in for a perceptual loss that keeps product edges and label text sharp;
* ``latent_reg * (log RMS_c(z))^2`` per sample and channel: the encoder is deterministic (no KL
  head), so this pulls every channel to unit scale without fixing its content;
* the decoder sees ``z + latent_noise * e``: it learns to decode slightly-off latents, which is
  what a diffusion sampler hands it.
* ``temporal * |diff_t x - diff_t x'|`` (0 = off): L1 between frame-to-frame differences, which prices the
  motion between consecutive frames, not only each frame. Every VAE here holds some of the four frames of a
  latent frame nearly still and jumps on the next (a small per-frame error, visible judder); this term, at
  the weights tried, has not removed that (docs/quality.md, "How the clips move").
* ``object_weight`` (0 = off): the L1 and L2 terms weight a pixel by ``1 + object_weight *
  mask`` (the renderer's object mask), normalised by each clip's mean weight. The product is a small part
  of the frame, so an unweighted loss lets its colour drift while backgrounds dominate.

**Decoder fine-tune** (``init_checkpoint`` + ``train_encoder: false``): the encoder of an exported
VAE is frozen and only the decoder trains, so the latent space (and with it the teacher and every
student trained in it, and the latent mean/std, which are carried over unchanged) stays exactly
the same: a better decoder improves every model's output without retraining any of them.

Training uses random ``crop_size`` crops of full-size clips (the VAE is convolutional, so crops
teach the same filters at a fraction of the cost) and fp32 (on this CPU the VAE's convs are
*slower* in bf16 autocast than in fp32, unlike the transformer's matmuls). After training,
the EMA weights are evaluated on held-out clips (PSNR), the per-channel latent mean/std are
measured on training clips (see :mod:`trainer.common.latents`), and the VAE is exported with
``save_checkpoint(kind="vae")``: bf16 if that costs at most 0.2 dB PSNR, else fp32.

This module must never change the VAE architecture (that lives in ``streamgen.model.vae``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from streamgen.config import VAEConfig, get_preset, to_dict
from streamgen.model.vae import CausalVideoVAE
from streamgen.model.weights import load_vae, save_checkpoint
from trainer.common.config import OptimConfig, RunConfig, check
from trainer.common.images import save_video_grid
from trainer.common.latents import LatentStats
from trainer.common.precision import PRECISIONS, resolve_config_precision
from trainer.common.preflight import checkpoint_command, file_input, preflight, run_inputs
from trainer.common.runtime import (
    LaunchError,
    local_indices,
    make_runtime,
    run_loop,
    run_stage,
    sample_generator,
    stage_parser,
)
from trainer.data.dataset import ClipConfig, render_item, render_item_with_mask

EXPORT_DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class VAEDataConfig:
    """Which clips train and evaluate the VAE, and how big a step is."""

    seed: int = 0  # dataset seed: clip i of a split is a pure function of (seed, split, i)
    num_frames: int = 8  # pixel frames per training clip (a multiple of the temporal factor)
    crop_size: int | None = 64  # random square crop for training; null = full frames
    global_batch: int = 8  # clips per optimizer step, summed over processes
    heldout_clips: int = 16
    heldout_frames: int = 24
    stats_clips: int = 48  # training clips whose latents give the mean/std
    eval_every: int = 500  # steps between held-out PSNR logs (on min(8, heldout_clips) clips)

    def __post_init__(self) -> None:
        check(self.num_frames > 0, f"data.num_frames must be > 0, got {self.num_frames}")
        check(self.crop_size is None or self.crop_size > 0, "data.crop_size must be > 0 or null")
        check(self.global_batch > 0, f"data.global_batch must be > 0, got {self.global_batch}")
        check(self.heldout_clips > 0 and self.heldout_frames > 0, "data.heldout_clips/heldout_frames must be > 0")
        check(self.stats_clips > 1, f"data.stats_clips must be > 1, got {self.stats_clips}")
        check(self.eval_every > 0, f"data.eval_every must be > 0, got {self.eval_every}")


@dataclass(frozen=True)
class VAELossConfig:
    l1: float = 1.0
    l2: float = 1.0
    edge: float = 0.5
    latent_reg: float = 1e-3
    latent_noise: float = 0.05
    object_weight: float = 0.0  # extra L1/L2 weight on the product's pixels (renderer mask); 0 = off
    temporal: float = 0.0  # L1 between frame-to-frame differences of the clip and its reconstruction; 0 = off

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "edge", "latent_reg", "latent_noise", "object_weight", "temporal"):
            check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        check(self.l1 + self.l2 > 0, "loss.l1 + loss.l2 must be > 0: something must reconstruct")


@dataclass(frozen=True)
class VAETrainConfig:
    preset: str = "default"  # the VAEConfig and video size come from this streamgen preset
    precision: str = "auto"  # auto: bf16 only on CPUs with native bf16 (trainer.common.precision)
    # Stage 1's export; checkpoints/vae_default.safetensors (served) is the stage-1b decoder fine-tune of it.
    export_path: str = "checkpoints/vae_stage1.safetensors"
    export_dtype: str = "auto"  # auto: bf16 if held-out PSNR drops <= 0.2 dB, else fp32
    # Start from an exported VAE (its weights; a fresh optimizer). With train_encoder false only the
    # decoder trains and the export keeps the init checkpoint's latent mean/std: the latent space is unchanged.
    init_checkpoint: str | None = None
    train_encoder: bool = True
    # Residual blocks after the decoder's last TemporalGrow (streamgen.config.VAEConfig.post_grow_blocks);
    # null = the preset's. Blocks the init checkpoint lacks start as the identity, so a fine-tune starts
    # from exactly the init's reconstruction.
    post_grow_blocks: int | None = None
    # Residual blocks before the encoder's first TemporalPool (VAEConfig.pre_pool_blocks); null = the preset's.
    # An encoder layout: with train_encoder false it must be the init checkpoint's (new blocks start as the
    # identity, like post-grow ones, so they would never leave it).
    pre_pool_blocks: int | None = None
    # With train_encoder false: the decoder starts from this run's fresh initialisation instead of the init
    # checkpoint's decoder (the frozen encoder and the latent stats still come from the checkpoint).
    fresh_decoder: bool = False
    run: RunConfig = field(default_factory=lambda: RunConfig(name="vae_default"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, ema_decay=0.995))
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)

    def __post_init__(self) -> None:
        preset = get_preset(self.preset)  # raises ValueError listing valid presets
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.export_dtype in EXPORT_DTYPES, f"export_dtype must be one of {EXPORT_DTYPES}")
        check(self.train_encoder or self.init_checkpoint is not None,
              "train_encoder: false fine-tunes the decoder of an exported VAE: set init_checkpoint")
        check(not self.fresh_decoder or not self.train_encoder,
              "fresh_decoder trains a new decoder for a frozen encoder: set train_encoder: false")
        check(self.init_checkpoint is None or self.init_checkpoint != self.export_path,
              f"init_checkpoint and export_path are the same file ({self.export_path}): export to a new path")
        tf, sf = preset.vae.temporal_factor, preset.vae.spatial_factor
        check(self.data.num_frames % tf == 0 and self.data.heldout_frames % tf == 0,
              f"data.num_frames / heldout_frames must be multiples of the VAE temporal factor {tf}")
        if self.data.crop_size is not None:
            check(self.data.crop_size % sf == 0, f"data.crop_size must be a multiple of the VAE spatial factor {sf}")
            check(self.data.crop_size <= min(preset.video.height, preset.video.width),
                  f"data.crop_size {self.data.crop_size} exceeds the preset's frame size")

    @property
    def vae(self) -> VAEConfig:
        vae = get_preset(self.preset).vae
        if self.post_grow_blocks is not None:
            vae = dataclasses.replace(vae, post_grow_blocks=self.post_grow_blocks)
        if self.pre_pool_blocks is not None:
            vae = dataclasses.replace(vae, pre_pool_blocks=self.pre_pool_blocks)
        return vae

    def clip_config(self, num_frames: int) -> ClipConfig:
        video = get_preset(self.preset).video
        return ClipConfig(num_frames=num_frames, height=video.height, width=video.width, fps=float(video.fps))


# ---------------------------------------------------------------------------------------------- losses


def edge_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 between spatial finite differences of ``[B, 3, N, H, W]`` videos."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def latent_scale_loss(latents: torch.Tensor) -> torch.Tensor:
    """``mean_{b,c} (log RMS_{n,h,w} z[b, c])^2``: unit-scale channels, per sample (so batch splits don't matter)."""
    rms2 = latents.float().pow(2).mean(dim=(2, 3, 4))  # [B, C]
    return (0.5 * torch.log(rms2 + 1e-8)).pow(2).mean()


def reconstruction_loss(video: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor,
                        cfg: VAELossConfig, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (see the module docstring); ``mask [B, N, H, W]`` in [0, 1] for ``object_weight``."""
    recon = recon.float()
    weight: torch.Tensor | float = 1.0
    if cfg.object_weight > 0:
        if mask is None:
            raise ValueError("loss.object_weight > 0 needs the object mask of every clip")
        weight = (1.0 + cfg.object_weight * mask.float()).unsqueeze(1)  # [B, 1, N, H, W]
        weight = weight / weight.mean(dim=(1, 2, 3, 4), keepdim=True)  # per clip: batch splits do not change it
    err = recon - video
    l1 = (err.abs() * weight).mean()
    l2 = (err.pow(2) * weight).mean()
    edge = edge_loss(recon, video)
    reg = latent_scale_loss(latents)
    total = cfg.l1 * l1 + cfg.l2 * l2 + cfg.edge * edge + cfg.latent_reg * reg
    parts = {"l1": l1.item(), "l2": l2.item(), "edge": edge.item(), "latent_reg": reg.item()}
    if cfg.temporal > 0:
        temporal = temporal_loss(recon, video)
        total = total + cfg.temporal * temporal
        parts["temporal"] = temporal.item()
    return total, parts


def temporal_loss(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """L1 between the frame-to-frame differences of ``recon`` and ``video`` (``[B, 3, N, H, W]``): zero for a
    reconstruction that moves exactly as the clip does, whatever its per-frame offset."""
    if video.shape[2] < 2:
        return recon.new_zeros(())
    return (recon.diff(dim=2) - video.diff(dim=2)).abs().mean()


class VAEWithLatents(nn.Module):
    """``video -> (reconstruction, clean latents)`` in one forward, so DDP sees the whole graph."""

    def __init__(self, vae: CausalVideoVAE, latent_noise: float) -> None:
        super().__init__()
        self.vae = vae
        self.latent_noise = latent_noise

    def forward(self, video: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(p.requires_grad for p in self.vae.encoder_parameters()):
            latents = self.vae.encode(video)
        else:  # decoder fine-tune: the frozen encoder needs no graph
            with torch.no_grad():
                latents = self.vae.encode(video)
        return self.vae.decode(latents + self.latent_noise * noise), latents


# ---------------------------------------------------------------------------------------------- data


def training_batch(cfg: VAETrainConfig, indices: list[int], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``indices`` of the train split and their object masks, randomly cropped per sample.

    Returns video ``[B, 3, N, S, S]`` in [-1, 1] and mask ``[B, N, S, S]`` in [0, 1].
    """
    clip_cfg = cfg.clip_config(cfg.data.num_frames)
    videos, masks = [], []
    for i in indices:
        video, mask = render_item_with_mask(cfg.data.seed, "train", i, clip_cfg)  # [3, N, H, W], [N, H, W]
        if cfg.data.crop_size is not None:
            g = sample_generator(cfg.run.seed, step, i, stream=0)
            s = cfg.data.crop_size
            top = int(torch.randint(0, video.shape[2] - s + 1, (1,), generator=g))
            left = int(torch.randint(0, video.shape[3] - s + 1, (1,), generator=g))
            video = video[:, :, top:top + s, left:left + s]
            mask = mask[:, top:top + s, left:left + s]
        videos.append(video)
        masks.append(mask)
    return torch.stack(videos), torch.stack(masks)


def latent_noise_like(latent_shape: tuple[int, ...], indices: list[int], seed: int, step: int) -> torch.Tensor:
    return torch.stack([torch.randn(latent_shape, generator=sample_generator(seed, step, i, stream=1))
                        for i in indices])


def latent_shape(cfg: VAETrainConfig) -> tuple[int, ...]:
    vae, s = cfg.vae, cfg.data.crop_size
    video = get_preset(cfg.preset).video
    h, w = (s, s) if s is not None else (video.height, video.width)
    return (vae.latent_channels, cfg.data.num_frames // vae.temporal_factor, h // vae.spatial_factor,
            w // vae.spatial_factor)


# ---------------------------------------------------------------------------------------------- evaluation


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR of two videos in [-1, 1], measured on [0, 1] images after clamping the reconstruction."""
    mse = ((x.float().clamp(-1, 1) - y.float()) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def heldout_psnr(vae: CausalVideoVAE, cfg: VAETrainConfig, num_clips: int, batch: int = 4) -> tuple[float, list]:
    """Mean PSNR over the first ``num_clips`` held-out clips (full frames, fresh streams); also returns pairs."""
    clip_cfg = cfg.clip_config(cfg.data.heldout_frames)
    items = [render_item(cfg.data.seed, "heldout", i, clip_cfg) for i in range(num_clips)]
    scores, pairs = [], []
    device = next(vae.parameters()).device  # clips render on the CPU; PSNR is measured back there
    for start in range(0, num_clips, batch):
        video = torch.stack([v for v, _, _ in items[start:start + batch]])
        recon = vae.decode(vae.encode(video.to(device))).cpu()
        for j in range(video.shape[0]):
            scores.append(psnr_db(recon[j], video[j]))
            pairs.append((video[j], recon[j], items[start + j][1]))
    return sum(scores) / len(scores), pairs


@torch.no_grad()
def measure_latent_stats(vae: CausalVideoVAE, cfg: VAETrainConfig, batch: int = 4) -> LatentStats:
    """Per-channel latent mean/std over ``stats_clips`` training clips of ``heldout_frames`` frames."""
    clip_cfg = cfg.clip_config(cfg.data.heldout_frames)
    # Index far past anything a run trains on, so the stats clips are fresh samples of the train split.
    first = 10_000_000
    latents = []
    device = next(vae.parameters()).device
    for start in range(0, cfg.data.stats_clips, batch):
        ids = range(first + start, first + min(cfg.data.stats_clips, start + batch))
        clips = torch.stack([render_item(cfg.data.seed, "train", i, clip_cfg)[0] for i in ids])
        latents.append(vae.encode(clips.to(device)).cpu())
    return LatentStats.measure(latents)


def bf16_roundtrip(vae: CausalVideoVAE) -> CausalVideoVAE:
    """A copy of ``vae`` whose weights went through bf16 (what a bf16 export loads as)."""
    copy = CausalVideoVAE(vae.cfg)
    copy.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in vae.state_dict().items()})
    return copy.eval()


# ---------------------------------------------------------------------------------------------- main


@dataclass
class VAEResult:
    steps: int
    losses: list[float]
    psnr_db: float | None = None
    psnr_bf16_db: float | None = None
    export_dtype: str | None = None
    stats: LatentStats | None = None


def train(cfg: VAETrainConfig, resume: bool = False, export: bool = True) -> VAEResult:
    """Train (or resume) to ``run.max_steps``, then evaluate and export on rank 0."""
    if cfg.run.gradient_checkpointing:
        raise ValueError("run.gradient_checkpointing applies to the DiT stages (teacher, ode_init, self_forcing); "
                         "the VAE stage has no checkpointed blocks: set it to false")
    fsdp_refused = ("the VAE stage trains with DDP (its model is small); FSDP (run.parallel fsdp, "
                    "configs/accelerate/fsdp_wan1.3b.yaml) is for the DiT stages: use run.parallel ddp")
    if cfg.run.parallel == "fsdp":
        raise ValueError(fsdp_refused)
    rt = make_runtime(cfg.run, cfg.precision)
    if rt.fsdp:  # an FSDP accelerate config
        raise LaunchError(fsdp_refused)
    cfg = resolve_config_precision(cfg, "vae", log=rt.is_main, device=rt.device)  # recorded in checkpoints
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    vae = CausalVideoVAE(cfg.vae)
    if cfg.init_checkpoint is not None and not resume:  # a resumed run restores its own weights
        load_init(vae, cfg.init_checkpoint, decoder=not cfg.fresh_decoder, encoder_frozen=not cfg.train_encoder)
    if not cfg.train_encoder:
        for p in vae.encoder_parameters():
            p.requires_grad_(False)
    vae.to(rt.device)
    ema = CausalVideoVAE(cfg.vae).requires_grad_(False)
    ema.load_state_dict(vae.state_dict())
    ema.to(rt.device)
    wrapped = VAEWithLatents(vae, cfg.loss.latent_noise)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    wrapped, optimizer = rt.prepare(wrapped, optimizer)
    shape = latent_shape(cfg)
    autocast = torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    eval_logger: list[tuple[int, float]] = []

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ids = local_indices(step, cfg.data.global_batch, rt)
        video, mask = training_batch(cfg, ids, step)  # drawn on the CPU (seeded per sample), then moved
        video, mask = video.to(rt.device), mask.to(rt.device)
        noise = latent_noise_like(shape, ids, cfg.run.seed, step).to(rt.device)
        with autocast:
            recon, latents = wrapped(video, noise)
        loss, parts = reconstruction_loss(video, recon, latents, cfg.loss, mask)
        if rt.is_main and (step + 1) % cfg.data.eval_every == 0:
            eval_logger.append((step + 1, heldout_psnr(ema.eval(), cfg, min(8, cfg.data.heldout_clips))[0]))
            print(f"\nstep {step + 1}: held-out PSNR (EMA) {eval_logger[-1][1]:.2f} dB", flush=True)
        return loss, parts

    t0 = time.perf_counter()
    loop = run_loop(rt, cfg.run, cfg.optim, vae, ema, optimizer, step_fn, to_dict(cfg), resume,
                    clips_per_step=cfg.data.global_batch // rt.world_size)
    result = VAEResult(steps=loop.step, losses=loop.losses)
    if rt.is_main:
        print(f"trained to step {loop.step} in {time.perf_counter() - t0:.0f} s", flush=True)
    if export and rt.is_main:
        export_vae(ema.eval(), cfg, result)
    rt.barrier()
    return result


def load_init(vae: CausalVideoVAE, path: str, decoder: bool = True, encoder_frozen: bool = False) -> None:
    """Load an exported VAE into ``vae``. Only post-grow and pre-pool blocks may differ: blocks the file has
    beyond ``vae``'s are an error, blocks it lacks keep ``vae``'s identity initialisation. ``decoder=False``
    loads the encoder only (the decoder keeps ``vae``'s own initialisation); ``encoder_frozen`` requires the
    file's encoder layout (a frozen encoder keeps its latent space)."""
    init = load_vae(path, expected=vae.cfg)
    if encoder_frozen and init.cfg.pre_pool_blocks != vae.cfg.pre_pool_blocks:
        raise ValueError(f"train_encoder: false keeps the encoder of {path}, which has {init.cfg.pre_pool_blocks} "
                         f"pre-pool blocks: set pre_pool_blocks: {init.cfg.pre_pool_blocks}")
    for name, part in (("post_grow_blocks", "post-grow decoder"), ("pre_pool_blocks", "pre-pool encoder")):
        have, want = getattr(init.cfg, name), getattr(vae.cfg, name)
        if have > want:
            raise ValueError(f"init_checkpoint {path} has {have} {part} blocks, this run builds {want}: "
                             f"set {name}: {have} (or more)")
    if not decoder:
        encoder = {id(p) for p in init.encoder_parameters()}
        state = {n: p for n, p in init.named_parameters() if id(p) in encoder}
        vae.load_state_dict(state, strict=False)  # the same encoder layout: every encoder weight is replaced
        return
    missing, unexpected = vae.load_state_dict(init.state_dict(), strict=False)
    first_new = {".post_blocks.": init.cfg.post_grow_blocks, ".pre_blocks.": init.cfg.pre_pool_blocks}
    new_blocks = {name for name in vae.state_dict() for tag, have in first_new.items()
                  if tag in name and int(name.split(tag)[1].split(".")[0]) >= have}
    if unexpected or set(missing) != new_blocks:
        raise ValueError(f"init_checkpoint {path} does not fit this VAE: missing {sorted(set(missing) - new_blocks)}, "
                         f"unexpected {sorted(unexpected)}")


def checkpoint_dtype(path: str) -> str:
    """``"bf16"`` or ``"fp32"``: the dtype a streamgen checkpoint's weights are stored in."""
    from streamgen.model.weights import read_safetensors

    dtypes = {t.dtype for t in read_safetensors(path).values()}
    if dtypes == {torch.bfloat16}:
        return "bf16"
    if dtypes == {torch.float32}:
        return "fp32"
    raise ValueError(f"{path} stores weights as {sorted(map(str, dtypes))}; expected all bf16 or all fp32")


def export_vae(vae: CausalVideoVAE, cfg: VAETrainConfig, result: VAEResult) -> None:
    """Evaluate, measure latent stats, write the checkpoint, a reconstruction PNG and a JSON report."""
    run_dir = cfg.run.run_dir
    psnr, pairs = heldout_psnr(vae, cfg, cfg.data.heldout_clips)
    psnr_bf16, _ = heldout_psnr(bf16_roundtrip(vae), cfg, cfg.data.heldout_clips)
    if not cfg.train_encoder:
        # The frozen encoder's latent space: every model trained in it keeps its normalisation, and the encoder
        # must come out bit-for-bit: stored in the init checkpoint's own dtype, the round trip init dtype ->
        # fp32 -> init dtype is exact (bf16 of an fp32 init would not be).
        stats = LatentStats.from_checkpoint(cfg.init_checkpoint)
        dtype_name = checkpoint_dtype(cfg.init_checkpoint)
    else:
        stats = measure_latent_stats(vae, cfg)
        dtype_name = cfg.export_dtype
        if dtype_name == "auto":  # bf16 unless it costs the held-out reconstruction more than 0.2 dB
            dtype_name = "bf16" if psnr - psnr_bf16 <= 0.2 else "fp32"
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    extra = {**stats.metadata(), "heldout_psnr_db": f"{psnr:.3f}", "train_steps": str(result.steps)}
    if cfg.init_checkpoint is not None:
        extra["init_checkpoint"] = cfg.init_checkpoint
        extra["train_encoder"] = str(cfg.train_encoder).lower()
    save_checkpoint(vae, cfg.export_path, kind="vae", config=cfg.vae, dtype=dtype, extra_metadata=extra)
    frame_ids = list(range(0, cfg.data.heldout_frames, max(1, cfg.data.heldout_frames // 6)))
    videos, labels = [], []
    for video, recon, caption in pairs[:4]:
        videos += [video, recon]
        labels += [f"original: {caption[:60]}", f"reconstruction ({psnr_db(recon, video):.1f} dB)"]
    save_video_grid(videos, labels, run_dir / "reconstructions.png", frame_ids)
    result.psnr_db, result.psnr_bf16_db, result.export_dtype, result.stats = psnr, psnr_bf16, dtype_name, stats
    report = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
              "heldout_psnr_db": psnr, "heldout_psnr_bf16_db": psnr_bf16, "export_dtype": dtype_name,
              "export_path": cfg.export_path, "latent_mean": stats.mean, "latent_std": stats.std}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"held-out PSNR {psnr:.2f} dB (bf16 weights {psnr_bf16:.2f} dB) -> exported {dtype_name} to "
          f"{cfg.export_path}; latent std range {min(stats.std):.3f}..{max(stats.std):.3f}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    return stage_parser(
        VAETrainConfig, prog="python -m trainer.vae", no_export_help="train only; skip evaluation and export",
        description="Train the causal video VAE on rendered product clips, evaluate held-out PSNR, measure "
                    "latent mean/std and export a streamgen 'vae' checkpoint. Run dir: <run.runs_dir>/<run.name>/ "
                    "(checkpoints/, tb/, reconstructions.png, report.json).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run(cfg: VAETrainConfig) -> None:
        found = run_inputs(cfg.run, args.resume)  # renders its own clips: the run dir and an init checkpoint
        # A resumed run restores its weights, but a frozen encoder's export still reads the init's stats and dtype.
        if cfg.init_checkpoint is not None and (not args.resume or not cfg.train_encoder):
            found.append(file_input("init_checkpoint", cfg.init_checkpoint,
                                    checkpoint_command("trainer.vae", cfg.init_checkpoint)))
        preflight(found, check=args.check)
        if not args.check:
            train(cfg, resume=args.resume, export=not args.no_export)

    return run_stage(VAETrainConfig, args, run)


if __name__ == "__main__":
    sys.exit(main())


