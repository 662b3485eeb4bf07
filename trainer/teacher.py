"""``python -m trainer.teacher``: the bidirectional flow-matching teacher on pre-encoded VAE latents.

The teacher is :class:`~streamgen.model.transformer.CausalWanTransformer` run with *full*
attention (no mask, no cache) over a short horizon of ``data.num_latent_frames`` latent frames.
Training (Wan / Self-Forcing recipe): ``x_t = (1 - s) x_0 + s e`` with one timestep per clip,
drawn uniformly and warped by ``flow.shift`` (or logit-normal), regress the velocity ``e - x_0``
with MSE; the prompt is replaced by the empty prompt (all-zero embedding) with probability
``data.prompt_dropout`` so the same network gives the unconditional score for CFG. ``precision``
(``auto``: bf16 autocast over fp32 master weights only where the CPU has native bf16), AdamW,
warmup + cosine LR, EMA (exported).

Whole clips: with ``data.clip_latent_frames`` longer than the horizon, the dataset stores long clips
and every sample is a random temporal crop of ``num_latent_frames`` frames, its start drawn from the
sample's keyed generator (so a resumed run replays it). The crop is presented at positions
``0..H-1``, as the sampler and Self-Forcing's DMD present the teacher's windows -- unless the model has a
frame-position embedding (``frame_embeddings``), which is there to know where in its clip a frame lies: then
at its clip positions ``s..s+H-1`` (RoPE is relative, so the offset changes nothing else).

Latents come from :mod:`trainer.latent_data` (built once from the trained VAE, first thing a
run does if the directory is missing or stale). Sampling lives in :mod:`trainer.sampling`.
The model is the preset's; the one layout option a run may add is ``frame_embeddings`` (a zero-initialised
map, so an init without it predicts unchanged). This module never changes the VAE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.config import ModelConfig, get_preset, to_dict
from streamgen.model.sampler import add_noise, shift_timesteps, velocity_target
from streamgen.model.text import TextEncoder
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_transformer, load_vae, save_checkpoint
from trainer import latent_data
from trainer.common import checkpoint as ckpt
from trainer.common.checkpoint import CheckpointError
from trainer.common.config import OptimConfig, RunConfig, check
from trainer.common.images import save_video_grid
from trainer.common.latents import LatentStats
from trainer.common.precision import EXPORT_DTYPES, PRECISIONS, resolve_config_precision
from trainer.common.preflight import (
    Input,
    checkpoint_command,
    file_input,
    latents_input,
    preflight,
    run_inputs,
    self_command,
)
from trainer.common.runtime import (
    EpochOrder,
    local_indices,
    make_runtime,
    run_loop,
    run_stage,
    sample_generator,
    stage_parser,
)
from trainer.sampling import sample_teacher

TIMESTEP_SAMPLING = ("shifted", "logit_normal", "uniform")

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a glossy red bottle turning slowly on a white table, static camera, soft lighting",
    "a matte blue mug standing still on a wooden table, static camera, bright lighting",
    "a glossy yellow box turning slowly in a dark studio, static camera, soft lighting",
    "a matte green can spinning fast against a blue gradient, static camera, soft lighting",
    "a glossy white shoe turning slowly on a kitchen counter, camera zooming in, soft lighting",
    "a matte black jar standing still on a white table, static camera, bright lighting",
    "a glossy purple mug turning slowly on a white table, static camera, soft lighting",
    "a matte orange bottle turning slowly in a dark studio, camera panning left, soft lighting",
)


@dataclass(frozen=True)
class TeacherDataConfig:
    vae_checkpoint: str = "checkpoints/vae_default.safetensors"
    latents_dir: str = "runs/latents_default"
    seed: int = 0  # dataset seed (which clips are rendered)
    num_clips: int = 1600
    # 6 latent frames = 24 pixel frames = 1.5 s at 16 fps = two student chunks of 3 (see docs/training.md).
    num_latent_frames: int = 6
    # Latent frames per stored clip; longer than num_latent_frames -> each sample is a random temporal crop
    # (mid-clip motion, not only clip openings). None: clips are exactly the horizon long (no crop).
    clip_latent_frames: int | None = None
    global_batch: int = 8
    prompt_dropout: float = 0.1
    # Share of (non-dropped) samples trained on a partial caption: the colour word or the kind word left out
    # (trainer.data.captions.partial_caption, each half the time), so kind and colour are each learnt on
    # their own as well as in the pairs the data holds. 0 = always the full caption (as before).
    attribute_dropout: float = 0.0
    encode_batch: int = 8

    def __post_init__(self) -> None:
        check(self.num_clips > 0, f"data.num_clips must be > 0, got {self.num_clips}")
        check(self.num_latent_frames > 0, f"data.num_latent_frames must be > 0, got {self.num_latent_frames}")
        check(self.clip_latent_frames is None or self.clip_latent_frames >= self.num_latent_frames,
              f"data.clip_latent_frames must be >= data.num_latent_frames ({self.num_latent_frames}) or null, "
              f"got {self.clip_latent_frames}")
        check(self.global_batch > 0, f"data.global_batch must be > 0, got {self.global_batch}")
        check(0 <= self.prompt_dropout < 1, f"data.prompt_dropout must lie in [0, 1), got {self.prompt_dropout}")
        check(0 <= self.attribute_dropout <= 1,
              f"data.attribute_dropout must lie in [0, 1], got {self.attribute_dropout}")
        check(self.encode_batch > 0, f"data.encode_batch must be > 0, got {self.encode_batch}")


@dataclass(frozen=True)
class FlowConfig:
    timestep_sampling: str = "shifted"  # shifted: u ~ U(0, 1) warped by `shift`; logit_normal: sigmoid(N(0, 1))
    shift: float = 5.0
    # Weight of a second MSE on the frame-to-frame differences of the velocity error (0: off). An error that is
    # the same in every frame (a static picture where the clip moves is not) costs nothing there, so it weighs
    # what changes between frames: camera moves and turning, which the plain loss lets the teacher ignore.
    temporal_weight: float = 0.0
    # Weight of a second MSE on the velocity error's deviation from its own mean over the frames (0: off): the
    # clip's whole frame-to-frame part, slow trends included (a zoom's steady growth, which a difference of
    # neighbouring frames barely sees). It reweights two orthogonal parts of the same MSE, so the optimum --
    # the conditional mean -- is unchanged; only how much the optimiser cares about the moving part grows:
    # the data put ~8 % of a clip's variance there and the camera ~2 % of that (docs/quality.md).
    frame_deviation_weight: float = 0.0

    def __post_init__(self) -> None:
        check(self.timestep_sampling in TIMESTEP_SAMPLING,
              f"flow.timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        check(self.shift > 0, f"flow.shift must be > 0, got {self.shift}")
        check(self.temporal_weight >= 0, f"flow.temporal_weight must be >= 0, got {self.temporal_weight}")
        check(self.frame_deviation_weight >= 0,
              f"flow.frame_deviation_weight must be >= 0, got {self.frame_deviation_weight}")


@dataclass(frozen=True)
class SampleConfig:
    num_steps: int = 50
    cfg_scale: float = 4.0
    shift: float = 5.0
    seed: int = 0
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    png_path: str = "checkpoints/teacher_default_samples.png"
    every: int | None = None  # steps between sample strips written to the run dir during training

    def __post_init__(self) -> None:
        check(self.num_steps > 0, f"sample.num_steps must be > 0, got {self.num_steps}")
        check(self.cfg_scale >= 1, f"sample.cfg_scale must be >= 1, got {self.cfg_scale}")
        check(self.shift > 0, f"sample.shift must be > 0, got {self.shift}")
        check(len(self.prompts) > 0 and all(isinstance(p, str) and p for p in self.prompts),
              "sample.prompts must be non-empty strings")
        check(self.every is None or self.every > 0, "sample.every must be > 0 or null")


@dataclass(frozen=True)
class TeacherTrainConfig:
    preset: str = "default"  # ModelConfig, VAEConfig and video geometry come from this streamgen preset
    precision: str = "auto"  # auto: bf16 only on CPUs with native bf16 (trainer.common.precision)
    export_path: str = "checkpoints/teacher_default.safetensors"
    export_dtype: str = "bf16"  # weights as stored (loaders upcast to fp32); bf16 halves the committed file
    # Start from these weights (e.g. a shorter-horizon teacher) instead of a random init; ignored on --resume.
    init_checkpoint: str | None = None
    # ModelConfig.frame_embeddings (0 = none, the preset's layout): the number of frame positions since the
    # start of a clip the model embeds (a crop from latent frame s trains at positions s, s + 1, ...), so it
    # knows how far into a clip it is -- the renderer's camera moves slow down with it. An init without the
    # embedding starts with its map at zero.
    frame_embeddings: int = 0
    # The embedding's learning rate over optim.lr's (1 = the same): its map starts at zero and grows slowly at a
    # pretrained model's LR. 30x changed nothing measurable in the diagnostic runs; 300x diverged
    # (docs/quality.md, "Can the teacher make a caption's frames differ at all?").
    frame_embedding_lr_scale: float = 1.0
    run: RunConfig = field(default_factory=lambda: RunConfig(name="teacher_default"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01,
                                                                   warmup_steps=200, ema_decay=0.999))
    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        get_preset(self.preset)
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.export_dtype in EXPORT_DTYPES,
              f"export_dtype must be one of {EXPORT_DTYPES}, got {self.export_dtype!r}")
        check(self.frame_embeddings >= 0, f"frame_embeddings must be >= 0, got {self.frame_embeddings}")
        check(self.frame_embedding_lr_scale > 0,
              f"frame_embedding_lr_scale must be > 0, got {self.frame_embedding_lr_scale}")
        check(self.frame_embeddings > 0 or self.frame_embedding_lr_scale == 1.0,
              "frame_embedding_lr_scale needs frame_embeddings > 0 (the model has no frame embedding to scale)")

    @property
    def model(self) -> ModelConfig:
        return dataclasses.replace(get_preset(self.preset).model, frame_embeddings=self.frame_embeddings)

    @property
    def clip_latent_frames(self) -> int:
        """Latent frames per stored clip (the horizon unless ``data.clip_latent_frames`` is longer)."""
        return self.data.clip_latent_frames or self.data.num_latent_frames

    def dataset_spec(self) -> latent_data.LatentDatasetSpec:
        preset = get_preset(self.preset)
        return latent_data.LatentDatasetSpec(
            vae_checkpoint=self.data.vae_checkpoint, num_clips=self.data.num_clips,
            num_pixel_frames=preset.pixel_frames(self.clip_latent_frames), height=preset.video.height,
            width=preset.video.width, fps=preset.video.fps, seed=self.data.seed,
            text_max_tokens=preset.model.text_max_tokens)


class TeacherForward(nn.Module):
    """``(x_t, t, prompt embeddings) -> velocity`` in one forward, text projection included, so DDP sees it all."""

    def __init__(self, model: CausalWanTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                frame_offsets: torch.Tensor | int = 0) -> torch.Tensor:
        return self.model(x_t, timesteps, self.model.encode_text(text_emb), frame_offsets=frame_offsets)


def sample_timestep(g: torch.Generator, flow: FlowConfig) -> float:
    """One training timestep in (0, 1000]."""
    if flow.timestep_sampling == "logit_normal":
        s = torch.sigmoid(torch.randn((), generator=g)).item()
    else:
        s = 1.0 - torch.rand((), generator=g).item()  # (0, 1]: never exactly clean
    if flow.timestep_sampling == "shifted":
        return float(shift_timesteps(s * 1000.0, flow.shift))
    return s * 1000.0


class Batcher:
    """Builds the local batch of a step from global sample indices (order, noise, t, dropout per sample)."""

    def __init__(self, data: latent_data.LatentDataset, cfg: TeacherTrainConfig,
                 partial_emb: torch.Tensor | None = None) -> None:
        """``partial_emb``: ``[N, 2, L, D]``, each clip's partial captions' embeddings (colour left out, kind
        left out; :func:`partial_caption_embeddings`); needed when ``data.attribute_dropout > 0``."""
        self.data, self.cfg = data, cfg
        if cfg.data.attribute_dropout > 0 and (partial_emb is None or partial_emb.shape[:2] != (len(data), 2)):
            raise ValueError("data.attribute_dropout > 0 needs every clip's two partial caption embeddings")
        self.partial_emb = partial_emb
        self.clip_index = EpochOrder(len(data), cfg.run.seed, stream=7)
        self.horizon = cfg.data.num_latent_frames
        if data.latents.shape[2] < self.horizon:
            raise ValueError(f"latent clips have {data.latents.shape[2]} frames, fewer than the horizon {self.horizon}")

    def crop_start(self, step: int, index: int) -> int:
        """First latent frame of sample ``index``'s crop at ``step``: uniform over every start that fits.

        Its own keyed stream (not the noise stream), so clips exactly one horizon long draw the same noise,
        timesteps and dropout as before crops existed.
        """
        span = self.data.latents.shape[2] - self.horizon
        if span == 0:
            return 0
        g = sample_generator(self.cfg.run.seed, step, index, stream=8)
        return int(torch.randint(span + 1, (), generator=g))

    def __call__(self, step: int, ids: list[int]) -> tuple[torch.Tensor, ...]:
        """``(x_t, t, prompt embeddings, velocity target, frame offsets)``; the offsets are the crops' first latent
        frames where the model has frame embeddings, else 0 (RoPE alone is relative: the offset changes nothing)."""
        x0s, noises, ts, embs, starts = [], [], [], [], []
        zero = torch.zeros_like(self.data.text_emb[0])
        for i in ids:
            clip = self.clip_index(i)
            start = self.crop_start(step, i)
            x0 = self.data.latents[clip, :, start:start + self.horizon]  # [C, H, h, w]
            g = sample_generator(self.cfg.run.seed, step, i, stream=2)
            noises.append(torch.randn(x0.shape, generator=g))
            ts.append(sample_timestep(g, self.cfg.flow))
            dropped = torch.rand((), generator=g).item() < self.cfg.data.prompt_dropout
            emb = zero if dropped else self.data.text_emb[self.data.caption_ids[clip]]
            if self.partial_emb is not None and not dropped:  # drawn after the others: old runs keep their draws
                u = torch.rand((), generator=g).item()
                if u < self.cfg.data.attribute_dropout:  # which one: the lower or the upper half of that share
                    emb = self.partial_emb[clip, int(u >= self.cfg.data.attribute_dropout / 2)]
            embs.append(emb)
            x0s.append(x0)
            starts.append(start if self.cfg.frame_embeddings else 0)
        x0, noise = torch.stack(x0s), torch.stack(noises)
        t = torch.tensor(ts)
        return (add_noise(x0, noise, t), t, torch.stack(embs), velocity_target(x0, noise),
                torch.tensor(starts, dtype=torch.long))


def flow_loss(v: torch.Tensor, target: torch.Tensor, temporal_weight: float = 0.0,
              frame_deviation_weight: float = 0.0) -> torch.Tensor:
    """Velocity MSE, plus ``temporal_weight`` x the MSE of the error's frame-to-frame differences and
    ``frame_deviation_weight`` x the MSE of its deviation from its mean over the frames (``[B, C, F, h, w]``; a
    single frame has neither and gets the plain loss)."""
    loss = F.mse_loss(v, target)
    if v.shape[2] > 1 and (temporal_weight > 0 or frame_deviation_weight > 0):
        error = v - target
        if temporal_weight > 0:
            loss = loss + temporal_weight * error.diff(dim=2).square().mean()
        if frame_deviation_weight > 0:
            loss = loss + frame_deviation_weight * (error - error.mean(dim=2, keepdim=True)).square().mean()
    return loss


def partial_caption_embeddings(data: latent_data.LatentDataset, max_tokens: int,
                               token_encoder: Any = None) -> torch.Tensor:
    """``[N, 2, L, D]``: every clip's caption with its colour left out and with its kind left out, embedded by
    the prompt encoder the dataset's captions were embedded with (tests pass a hash encoder)."""
    from trainer.data.attributes import ClipSpec
    from trainer.data.captions import PARTIAL_ATTRIBUTES, partial_caption

    texts = [partial_caption(ClipSpec(**attrs), without) for attrs in data.attributes for without in PARTIAL_ATTRIBUTES]
    unique = sorted(set(texts))
    emb, _ = TextEncoder(max_tokens, token_encoder=token_encoder).encode(unique)
    index = {t: i for i, t in enumerate(unique)}
    ids = torch.tensor([index[t] for t in texts]).view(len(data), len(PARTIAL_ATTRIBUTES))
    return emb.float()[ids]


def load_init(model: CausalWanTransformer, path: str) -> None:
    """Load ``path``'s weights into ``model``. A checkpoint without a frame-position embedding initialises a
    model with one (its map stays at its zero init: the model predicts exactly as the checkpoint); a different
    non-zero position count, or any other layout difference, raises."""
    init = load_transformer(path, expected=model.cfg)
    have, want = init.cfg.frame_embeddings, model.cfg.frame_embeddings
    if have == want:
        model.load_state_dict(init.state_dict())
        return
    if have != 0:
        raise ValueError(f"init_checkpoint {path} has {have} frame embeddings, the config asks for {want}: "
                         "only a checkpoint without them can start a run with them")
    missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
    if unexpected or sorted(missing) != ["condition_embedder.frame_embedding.bias",
                                         "condition_embedder.frame_embedding.weight"]:
        raise ValueError(f"init_checkpoint {path}: unexpected {unexpected}, missing {missing}")


@dataclass
class TeacherResult:
    steps: int
    losses: list[float]
    png: Path | None = None


def parameter_groups(model: nn.Module, frame_embedding_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW's parameter groups: everything at the scheduled LR, and the frame-position embedding's map at
    ``frame_embedding_lr_scale`` times it (a group's ``lr_scale``, applied by the training step)."""
    frame = [p for n, p in model.named_parameters() if n.startswith("condition_embedder.frame_embedding.")]
    if frame_embedding_lr_scale == 1.0 or not frame:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in frame}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": frame, "lr_scale": frame_embedding_lr_scale}]


def train(cfg: TeacherTrainConfig, resume: bool = False, export: bool = True) -> TeacherResult:
    """Build the latent dataset if needed (rank 0), train or resume to ``run.max_steps``, export on rank 0."""
    rt = make_runtime(cfg.run, cfg.precision)
    cfg = resolve_config_precision(cfg, "teacher", log=rt.is_main, device=rt.device)  # recorded in checkpoints
    if rt.is_main:
        latent_data.build(Path(cfg.data.latents_dir), cfg.dataset_spec(), batch=cfg.data.encode_batch)
    rt.barrier()
    data = latent_data.load(Path(cfg.data.latents_dir), cfg.dataset_spec())
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = CausalWanTransformer(cfg.model).set_gradient_checkpointing(cfg.run.gradient_checkpointing)
    if cfg.init_checkpoint is not None:
        load_init(model, cfg.init_checkpoint)
    model.to(rt.device)  # before the optimizer is built over its parameters
    ema = CausalWanTransformer(cfg.model).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ema.to(rt.device)
    rt.shard(model)  # FSDP (run.parallel fsdp): before the optimizer is built over its parameters
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.frame_embedding_lr_scale), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    wrapped, optimizer = rt.prepare(TeacherForward(model), optimizer)
    partial = (partial_caption_embeddings(data, cfg.model.text_max_tokens) if cfg.data.attribute_dropout > 0
               else None)
    batcher = Batcher(data, cfg, partial)
    # Batches and noise are drawn on the CPU from per-sample generators (same samples on any device or
    # number of processes), then moved; on CUDA accelerate's mixed precision also wraps the forward.
    autocast = torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batcher(step, local_indices(step, cfg.data.global_batch, rt))
        x_t, t, emb, target, offsets = (x.to(rt.device, non_blocking=True) for x in batch)
        with autocast:
            v = wrapped(x_t, t, emb, offsets)
        loss = flow_loss(v.float(), target, cfg.flow.temporal_weight, cfg.flow.frame_deviation_weight)
        if rt.is_main and cfg.sample.every is not None and step > 0 and step % cfg.sample.every == 0:
            write_samples(ema.eval(), cfg, cfg.run.run_dir / f"samples_{step:06d}.png")
        return loss, {}

    t0 = time.perf_counter()
    loop = run_loop(rt, cfg.run, cfg.optim, model, ema, optimizer, step_fn, to_dict(cfg), resume,
                    clips_per_step=cfg.data.global_batch // rt.world_size)
    result = TeacherResult(steps=loop.step, losses=loop.losses)
    if rt.is_main:
        print(f"trained to step {loop.step} in {time.perf_counter() - t0:.0f} s", flush=True)
    if export and rt.is_main:
        save_checkpoint(ema, cfg.export_path, kind="transformer", config=cfg.model,
                        dtype=torch.bfloat16 if cfg.export_dtype == "bf16" else None,
                        extra_metadata={"vae_checkpoint": cfg.data.vae_checkpoint, "train_steps": str(loop.step),
                                        "num_latent_frames": str(cfg.data.num_latent_frames)})
        result.png = write_samples(ema.eval(), cfg, Path(cfg.sample.png_path))
        report = {"steps": loop.step, "final_loss": loop.losses[-1] if loop.losses else None,
                  "mean_loss_last_100": sum(loop.losses[-100:]) / max(1, len(loop.losses[-100:])),
                  "export_path": cfg.export_path, "samples_png": str(result.png), "precision": cfg.precision}
        (cfg.run.run_dir / "report.json").write_text(json.dumps(report, indent=2))
        print(f"exported EMA teacher to {cfg.export_path}; samples in {result.png}", flush=True)
    rt.barrier()
    return result


@torch.no_grad()
def write_samples(model: CausalWanTransformer, cfg: TeacherTrainConfig, path: Path) -> Path:
    """Sample every prompt of ``cfg.sample`` (CFG, many Euler steps), decode with the VAE, save a PNG strip."""
    preset = get_preset(cfg.preset)
    prompts = list(cfg.sample.prompts)
    encoder = TextEncoder(preset.model.text_max_tokens)
    cond, _ = encoder.encode(prompts)
    uncond, _ = encoder.encode([""] * len(prompts))
    shape = (preset.model.latent_channels, cfg.data.num_latent_frames, preset.latent_height, preset.latent_width)
    noise = torch.stack([torch.randn(shape, generator=sample_generator(cfg.sample.seed, 0, i, stream=3))
                         for i in range(len(prompts))])
    z = sample_teacher(model, noise, cond, uncond, num_steps=cfg.sample.num_steps, cfg_scale=cfg.sample.cfg_scale,
                       shift=cfg.sample.shift, bf16=cfg.precision == "bf16")
    stats = LatentStats.from_checkpoint(cfg.data.vae_checkpoint)
    vae = load_vae(cfg.data.vae_checkpoint, expected=preset.vae).eval()
    video = vae.decode(stats.denormalize(z))  # [B, 3, N, H, W]
    frames = video.shape[2]
    frame_ids = list(range(0, frames, max(1, frames // 6)))
    return save_video_grid(list(video), [p[:70] for p in prompts], path, frame_ids)


def sample_from_run(cfg: TeacherTrainConfig, path: Path) -> Path:
    """Sample strip from the EMA weights of the run's latest checkpoint (peek at a run in progress)."""
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    if latest is None:
        raise CheckpointError(f"{cfg.run.run_dir} has no checkpoint to sample from")
    state = ckpt.load(latest)
    model = CausalWanTransformer(cfg.model)
    model.load_state_dict(state.ema)
    return write_samples(model.eval(), cfg, path)


def build_parser() -> argparse.ArgumentParser:
    p = stage_parser(
        TeacherTrainConfig, prog="python -m trainer.teacher", no_export_help="train only; skip export and samples",
        description="Train the bidirectional flow-matching teacher on pre-encoded latents of the trained VAE and "
                    "export a streamgen 'transformer' checkpoint plus a PNG strip of CFG samples. Run dir: "
                    "<run.runs_dir>/<run.name>/ (checkpoints/, tb/, report.json).")
    p.add_argument("--encode-only", action="store_true", help="build the latent dataset and exit")
    p.add_argument("--sample-only", type=Path, default=None, metavar="PNG",
                   help="write a sample strip from the run's latest checkpoint (EMA) to PNG and exit")
    return p


def inputs(cfg: TeacherTrainConfig, args: argparse.Namespace) -> list[Input]:
    """What this command reads: ``--check`` lists it, and a missing required input stops it before any work."""
    preset = get_preset(cfg.preset)
    found = [file_input("data.vae_checkpoint", cfg.data.vae_checkpoint,  # encodes the latents, decodes the samples
                        checkpoint_command("trainer.vae", cfg.data.vae_checkpoint))]
    if args.sample_only is not None:
        return found  # and the run's latest checkpoint (sample_from_run says so if there is none)
    shape = (preset.model.latent_channels, cfg.clip_latent_frames, preset.latent_height, preset.latent_width)
    found.append(latents_input("data.latents_dir", cfg.data.latents_dir, cfg.dataset_spec(), shape,
                               self_command("trainer.teacher", args.config, args.overrides, "--encode-only")))
    if args.encode_only:
        return found
    if cfg.init_checkpoint is not None and not args.resume:  # a resumed run starts from its checkpoint instead
        found.append(file_input("init_checkpoint", cfg.init_checkpoint,
                                checkpoint_command("trainer.teacher", cfg.init_checkpoint)))
    return found + run_inputs(cfg.run, args.resume)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run(cfg: TeacherTrainConfig) -> None:
        preflight(inputs(cfg, args), check=args.check)
        if args.check:
            return
        if args.encode_only:
            latent_data.build(Path(cfg.data.latents_dir), cfg.dataset_spec(), batch=cfg.data.encode_batch)
        elif args.sample_only is not None:
            print(sample_from_run(cfg, args.sample_only))
        else:
            train(cfg, resume=args.resume, export=not args.no_export)

    return run_stage(TeacherTrainConfig, args, run)


if __name__ == "__main__":
    sys.exit(main())
