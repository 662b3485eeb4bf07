"""``python -m trainer.self_forcing``: distil the causal few-step student with DMD on its own rollouts.

Modes (``mode:``), all with the same objective, budget and loop so they compare fairly:

* ``sf`` — **Self-Forcing** (Huang et al. 2025, arXiv 2506.08009, Alg. 1): the student rolls out
  ``N = T`` latent frames chunk by chunk with its KV cache exactly as at inference
  (:mod:`trainer.rollout`), gradient only through each chunk's exit step, and the whole rollout is
  scored by DMD against the bidirectional teacher.
* ``sfpp`` — **Self-Forcing++** (arXiv 2510.02283, section 3): the rollout runs ``N >> T`` frames
  through the *rolling* cache of the preset (window + sinks); a chunk-aligned window of the
  teacher's length ``T`` is drawn uniformly; *backward noise initialisation* re-noises the student's
  own window to the score timestep, and extended DMD scores that window only (teacher and critic
  see it at positions ``0..T-1``); only the window's chunks take gradient.
* ``tf`` — **Teacher Forcing** baseline: each chunk is denoised against a cache holding the
  *ground-truth* clean clip (the latent dataset), not the student's own chunks; same DMD.
* ``df`` — **Diffusion Forcing** baseline (CausVid-style): as ``tf``, with the ground-truth
  context noised to independent per-frame levels.

DMD (Yin et al. 2024, arXiv 2311.18828, eq. 7-8; :mod:`trainer.losses.dmd`): score timestep ``t``
uniform, shifted, clamped to ``[min_t, max_t]``; ``x_t = (1 - s) x + s e``; real ``x_0`` = teacher
with CFG, fake ``x_0`` = critic; ``g = (fake - real) / mean|x - real|``;
``L_G = 0.5 || x - sg(x - g) ||^2``. The critic (init = teacher) learns the student's distribution
by flow matching on detached rollouts every iteration; the generator steps every ``gen_every``-th
iteration (Self-Forcing: 5). AdamW betas (0, 0.999) for both; EMA of the generator (exported).
Options: DMD2's GAN head on critic features (arXiv 2405.14867) with a two-time-scale critic
(``critic.lr_mult`` / ``critic.steps``), a regression loss on teacher ODE pairs (latent MSE or
LPIPS), temporal-consistency and background/identity-preservation losses (weights default 0).

Gradients are all-reduced by hand (no DDP wrapper): a rollout calls the student many times per
backward, which DDP's reducer does not allow, and the exit step and window are drawn from keys
shared by all ranks, so every rank builds the same graph shape. This module wires configs, data,
models and the loop; the iteration's tensors live in :mod:`trainer.distill_step`, step math in
:mod:`trainer.rollout` and :mod:`trainer.losses`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from streamgen.config import ModelConfig, Preset, get_preset, to_dict
from streamgen.generate import generate_latents
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_state_strict, read_metadata, save_checkpoint
from trainer import latent_data
from trainer.common import checkpoint as ckpt
from trainer.common.checkpoint import CheckpointError
from trainer.common.config import OptimConfig, RunConfig, check
from trainer.common.precision import EXPORT_DTYPES, PRECISIONS, resolve_config_precision
from trainer.common.preflight import (
    Input,
    checkpoint_command,
    existing_run,
    file_input,
    nothing_to_resume,
    preflight,
    run_inputs,
    stage_command,
)
from trainer.common.runtime import (
    NonFiniteLossError,
    Runtime,
    TrainLogger,
    ema_update,
    fp32_state,
    local_indices,
    lr_at,
    make_runtime,
    run_stage,
    stage_parser,
)
from trainer.distill_step import Batches, DistillStep, Geometry, Models, critic_modules
from trainer.ode_init import (
    StudentDataConfig,
    check_latents_spec,
    check_same_latent_space,
    ensure_latents,
    load_for_preset,
    student_data_inputs,
    teacher_horizon,
)

MODES = ("sf", "sfpp", "tf", "df")
REGRESSION_KINDS = ("latent", "lpips")


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class ModelsConfig:
    teacher: str = "checkpoints/teacher_default.safetensors"  # real score; its horizon is the default window
    student_init: str = "checkpoints/student_ode_default.safetensors"  # the ODE-init export
    critic_init: str | None = None  # fake score's initial weights; None = the teacher (Self-Forcing)
    # Smoke runs on the `test` preset only: create a random teacher (= student init), a random VAE and its
    # latent dataset at the configured paths when they are missing (see bootstrap_tiny).
    bootstrap: bool = False


@dataclass(frozen=True)
class RolloutConfig:
    # Rollout length N in latent frames; None = the window (sf/tf/df). sfpp needs N > window.
    num_frames: int | None = None
    # Window T the teacher and critic score; None = the teacher's horizon (checkpoint metadata).
    window_frames: int | None = None
    # sf/tf/df: only the last grad_frames frames take gradient (earlier chunks fully no_grad); None = all.
    grad_frames: int | None = None
    # sfpp: the scored window's start is drawn uniformly from the chunk-aligned starts in
    # [window_min_start, N - T]. 0 = the whole rollout (as the paper); the preset's first evicting chunk
    # (12 for `default`: trainer.rollout.first_evicting_chunk) puts the rolling cache's eviction in every window.
    window_min_start: int = 0

    def __post_init__(self) -> None:
        for name in ("num_frames", "window_frames", "grad_frames"):
            value = getattr(self, name)
            check(value is None or value > 0, f"rollout.{name} must be > 0 or null, got {value}")
        check(self.window_min_start >= 0, f"rollout.window_min_start must be >= 0, got {self.window_min_start}")


@dataclass(frozen=True)
class DMDConfig:
    cfg_scale: float = 4.0  # v_u + s (v_c - v_u); Self-Forcing's cond + 3 (cond - uncond) = 4.0
    min_t: float = 20.0  # score timestep clamp (Self-Forcing: [0.02, 0.98] x 1000)
    max_t: float = 980.0
    shift: float = 5.0
    gen_every: int = 5  # generator update every gen_every-th iteration; the critic steps every iteration

    def __post_init__(self) -> None:
        check(self.cfg_scale >= 1, f"dmd.cfg_scale must be >= 1, got {self.cfg_scale}")
        check(0 <= self.min_t < self.max_t <= 1000, f"dmd needs 0 <= min_t < max_t <= 1000, got "
              f"[{self.min_t}, {self.max_t}]")
        check(self.shift > 0, f"dmd.shift must be > 0, got {self.shift}")
        check(self.gen_every >= 1, f"dmd.gen_every must be >= 1, got {self.gen_every}")


@dataclass(frozen=True)
class CriticConfig:
    lr_mult: float = 1.0  # critic lr = optim.lr x lr_mult (two-time-scale update rule, DMD2 section 4.1)
    steps: int = 1  # critic updates per iteration; each extra one draws a fresh no-grad rollout
    grad_clip: float | None = 10.0

    def __post_init__(self) -> None:
        check(self.lr_mult > 0, f"critic.lr_mult must be > 0, got {self.lr_mult}")
        check(self.steps >= 1, f"critic.steps must be >= 1, got {self.steps}")
        check(self.grad_clip is None or self.grad_clip > 0, "critic.grad_clip must be > 0 or null")


@dataclass(frozen=True)
class ForcingConfig:
    """The baselines' ground-truth context (tf: clean; df: each frame noised to its own level)."""

    df_max_timestep: float = 1000.0  # df: context level per frame ~ U[0, df_max_timestep)

    def __post_init__(self) -> None:
        check(0 < self.df_max_timestep <= 1000, f"forcing.df_max_timestep must lie in (0, 1000], "
              f"got {self.df_max_timestep}")


@dataclass(frozen=True)
class LossesConfig:
    """Weights of the optional losses (0 = off) added to the generator's DMD loss."""

    gan: float = 0.0  # DMD2 generator GAN loss on critic features of the noised rollout
    gan_disc: float = 1.0  # discriminator loss weight inside the critic's objective (when gan > 0)
    gan_layer: int = -1  # critic block whose features the GAN head reads
    gan_hidden: int = 256
    regression: float = 0.0  # regression on teacher ODE pairs (DMD section 3.3)
    regression_kind: str = "latent"  # latent: MSE on latents; lpips: LPIPS on VAE-decoded frames (extra `lpips`)
    regression_pairs: str = "runs/ode_pairs_default"  # made by trainer.ode_init
    temporal: float = 0.0  # temporal consistency of the rollout window
    background: float = 0.0  # background preservation w.r.t. the window's first frame (border mask)
    background_border: int = 1  # latent pixels from each edge counted as background
    identity: float = 0.0  # identity preservation: critic features of each chunk vs the window's first chunk

    def __post_init__(self) -> None:
        for name in ("gan", "gan_disc", "regression", "temporal", "background", "identity"):
            check(getattr(self, name) >= 0, f"losses.{name} must be >= 0, got {getattr(self, name)}")
        check(self.gan_hidden > 0, f"losses.gan_hidden must be > 0, got {self.gan_hidden}")
        check(self.regression_kind in REGRESSION_KINDS,
              f"losses.regression_kind must be one of {REGRESSION_KINDS}, got {self.regression_kind!r}")
        check(self.background_border > 0, f"losses.background_border must be > 0, got {self.background_border}")


@dataclass(frozen=True)
class EvalConfig:
    every: int | None = None  # steps between evaluations of the EMA student (TensorBoard eval/*); None = off
    num_prompts: int = 4  # captions of the latent dataset's first clips
    num_latent_frames: int | None = None  # per clip; None = the rollout length
    classifier: str | None = "checkpoints/attr_classifier.safetensors"  # adherence; skipped if missing/None
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.every is None or self.every > 0, "eval.every must be > 0 or null")
        check(self.num_prompts > 0, f"eval.num_prompts must be > 0, got {self.num_prompts}")
        check(self.num_latent_frames is None or self.num_latent_frames > 0, "eval.num_latent_frames must be > 0")


@dataclass(frozen=True)
class SelfForcingConfig:
    mode: str = "sf"
    preset: str = "default"  # model, sampler (4 steps, chunk 3) and rolling cache come from this preset
    precision: str = "auto"  # auto: bf16 only on CPUs with native bf16 (trainer.common.precision)
    export_path: str = "checkpoints/student_sf_default.safetensors"
    export_dtype: str = "bf16"  # weights as stored (loaders upcast); bf16 halves the file, serving runs bf16
    global_batch: int = 2  # rollouts per iteration, summed over processes
    models: ModelsConfig = field(default_factory=ModelsConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="sf_default"))
    # Generator optimizer (Self-Forcing: AdamW betas (0, 0.999), constant lr, EMA of the generator).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, betas=(0.0, 0.999), weight_decay=0.0,
                                                                   warmup_steps=0, schedule="constant",
                                                                   grad_clip=10.0, ema_decay=0.99))
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: StudentDataConfig = field(default_factory=StudentDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    forcing: ForcingConfig = field(default_factory=ForcingConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        get_preset(self.preset)
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.global_batch > 0, f"global_batch must be > 0, got {self.global_batch}")
        check(self.export_dtype in EXPORT_DTYPES,
              f"export_dtype must be one of {EXPORT_DTYPES}, got {self.export_dtype!r}")
        check(not self.models.bootstrap or self.preset == "test",
              f"models.bootstrap makes random models and is only for preset 'test', not {self.preset!r}")
        n, w = self.rollout.num_frames, self.rollout.window_frames
        if self.mode == "sfpp":
            check(n is not None, "mode sfpp needs rollout.num_frames (N, longer than the window T)")
        elif n is not None and w is not None:
            check(n == w, f"mode {self.mode} scores the whole rollout: rollout.num_frames ({n}) must equal "
                          f"rollout.window_frames ({w}) or be null")

    @property
    def model(self) -> ModelConfig:
        return get_preset(self.preset).model


def resolve_geometry(cfg: SelfForcingConfig, horizon: int, chunk_frames: int) -> Geometry:
    """``N`` and ``T`` from config and teacher horizon; inconsistent values raise ``ValueError``."""
    window = cfg.rollout.window_frames or horizon
    check(window <= horizon, f"rollout.window_frames ({window}) exceeds the teacher's horizon ({horizon}): "
                             "the teacher would score clips longer than it was trained on")
    num = cfg.rollout.num_frames or window
    if cfg.mode == "sfpp":
        check(num > window, f"mode sfpp needs rollout.num_frames ({num}) > window ({window})")
        check(window % chunk_frames == 0, f"mode sfpp needs a chunk-aligned window: {window} frames is not a "
                                          f"multiple of the chunk ({chunk_frames})")
        first = cfg.rollout.window_min_start
        check(first % chunk_frames == 0, f"rollout.window_min_start ({first}) must be a multiple of the chunk "
                                         f"({chunk_frames})")
        check(first <= num - window, f"rollout.window_min_start ({first}) leaves no window of {window} frames in a "
                                     f"rollout of {num}: it must be <= {num - window}")
    else:
        check(num == window, f"mode {cfg.mode} scores the whole rollout: num_frames {num} != window {window}")
        check(cfg.rollout.window_min_start == 0, f"rollout.window_min_start is for mode sfpp, not {cfg.mode}")
    return Geometry(num, window, horizon, cfg.rollout.window_min_start)


# ---------------------------------------------------------------- models
def load_models(cfg: SelfForcingConfig, preset: Preset) -> Models:
    """Load teacher, student-init and critic-init, refusing any that does not fit the preset or each other."""
    m = cfg.models
    teacher, teacher_meta = load_for_preset(m.teacher, preset, "teacher")
    student, student_meta = load_for_preset(m.student_init, preset, "student_init")
    critic_path = m.critic_init or m.teacher
    critic, critic_meta = load_for_preset(critic_path, preset, "critic_init")
    check_same_latent_space({"teacher": teacher_meta, "student_init": student_meta, "critic_init": critic_meta,
                             "data": {"vae_checkpoint": cfg.data.vae_checkpoint}})
    teacher.eval().requires_grad_(False)
    ema = CausalWanTransformer(cfg.model).requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    gan_head = None
    if cfg.losses.gan > 0:
        from trainer.losses.gan import GANHead

        gan_head = GANHead(preset.model.dim, hidden=cfg.losses.gan_hidden)
    return Models(student, ema, critic, teacher, gan_head, dict(student_meta), dict(teacher_meta))


# ---------------------------------------------------------------- loop
def allreduce_grads(params: list[nn.Parameter], rt: Runtime) -> None:
    """Average gradients over ranks (what DDP would do); a missing gradient counts as zero."""
    if rt.world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= rt.world_size


def _nan_message(what: str, step: int, value: float, last: Path | None) -> str:
    where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
    return (f"{what} is {value} at step {step}: stopped before the optimizer step; {where} "
            f"(resume from it with --resume, e.g. after lowering optim.lr)")


def _update(loss: torch.Tensor, what: str, step: int, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
            clip: float | None, rt: Runtime, last: Path | None) -> tuple[float, float]:
    """Backward, all-reduce, clip, NaN guard, optimizer step; returns (global mean loss, grad norm)."""
    mean_loss = rt.all_mean(loss)
    if rt.any_true(not bool(torch.isfinite(mean_loss))):
        raise NonFiniteLossError(_nan_message(f"{what} loss", step, mean_loss.item(), last))
    loss.backward()
    allreduce_grads(params, rt)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
    if rt.any_true(not bool(torch.isfinite(norm))):
        raise NonFiniteLossError(_nan_message(f"{what} gradient norm", step, norm.item(), last))
    optimizer.step()
    return mean_loss.item(), float(norm)


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in fp32_state(module).items()}


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


@dataclass
class SelfForcingResult:
    steps: int
    generator_steps: int
    losses: list[float] = field(default_factory=list)  # critic loss of every iteration run in this call
    generator_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    checkpoint: Path | None = None
    eval_history: list[dict[str, float]] = field(default_factory=list)


def train(cfg: SelfForcingConfig, resume: bool = False, export: bool = True) -> SelfForcingResult:
    """Check models and data, then run the two-optimizer loop to ``run.max_steps``; export the EMA student."""
    preset = get_preset(cfg.preset)
    horizon = teacher_horizon(cfg.models.teacher)
    geom = resolve_geometry(cfg, horizon, preset.sampler.chunk_frames)
    rt = make_runtime(cfg.run)
    cfg = resolve_config_precision(cfg, "self_forcing", log=rt.is_main)  # recorded resolved in checkpoints
    models = load_models(cfg, preset)
    data = ensure_latents(Path(cfg.data.latents_dir), cfg.data.spec(preset, horizon), cfg.data.encode_batch, rt)
    needed = geom.num_frames if cfg.mode in ("tf", "df") else geom.window_frames if cfg.losses.gan > 0 else 0
    check(data.latents.shape[2] >= needed, f"mode {cfg.mode} (gan {cfg.losses.gan}) needs ground-truth clips of "
          f"{needed} frames; {cfg.data.latents_dir} has {data.latents.shape[2]}")
    trainer = DistillStep(cfg, preset, geom, models, Batches(data, cfg.run.seed))
    g_params = [p for p in models.student.parameters() if p.requires_grad]
    c_params = [p for mod in critic_modules(models) for p in mod.parameters()]
    g_opt = torch.optim.AdamW(g_params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    c_opt = torch.optim.AdamW(c_params, lr=cfg.optim.lr * cfg.critic.lr_mult, betas=cfg.optim.betas,
                              weight_decay=cfg.optim.weight_decay)
    run_dir = cfg.run.run_dir
    start, gen_steps = 0, 0
    eval_history: list[dict[str, float]] = []
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is not None:
        state = ckpt.load(latest)
        try:
            load_state_strict(models.student, _unprefixed(state.model, "student"), f"checkpoint {latest} (student)")
            load_state_strict(models.critic, _unprefixed(state.model, "critic"), f"checkpoint {latest} (critic)")
            if models.gan_head is not None:
                load_state_strict(models.gan_head, _unprefixed(state.model, "gan_head"),
                                  f"checkpoint {latest} (gan_head)")
            load_state_strict(models.ema, state.ema, f"checkpoint {latest} (ema)")
            g_opt.load_state_dict(state.optimizer["generator"])
            c_opt.load_state_dict(state.optimizer["critic"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume from {latest}: {exc}") from exc
        gen_steps = int(state.optimizer.get("generator_steps", 0))
        if rt.rank in state.rng and len(state.rng) == rt.world_size:
            ckpt.set_rng_state(state.rng[rt.rank])
        start = state.step
        eval_history = list(state.extra.get("eval_history", []))  # report.json lists the whole run's evaluations
        if rt.is_main:
            print(f"resuming from {latest} (step {start})", flush=True)
    elif resume:  # a typo in run.name must not silently start a new run
        raise ValueError(nothing_to_resume(cfg.run))
    elif latest is not None:
        raise ValueError(existing_run(run_dir, latest))
    result = SelfForcingResult(steps=start, generator_steps=gen_steps, checkpoint=latest if resume else None,
                               eval_history=eval_history)

    def save(step: int) -> None:
        rngs = rt.gather_objects(ckpt.rng_state())
        if rt.is_main:
            weights = _prefixed("student", models.student) | _prefixed("critic", models.critic)
            if models.gan_head is not None:
                weights |= _prefixed("gan_head", models.gan_head)
            state = ckpt.RunState(step=step, model=weights, ema=fp32_state(models.ema),
                                  optimizer={"generator": g_opt.state_dict(), "critic": c_opt.state_dict(),
                                             "generator_steps": result.generator_steps},
                                  config=to_dict(cfg), rng=dict(enumerate(rngs)),
                                  extra={"eval_history": result.eval_history})
            result.checkpoint = ckpt.save(run_dir, state, cfg.run.keep_checkpoints)
        rt.barrier()

    per_rank = cfg.global_batch // rt.world_size
    logger = TrainLogger(rt, run_dir, cfg.run.max_steps, start, per_rank)
    t_start = time.perf_counter()
    last_gen: dict[str, float] = {}
    try:
        for step in range(start, cfg.run.max_steps):
            lr = lr_at(step, cfg.optim, cfg.run.max_steps)
            for group in g_opt.param_groups:
                group["lr"] = lr
            for group in c_opt.param_groups:
                group["lr"] = lr * cfg.critic.lr_mult
            ids = local_indices(step, cfg.global_batch, rt)
            text_emb = trainer.batches.text(ids)
            window = None
            if step % cfg.dmd.gen_every == 0:
                for mod in critic_modules(models):
                    mod.requires_grad_(False)
                models.student.train()
                g_opt.zero_grad(set_to_none=True)
                window = trainer.generate(step, 0, ids, text_emb, grad=True)
                g_loss, parts = trainer.generator_loss(step, ids, window, text_emb)
                value, norm = _update(g_loss, "generator", step, g_params, g_opt, cfg.optim.grad_clip, rt,
                                      result.checkpoint)
                for mod in critic_modules(models):
                    mod.requires_grad_(True)
                ema_update(models.ema, models.student, cfg.optim.ema_decay, result.generator_steps)
                result.generator_steps += 1
                result.generator_losses.append(value)
                last_gen = {"generator": value, "generator_grad_norm": norm, **parts}
            c_parts: dict[str, float] = {}
            for turn in range(cfg.critic.steps):
                x = window.detach() if (turn == 0 and window is not None) else \
                    trainer.generate(step, turn + 1, ids, text_emb, grad=False)
                c_opt.zero_grad(set_to_none=True)
                c_loss, c_parts = trainer.critic_loss(step, turn, ids, x, text_emb)
                c_value, c_norm = _update(c_loss, "critic", step, c_params, c_opt, cfg.critic.grad_clip, rt,
                                          result.checkpoint)
            result.steps = step + 1
            result.losses.append(c_value)
            log = (step + 1) % cfg.run.log_every == 0 or step == start
            logger.step(step, {"loss": c_value, "critic_grad_norm": c_norm, "lr": lr, **c_parts, **last_gen}, log)
            if cfg.eval.every is not None and (step + 1) % cfg.eval.every == 0 and rt.is_main:
                scores = evaluate_student(cfg, preset, geom, models.ema, trainer.batches)
                result.eval_history.append({"step": float(step + 1), **scores})
                for key, value in scores.items():
                    logger.scalar(f"eval/{key}", value, step + 1)
            over = cfg.run.max_minutes is not None and (time.perf_counter() - t_start) > 60 * cfg.run.max_minutes
            over = rt.any_true(over)
            if (step + 1) % cfg.run.save_every == 0 or step + 1 == cfg.run.max_steps or over:
                save(step + 1)
            if over:
                result.stopped_early = True
                if rt.is_main:
                    print(f"\nwall-clock budget of {cfg.run.max_minutes} min reached at step {step + 1}; "
                          "checkpoint saved", flush=True)
                break
    finally:
        logger.close()
    if export and rt.is_main:
        export_student(cfg, preset, geom, models, result)
    rt.barrier()
    return result


def export_student(cfg: SelfForcingConfig, preset: Preset, geom: Geometry, models: Models,
                   result: SelfForcingResult) -> None:
    """Save the EMA student as a streamgen ``transformer`` checkpoint (what ``streamgen serve`` loads)."""
    meta = {"stage": "self_forcing", "mode": cfg.mode, "preset": preset.name, "teacher": cfg.models.teacher,
            "student_init": cfg.models.student_init, "train_steps": str(result.steps),
            "generator_steps": str(result.generator_steps), "rollout_frames": str(geom.num_frames),
            "window_frames": str(geom.window_frames), "num_latent_frames": str(geom.teacher_horizon)}
    if "vae_checkpoint" in models.teacher_meta:
        meta["vae_checkpoint"] = models.teacher_meta["vae_checkpoint"]
    save_checkpoint(models.ema, cfg.export_path, kind="transformer", config=cfg.model, extra_metadata=meta,
                    dtype=torch.bfloat16 if cfg.export_dtype == "bf16" else None)
    report = {"mode": cfg.mode, "steps": result.steps, "generator_steps": result.generator_steps,
              "final_critic_loss": result.losses[-1] if result.losses else None,
              "final_generator_loss": result.generator_losses[-1] if result.generator_losses else None,
              "export_path": cfg.export_path, "eval": result.eval_history}
    cfg.run.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"exported EMA student ({cfg.mode}) to {cfg.export_path}", flush=True)


@torch.no_grad()
def evaluate_student(cfg: SelfForcingConfig, preset: Preset, geom: Geometry, model: CausalWanTransformer,
                     batches: Batches) -> dict[str, float]:
    """Trainer I's suite on a few short clips of the EMA student: flag rates (and adherence with the classifier).

    Prompts are the captions of the latent dataset's first clips (their embeddings are stored, so no
    text encoder is loaded); clips are generated exactly as served (``generate_latents``, 4 steps).
    """
    from streamgen.model.weights import load_vae
    from streamgen.video_io import frames_to_uint8
    from trainer.eval.suite import Video, evaluate_set

    num_latent = cfg.eval.num_latent_frames or geom.num_frames
    vae = load_vae(cfg.data.vae_checkpoint, expected=preset.vae).eval()
    classifier = None
    if cfg.eval.classifier is not None and Path(cfg.eval.classifier).is_file():
        from trainer.eval.classifier import load_classifier

        classifier = load_classifier(cfg.eval.classifier)
    videos = []
    data = batches.data
    model.eval()
    for i in range(cfg.eval.num_prompts):
        clip = i % len(data)
        emb = data.text_emb[data.caption_ids[clip]][None]
        chunks = list(generate_latents(model, model.encode_text(emb), preset, num_latent,
                                       torch.Generator().manual_seed(cfg.eval.seed + i)))
        video = vae.decode(vae.from_diffusion(torch.cat(chunks, dim=2).float()))
        videos.append(Video(f"eval_{i}", frames_to_uint8(video[0]), float(preset.video.fps), data.captions[clip]))
    result = evaluate_set(videos, classifier)
    scores = {f"flag_rate/{k}": v for k, v in result.flag_rates.items()}
    for metric, summary in result.summary_means.items():
        scores.update({f"{metric}/{k}": v for k, v in summary.items() if math.isfinite(v)})
    if result.adherence_per_head:
        scores["adherence"] = result.adherence_per_head["mean"]
    return scores


# ---------------------------------------------------------------- smoke-run assets
def bootstrap_tiny(cfg: SelfForcingConfig, horizon: int = 6, seed: int = 0) -> None:
    """Create what a ``test``-preset smoke run needs, where the config points, if it is missing.

    A random VAE with unit latent stats, a latent dataset of rendered clips encoded by it (prompts
    embedded with the model-free hash encoder), and a random teacher whose metadata records the
    horizon (``data.num_latent_frames`` or ``horizon``) and is also the student init. Nothing here
    is trained: it exercises every code path in seconds, it does not make a useful model.
    """
    import shutil

    from streamgen.model.text import HashTokenEncoder
    from streamgen.model.vae import CausalVideoVAE
    from trainer.common.latents import LatentStats

    preset = get_preset(cfg.preset)
    check(preset.name == "test", "bootstrap_tiny is only for the 'test' preset")
    frames = cfg.data.num_latent_frames or horizon
    vae_path, teacher_path = Path(cfg.data.vae_checkpoint), Path(cfg.models.teacher)
    if not vae_path.is_file():
        torch.manual_seed(seed)
        channels = preset.vae.latent_channels
        save_checkpoint(CausalVideoVAE(preset.vae), vae_path, kind="vae", config=preset.vae,
                        extra_metadata=LatentStats((0.0,) * channels, (1.0,) * channels).metadata())
    latent_data.build(Path(cfg.data.latents_dir), cfg.data.spec(preset, frames), batch=4, log=False,
                      token_encoder=HashTokenEncoder())
    if not teacher_path.is_file():
        torch.manual_seed(seed)
        teacher = CausalWanTransformer(preset.model)
        with torch.no_grad():  # a zero output head would predict zero velocity everywhere
            for p in teacher.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_checkpoint(teacher, teacher_path, kind="transformer", config=preset.model,
                        extra_metadata={"num_latent_frames": str(frames), "vae_checkpoint": str(vae_path),
                                        "preset": preset.name, "stage": "bootstrap (random)"})
    for path in (cfg.models.student_init, cfg.models.critic_init):
        if path is not None and not Path(path).is_file():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(teacher_path, path)


# ---------------------------------------------------------------- CLI
def check_setup(cfg: SelfForcingConfig) -> Geometry:
    """Every check that needs only checkpoint metadata/headers: run it before any work (also in ``main``)."""
    preset = get_preset(cfg.preset)
    for what, path in (("teacher", cfg.models.teacher), ("student_init", cfg.models.student_init),
                       ("critic_init", cfg.models.critic_init or cfg.models.teacher)):
        if not Path(path).is_file():
            raise ValueError(f"models.{what} checkpoint {path} does not exist")
        read_metadata(path)
    horizon = teacher_horizon(cfg.models.teacher)
    geom = resolve_geometry(cfg, horizon, preset.sampler.chunk_frames)
    check_latents_spec(Path(cfg.data.latents_dir), cfg.data.spec(preset, horizon))
    if cfg.losses.regression > 0 and not (Path(cfg.losses.regression_pairs) / "manifest.json").is_file():
        raise ValueError(f"losses.regression > 0 needs ODE pairs in {cfg.losses.regression_pairs} "
                         "(make them with python -m trainer.ode_init --pairs-only)")
    return geom


def inputs(cfg: SelfForcingConfig, args: argparse.Namespace) -> list[Input]:
    """What a run reads: ``--check`` lists it, and a missing required input stops the run before any work."""
    preset = get_preset(cfg.preset)
    m = cfg.models
    found = [file_input("models.teacher", m.teacher, checkpoint_command("trainer.teacher", m.teacher)),
             file_input("models.student_init", m.student_init, checkpoint_command("trainer.ode_init", m.student_init))]
    if m.critic_init is not None:
        found.append(file_input("models.critic_init", m.critic_init,
                                checkpoint_command("trainer.teacher", m.critic_init)))
    horizon = teacher_horizon(m.teacher) if found[0].present else None
    found += student_data_inputs(cfg.data, preset, horizon)
    decodes = cfg.eval.every is not None or (cfg.losses.regression > 0 and cfg.losses.regression_kind == "lpips")
    if decodes and not any(i.key == "data.vae_checkpoint" for i in found):
        found.append(file_input("data.vae_checkpoint", cfg.data.vae_checkpoint,
                                checkpoint_command("trainer.vae", cfg.data.vae_checkpoint)))
    if cfg.losses.regression > 0:
        pairs = Path(cfg.losses.regression_pairs)
        found.append(Input("losses.regression_pairs", pairs, (pairs / "manifest.json").is_file(),
                           "make the teacher's ODE pairs with " + stage_command(
                               "trainer.ode_init", "configs/ode_init_default.yaml",
                               {"teacher": m.teacher, "pairs.dir": pairs}, "--pairs-only")))
    if cfg.eval.every is not None and cfg.eval.classifier is not None:
        found.append(file_input("eval.classifier", cfg.eval.classifier,
                                checkpoint_command("trainer.eval.classifier", cfg.eval.classifier),
                                optional="evaluation reports no prompt adherence"))
    return found + run_inputs(cfg.run, args.resume)


def build_parser() -> argparse.ArgumentParser:
    p = stage_parser(
        SelfForcingConfig, prog="python -m trainer.self_forcing",
        description="Distil the causal 4-step student with DMD against the bidirectional teacher, on its own "
                    "KV-cache rollouts (mode sf: Self-Forcing; sfpp: Self-Forcing++ long rollouts scored in "
                    "teacher-length windows) or on ground-truth context (tf: Teacher Forcing; df: Diffusion "
                    "Forcing baselines). --resume restores student, critic, both optimizers, EMA and RNG. "
                    "Exports the EMA student as a 'transformer' checkpoint. Run dir: <run.runs_dir>/<run.name>/ "
                    "(checkpoints/, tb/, report.json).",
        no_export_help="train only; skip the export")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run(cfg: SelfForcingConfig) -> None:
        if cfg.models.bootstrap:
            bootstrap_tiny(cfg)
        preflight(inputs(cfg, args), check=args.check)  # every missing input, with the command that makes it
        geom = check_setup(cfg)  # every mismatch is refused here, before models are built
        if args.check:
            print(json.dumps({"mode": cfg.mode, "rollout_frames": geom.num_frames,
                              "window_frames": geom.window_frames, "teacher_horizon": geom.teacher_horizon}))
        else:
            train(cfg, resume=args.resume, export=not args.no_export)

    return run_stage(SelfForcingConfig, args, run)


if __name__ == "__main__":
    sys.exit(main())
