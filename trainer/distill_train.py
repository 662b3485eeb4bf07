"""Self-Forcing training: load the four networks, plug the generator/critic step into the shared loop, export.

:func:`train` runs :class:`DistillTrainStep` through :func:`trainer.common.runtime.run_steps` (the loop
every stage shares: LR schedule, resume, checkpoints, NaN guard, logging, wall-clock budget). The step
holds the two AdamW optimizers: the critic updates every iteration (``critic.steps`` times), the
generator every ``dmd.gen_every``-th, followed by its EMA; the iteration's tensors come from
:mod:`trainer.distill_step`.

Gradients are all-reduced by hand (no DDP wrapper): a rollout calls the student many times per
backward, which DDP's reducer does not allow, and the exit step and window are drawn from keys
shared by all ranks, so every rank builds the same graph shape.

Everything trains on ``rt.device`` (``run.device``): the four networks (and the GAN head) are moved
there before the optimizers are built, so optimizer state lives there too; batches and noise follow
(:mod:`trainer.distill_step`). ``bf16`` is autocast on that device over fp32 weights, the models are
never wrapped by accelerate. Checkpoints and the export are written from CPU copies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from streamgen.config import Preset, get_preset, to_dict
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_state_strict
from trainer.common import checkpoint as ckpt
from trainer.common.checkpoint import CheckpointError
from trainer.common.config import check
from trainer.common.precision import resolve_config_precision
from trainer.common.runtime import (
    Runtime,
    StepState,
    TrainStep,
    ema_update,
    fp32_state,
    local_indices,
    make_runtime,
    optimizer_update,
    run_steps,
)
from trainer.common.sharding import full_optimizer_state, load_optimizer_state, set_requires_grad
from trainer.distill_config import Geometry, SelfForcingConfig, resolve_geometry
from trainer.distill_export import SelfForcingResult, evaluate_student, export_student
from trainer.distill_step import Batches, DistillStep, Models, critic_modules
from trainer.ode_init import check_same_latent_space, ensure_latents, load_for_preset, teacher_horizon


def load_models(cfg: SelfForcingConfig, preset: Preset, device: torch.device | str = "cpu") -> Models:
    """Load teacher, student-init and critic-init, refusing any that does not fit the preset or each other;
    every network ends on ``device``."""
    m = cfg.models
    teacher, teacher_meta = load_for_preset(m.teacher, preset, "teacher")
    student, student_meta = load_for_preset(m.student_init, preset, "student_init")
    critic_path = m.critic_init or m.teacher
    critic, critic_meta = load_for_preset(critic_path, preset, "critic_init")
    check_same_latent_space({"teacher": teacher_meta, "student_init": student_meta, "critic_init": critic_meta,
                             "data": {"vae_checkpoint": cfg.data.vae_checkpoint}})
    teacher.eval().requires_grad_(False)
    for trained in (student, critic):  # forwards through a KV cache (the rollout's) never checkpoint
        trained.set_gradient_checkpointing(cfg.run.gradient_checkpointing)
    ema = CausalWanTransformer(student.cfg).requires_grad_(False)  # the student's own layout (frame embeddings)
    ema.load_state_dict(student.state_dict())
    gan_head = None
    if cfg.losses.gan > 0:
        from trainer.losses.gan import GANHead

        with torch.random.fork_rng(devices=[]):  # the same initial head on every rank and in every run
            torch.manual_seed(cfg.run.seed)
            gan_head = GANHead(preset.model.dim, hidden=cfg.losses.gan_hidden).to(device)
    for model in (student, ema, critic, teacher):
        model.to(device)
    return Models(student, ema, critic, teacher, gan_head, dict(student_meta), dict(teacher_meta))


class DistillTrainStep(TrainStep):
    """One DMD iteration with two optimizers, and what a checkpoint keeps of it.

    Checkpoint layout: ``model`` holds ``student.*``, ``critic.*`` (and ``gan_head.*``), ``ema`` the
    EMA student, ``optimizer`` both optimizers' states and ``generator_steps``, ``extra`` the
    evaluation history (so a resumed run's report lists the whole run's evaluations).
    """

    def __init__(self, rt: Runtime, cfg: SelfForcingConfig, preset: Preset, geom: Geometry, models: Models,
                 pieces: DistillStep) -> None:
        self.rt, self.cfg, self.preset, self.geom, self.m, self.pieces = rt, cfg, preset, geom, models, pieces
        self.g_params = [p for p in models.student.parameters() if p.requires_grad]
        self.c_params = [p for mod in critic_modules(models) for p in mod.parameters()]
        self.g_opt = torch.optim.AdamW(self.g_params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                       weight_decay=cfg.optim.weight_decay)
        self.c_opt = torch.optim.AdamW(self.c_params, lr=cfg.optim.lr * cfg.critic.lr_mult, betas=cfg.optim.betas,
                                       weight_decay=cfg.optim.weight_decay)
        self.generator_steps = 0
        self.generator_losses: list[float] = []  # of every generator update run in this call
        self.eval_history: list[dict[str, float]] = []
        self.last_generator: dict[str, float] = {}  # logged with every iteration until the next generator update

    def __call__(self, step: int, lr: float, last: Path | None) -> dict[str, float]:
        cfg, m, pieces, rt = self.cfg, self.m, self.pieces, self.rt
        for group in self.g_opt.param_groups:
            group["lr"] = lr
        for group in self.c_opt.param_groups:
            group["lr"] = lr * cfg.critic.lr_mult
        ids = local_indices(step, cfg.global_batch, rt)
        text_emb = pieces.batches.text(ids)
        window = None
        if step % cfg.dmd.gen_every == 0:
            for mod in critic_modules(m):
                set_requires_grad(mod, False)
            m.student.train()
            self.g_opt.zero_grad(set_to_none=True)
            window = pieces.generate(step, 0, ids, text_emb, grad=True)
            g_loss, parts = pieces.generator_loss(step, ids, window, text_emb)
            value, norm = optimizer_update(rt, g_loss, self.g_params, self.g_opt, cfg.optim.grad_clip, step, last,
                                           what="generator", sync_grads=True)
            for mod in critic_modules(m):
                set_requires_grad(mod, True)
            ema_update(m.ema, m.student, cfg.optim.ema_decay, self.generator_steps)
            self.generator_steps += 1
            self.generator_losses.append(value)
            self.last_generator = {"generator": value, "generator_grad_norm": norm, **host_scalars(parts)}
        c_parts: dict[str, torch.Tensor] = {}
        for turn in range(cfg.critic.steps):
            x = window.detach() if (turn == 0 and window is not None) else \
                pieces.generate(step, turn + 1, ids, text_emb, grad=False)
            self.c_opt.zero_grad(set_to_none=True)
            c_loss, c_parts = pieces.critic_loss(step, turn, ids, x, text_emb)
            c_value, c_norm = optimizer_update(rt, c_loss, self.c_params, self.c_opt, cfg.critic.grad_clip, step,
                                               last, what="critic", sync_grads=True)
        return {"loss": c_value, "critic_grad_norm": c_norm, **host_scalars(c_parts), **self.last_generator}

    def after_step(self, done: int) -> dict[str, float]:
        """Every ``eval.every`` steps, on rank 0: evaluate the EMA student (logged as ``eval/*``)."""
        every = self.cfg.eval.every
        if every is None or done % every or not self.rt.is_main:
            return {}
        scores = evaluate_student(self.cfg, self.preset, self.geom, self.m.ema, self.pieces.batches)
        self.eval_history.append({"step": float(done), **scores})
        return {f"eval/{key}": value for key, value in scores.items()}

    def state(self) -> StepState:
        """The checkpoint's contents on rank 0; with FSDP the other ranks join the all-gathers, keep nothing."""
        m, keep = self.m, self.rt.is_main
        weights = _prefixed("student", m.student, keep) | _prefixed("critic", m.critic, keep)
        if m.gan_head is not None:
            weights |= _prefixed("gan_head", m.gan_head, keep)
        return StepState(model=weights, ema=fp32_state(m.ema) if keep else {},
                         optimizer={"generator": full_optimizer_state(self.g_opt, keep),
                                    "critic": full_optimizer_state(self.c_opt, keep),
                                    "generator_steps": self.generator_steps},
                         extra={"eval_history": self.eval_history})

    def restore(self, state: ckpt.RunState, path: Path) -> None:
        m = self.m
        try:
            load_state_strict(m.student, _unprefixed(state.model, "student"), f"checkpoint {path} (student)")
            load_state_strict(m.critic, _unprefixed(state.model, "critic"), f"checkpoint {path} (critic)")
            if m.gan_head is not None:
                load_state_strict(m.gan_head, _unprefixed(state.model, "gan_head"), f"checkpoint {path} (gan_head)")
            load_state_strict(m.ema, state.ema, f"checkpoint {path} (ema)")
            load_optimizer_state(self.g_opt, state.optimizer["generator"])
            load_optimizer_state(self.c_opt, state.optimizer["critic"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}") from exc
        self.generator_steps = int(state.optimizer.get("generator_steps", 0))
        self.eval_history = list(state.extra.get("eval_history", []))  # report.json lists the whole run's


def host_scalars(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss parts (detached scalars on the device) as floats for the log, read in one device-to-host copy."""
    if not parts:
        return {}
    values = torch.stack([v.detach().float() for v in parts.values()]).tolist()
    return dict(zip(parts, values, strict=True))


def _prefixed(prefix: str, module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in fp32_state(module, keep).items()}


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def train(cfg: SelfForcingConfig, resume: bool = False, export: bool = True) -> SelfForcingResult:
    """Check models and data, then run :class:`DistillTrainStep` to ``run.max_steps``; export the EMA student."""
    preset = get_preset(cfg.preset)
    horizon = teacher_horizon(cfg.models.teacher)
    geom = resolve_geometry(cfg, horizon, preset.sampler.chunk_frames)
    rt = make_runtime(cfg.run, cfg.precision)
    cfg = resolve_config_precision(cfg, "self_forcing", log=rt.is_main, device=rt.device)  # recorded in checkpoints
    models = load_models(cfg, preset, rt.device)
    for trained in (models.student, models.critic):  # FSDP (run.parallel fsdp): before the optimizers are built
        rt.shard(trained)
    data = ensure_latents(Path(cfg.data.latents_dir), cfg.data.spec(preset, horizon), cfg.data.encode_batch, rt)
    needed = geom.num_frames if cfg.mode in ("tf", "df") else geom.window_frames if cfg.losses.gan > 0 else 0
    check(data.latents.shape[2] >= needed, f"mode {cfg.mode} (gan {cfg.losses.gan}) needs ground-truth clips of "
          f"{needed} frames; {cfg.data.latents_dir} has {data.latents.shape[2]}")
    pieces = DistillStep(cfg, preset, geom, models, Batches(data, cfg.run.seed, rt.device))
    step = DistillTrainStep(rt, cfg, preset, geom, models, pieces)
    loop = run_steps(rt, cfg.run, cfg.optim, step, to_dict(cfg), resume, cfg.global_batch // rt.world_size)
    result = SelfForcingResult(steps=loop.step, generator_steps=step.generator_steps, losses=loop.losses,
                               generator_losses=step.generator_losses, stopped_early=loop.stopped_early,
                               checkpoint=loop.checkpoint, eval_history=step.eval_history)
    if export and rt.is_main:
        export_student(cfg, preset, geom, models, result)
    rt.barrier()
    return result
