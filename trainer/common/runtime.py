"""The training runtime shared by all stages: processes, randomness, the step loop, logging.

* **Processes and device.** :func:`make_runtime` builds an ``accelerate.Accelerator`` (one process,
  or several under ``accelerate launch``: gloo on CPU, NCCL on GPUs, one GPU per process) on
  ``run.device`` (``auto``: CUDA where available). On CUDA a ``bf16`` precision becomes accelerate's
  ``mixed_precision="bf16"`` (autocast over fp32 master weights). Gradients are synchronised by
  DDP, or with ``run.parallel: fsdp`` (or a launch with ``configs/accelerate/fsdp_wan1.3b.yaml``) the
  DiT stages shard their trained transformers with FSDP2 (:mod:`trainer.common.sharding`; checkpoints
  stay full and interchangeable with DDP's). The *global* batch is fixed by config; each rank takes a
  contiguous ``global / world_size`` slice of the step's sample indices.
* **Randomness.** Everything random about sample ``i`` of step ``s`` (crop, noise, timestep,
  prompt dropout) comes from a generator seeded on ``(seed, s, i, stream)``, never from
  global RNG state. Hence a resumed run replays exactly, and 1 or N processes see the same
  samples and noise; only the order of floating-point reductions differs.
* **Loop.** :func:`run_steps` is every stage's loop: warmup/cosine LR, resume, periodic atomic
  checkpoints, a wall-clock budget, a tqdm bar with loss and clips/s, and TensorBoard scalars.
  The stage plugs in a :class:`TrainStep`: :func:`run_loop`'s :class:`ModelStep` (one model:
  backward, clipping, AdamW, EMA) or the Self-Forcing generator/critic step. Both update through
  :func:`optimizer_update`, the one NaN guard (a non-finite loss or gradient stops the run *before*
  the optimizer step; the last checkpoint stays the latest).
* **Command line.** :func:`stage_parser` and :func:`run_stage`: the flags (``--config``,
  ``--set``, ``--resume``, ``--check``, ``--no-export``) and exit codes (0 done, 1 training failed,
  2 bad config, arguments, launch or missing inputs) that every ``python -m trainer.<stage>`` shares.
* **Launch.** A launcher asked for N processes that started another number is refused
  (:func:`launch_mismatch`) instead of training silently on fewer.

This module never builds models or data; stages hand it a ``step_fn`` or a :class:`TrainStep`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from streamgen.device import device_info, resolve_device
from streamgen.precision import resolve_precision
from trainer.common import checkpoint as ckpt
from trainer.common.config import OptimConfig, RunConfig, describe_config, load_config
from trainer.common.preflight import existing_run, nothing_to_resume
from trainer.common.sharding import (
    clip_grad_norm,
    full,
    full_optimizer_state,
    is_dtensor,
    load_optimizer_state,
    shard_transformer,
)

T = TypeVar("T")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stopped before the optimizer step."""


@dataclass
class Runtime:
    accelerator: Accelerator
    rank: int
    world_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank's model runs
    precision: str = "fp32"  # "bf16" or "fp32", resolved for ``device``
    fsdp: bool = False  # shard the DiT stages' trained transformers (FSDP2) instead of DDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, model: nn.Module) -> nn.Module:
        """With FSDP, shard a transformer over the ranks (before its optimizer is built); else leave it."""
        if self.fsdp:
            shard_transformer(model, self.world_size, self.device, self.precision == "bf16")
        return model

    def prepare(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """``accelerator.prepare`` (DDP across ranks); with FSDP the model is already sharded by :meth:`shard`
        and gradients reduce-scatter in its backward, so nothing is wrapped."""
        if self.fsdp:
            return wrapper, optimizer
        return self.accelerator.prepare(wrapper, optimizer)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over ranks (a copy; autograd-free)."""
        value = value.detach().float().clone()
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (so every rank takes the same branch)."""
        return self.any_each(flag)[0]

    def any_each(self, *flags: bool) -> tuple[bool, ...]:
        """:meth:`any_true` of each flag, in one all-reduce."""
        if self.world_size == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return tuple(v > 0 for v in t.tolist())

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def make_runtime(cfg: RunConfig, precision: str = "fp32") -> Runtime:
    """One ``Accelerator`` per process on ``cfg.device``, with ``precision`` (``auto``/``bf16``/``fp32``)
    resolved for that device; threads per process from config, else the cores split between processes.

    Single process: the configured device (``cuda:N`` included). Several processes: accelerate gives
    each rank its GPU (``LOCAL_RANK``), so a fixed ``cuda:N`` is refused there.
    """
    torch.set_num_threads(cfg.num_threads or default_threads())
    device = resolve_device(cfg.device)
    resolved, reason = resolve_precision(precision, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and world > 1 and cfg.device.startswith("cuda:"):
        raise ValueError(f"run.device {cfg.device} names one GPU but this launch has {world} processes; use "
                         "run.device auto or cuda (each process takes its own GPU; choose them with "
                         "CUDA_VISIBLE_DEVICES or accelerate's --gpu_ids)")
    if device.type == "cuda" and world == 1:
        torch.cuda.set_device(device)  # accelerate's single-process device is "cuda", the current one
    # Never cpu=True off the CPU: on CUDA accelerate places prepared models on this rank's GPU (NCCL).
    accelerator = Accelerator(cpu=device.type == "cpu",
                              mixed_precision="bf16" if device.type == "cuda" and resolved == "bf16" else "no")
    mismatch = launch_mismatch(accelerator.num_processes)
    if mismatch is not None:
        raise LaunchError(mismatch)
    fsdp = cfg.parallel == "fsdp" or accelerator.distributed_type == DistributedType.FSDP
    if fsdp and accelerator.num_processes < 2:
        raise LaunchError("FSDP shards the model over processes, but this launch has 1; launch several (e.g. "
                          "accelerate launch --multi_gpu --num_processes 2 ...) or use run.parallel ddp")
    if device.type == "cuda" and accelerator.num_processes > 1:
        device = accelerator.device
    rt = Runtime(accelerator, accelerator.process_index, accelerator.num_processes, device, resolved, fsdp)
    if rt.is_main:
        print(f"runtime: {rt.world_size} process(es) x {torch.get_num_threads()} thread(s), "
              f"backend {accelerator.distributed_type}{' + FSDP2 (sharded DiT)' if fsdp else ''}, "
              f"device {device_info(device).describe()}, precision {resolved} ({reason})", flush=True)
    return rt


def local_indices(step: int, global_batch: int, rt: Runtime) -> list[int]:
    """Global sample indices of ``step`` that this rank processes (a contiguous slice)."""
    if global_batch % rt.world_size:
        raise ValueError(f"global batch {global_batch} must be divisible by the number of processes {rt.world_size}")
    per_rank = global_batch // rt.world_size
    first = step * global_batch + rt.rank * per_rank
    return list(range(first, first + per_rank))


def sample_generator(seed: int, step: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for sample ``index`` of ``step``; ``stream`` separates independent draws."""
    state = np.random.SeedSequence([seed, step, index, stream]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class EpochOrder:
    """Global sample index -> dataset item: every item once per epoch, in an order seeded on
    ``(seed, epoch, stream)`` (like the draws of :func:`sample_generator`, the same on resume and on
    any number of processes). Only the latest epoch's permutation is kept."""

    def __init__(self, num_items: int, seed: int, stream: int) -> None:
        self.num_items, self.seed, self.stream = num_items, seed, stream
        self._orders: dict[int, torch.Tensor] = {}

    def __call__(self, sample: int) -> int:
        epoch = sample // self.num_items
        if epoch not in self._orders:
            g = sample_generator(self.seed, epoch, 0, stream=self.stream)
            self._orders = {epoch: torch.randperm(self.num_items, generator=g)}
        return int(self._orders[epoch][sample % self.num_items])


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant or cosine down to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema = d * ema + (1 - d) * model`` with ``d`` ramped up early (short runs still get a useful EMA)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(full(p.detach()).float(), 1 - d)  # a sharded parameter is all-gathered (every rank calls this)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def fp32_state(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of ``module``'s whole state (checkpoints are written from the CPU, whatever the
    device); collective for a sharded module, where ``keep=False`` (a rank that does not write the
    checkpoint) joins the all-gathers and keeps nothing: a full copy on every rank would cost the host
    memory sharding saves."""
    out = {}
    for k, v in module.state_dict().items():
        whole = full(v.detach())
        if keep:
            out[k] = whole.float().cpu().clone()
    return out


class TrainLogger:
    """tqdm bar (loss, clips/s) and TensorBoard scalars on rank 0; silent elsewhere."""

    def __init__(self, rt: Runtime, run_dir: Path, total: int, initial: int, clips_per_step: int) -> None:
        self.enabled = rt.is_main
        self.clips_per_step = clips_per_step
        self.writer = SummaryWriter(str(run_dir / "tb")) if self.enabled else None
        self.bar = tqdm(total=total, initial=initial, disable=not self.enabled, dynamic_ncols=True,
                        mininterval=2.0)
        self.t0, self.steps = time.perf_counter(), 0

    def step(self, step: int, scalars: dict[str, float], log: bool) -> None:
        self.steps += 1
        if not self.enabled:
            return
        self.bar.update(1)
        if log:
            rate = self.clips_per_step * self.steps / max(1e-9, time.perf_counter() - self.t0)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", clips_s=f"{rate:.2f}")
            assert self.writer is not None
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.add_scalar("train/clips_per_s", rate, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StepState:
    """What a checkpoint keeps of a :class:`TrainStep`: trainable weights (fp32), EMA, optimizer state, extras."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class TrainStep:
    """What :func:`run_steps` trains: one iteration's work and what a checkpoint holds of it.

    :class:`ModelStep` (one model, one optimizer) serves the VAE, teacher and ODE-init stages;
    :class:`trainer.distill_train.DistillTrainStep` (generator and critic, two optimizers) the
    Self-Forcing stage. The loop owns everything else: schedule, resume, checkpoints, logging, budget.
    """

    def __call__(self, step: int, lr: float, last: Path | None) -> dict[str, float]:
        """Run iteration ``step`` at scheduled learning rate ``lr``; return the scalars to log, ``"loss"``
        (the global mean the run reports) among them. ``last`` is the latest checkpoint, for the NaN guard."""
        raise NotImplementedError

    def state(self) -> StepState:
        raise NotImplementedError

    def restore(self, state: ckpt.RunState, path: Path) -> None:
        """Load ``state`` (read from checkpoint ``path``); a mismatch raises :class:`CheckpointError`."""
        raise NotImplementedError

    def after_step(self, done: int) -> dict[str, float]:
        """Scalars to log under their own tags at step ``done`` (e.g. a periodic evaluation); none by default."""
        return {}


def allreduce_grads(params: list[nn.Parameter], rt: Runtime) -> None:
    """Average gradients over ranks (what DDP would do); a missing gradient counts as zero."""
    if rt.world_size == 1:
        return
    for p in params:
        if is_dtensor(p):
            continue  # FSDP already reduce-scattered (and averaged) it in the backward
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= rt.world_size


def optimizer_update(rt: Runtime, loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                     clip: float | None, step: int, last: Path | None, what: str = "",
                     sync_grads: bool = False) -> tuple[float, float]:
    """Backward, clip, NaN guard, optimizer step; returns (global mean loss, gradient norm).

    A non-finite loss or gradient norm on any rank raises :class:`NonFiniteLossError` before the
    optimizer steps, naming ``last`` (the latest checkpoint, left intact). ``sync_grads`` averages the
    gradients over ranks by hand, for models that no DDP wrapper synchronises; ``what`` names the loss.
    """
    name = f"{what} " if what else ""
    mean_loss = rt.all_mean(loss)
    if rt.any_true(not bool(torch.isfinite(mean_loss))):
        raise NonFiniteLossError(_nan_message(f"{name}loss", step, mean_loss.item(), last))
    loss.backward()
    if sync_grads:
        allreduce_grads(params, rt)
    norm = clip_grad_norm(params, clip if clip is not None else float("inf"))
    if rt.any_true(not bool(torch.isfinite(norm))):
        raise NonFiniteLossError(_nan_message(f"{name}gradient norm", step, norm.item(), last))
    optimizer.step()
    return mean_loss.item(), float(norm)


def _nan_message(what: str, step: int, value: float, last: Path | None) -> str:
    where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
    return (f"{what} is {value} at step {step}: stopped before the optimizer step; {where} "
            f"(resume from it with --resume, e.g. after lowering optim.lr)")


class ModelStep(TrainStep):
    """One model, one optimizer: ``step_fn(step)``'s loss (gradients synchronised by the forward it runs), EMA."""

    def __init__(self, rt: Runtime, optim: OptimConfig, model: nn.Module, ema: nn.Module,
                 optimizer: torch.optim.Optimizer, step_fn: StepFn) -> None:
        self.rt, self.optim, self.model, self.ema = rt, optim, model, ema
        self.optimizer, self.step_fn = optimizer, step_fn
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, step: int, lr: float, last: Path | None) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a group's own multiple of the schedule (teacher)
        self.optimizer.zero_grad(set_to_none=True)
        loss, scalars = self.step_fn(step)
        value, norm = optimizer_update(self.rt, loss, self.params, self.optimizer, self.optim.grad_clip, step, last)
        ema_update(self.ema, self.model, self.optim.ema_decay, step)
        return {"loss": value, "grad_norm": norm, **{k: float(v) for k, v in scalars.items()}}

    def state(self) -> StepState:
        keep = self.rt.is_main  # other ranks only join the all-gathers of a sharded model (rt.fsdp)
        return StepState(fp32_state(self.model, keep), fp32_state(self.ema) if keep else {},
                         full_optimizer_state(self.optimizer, keep))

    def restore(self, state: ckpt.RunState, path: Path) -> None:
        ckpt.restore_modules(state, self.model, self.ema, path)
        load_optimizer_state(self.optimizer, state.optimizer)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after a step; its checkpoint was written (``--resume`` continues)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "the main process's checkpoint"
        super().__init__(f"{signal_name} received: stopped after step {step} with {where}; run the same command "
                         "with --resume to continue")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name))


class StopRequest:
    """While training: SIGINT (Ctrl-C) or SIGTERM (a scheduler's or ``kill``'s stop) only sets a flag, so the
    loop ends the step it is in, writes a checkpoint on every rank together and stops; a second Ctrl-C
    interrupts at once. Handlers are installed in the main thread only and restored on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: stopping after this step with a checkpoint "
              "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class LoopResult:
    step: int  # steps completed
    losses: list[float] = field(default_factory=list)  # global mean loss of every step run in this call
    stopped_early: bool = False  # wall-clock budget reached before max_steps
    checkpoint: Path | None = None


def run_loop(rt: Runtime, run: RunConfig, optim: OptimConfig, model: nn.Module, ema: nn.Module,
             optimizer: torch.optim.Optimizer, step_fn: StepFn, config: dict[str, Any], resume: bool,
             clips_per_step: int) -> LoopResult:
    """Train ``model`` to ``run.max_steps``: :func:`run_steps` over a :class:`ModelStep`.

    ``step_fn(step)`` returns this rank's mean loss over its slice of the global batch (with a
    graph) and scalars to log.
    """
    return run_steps(rt, run, optim, ModelStep(rt, optim, model, ema, optimizer, step_fn), config, resume,
                     clips_per_step)


# Config keys a resumed run may change: budgets, logging, threads and where the export goes; they change
# neither what is trained nor how (a key ending in ".*" covers its whole section).
RESUMABLE_KEYS = ("run.max_steps", "run.max_minutes", "run.save_every", "run.log_every", "run.keep_checkpoints",
                  "run.num_threads", "run.device", "run.gradient_checkpointing", "run.parallel", "export_path",
                  "export_dtype",
                  "eval.*", "data.encode_batch")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: A in the checkpoint, B now"`` for every setting both configs hold that differs, except
    :data:`RESUMABLE_KEYS`. (A key only one side holds comes from another code version and is not compared.)"""
    old, new = _flatten(saved), _flatten(current)

    def resumable(key: str) -> bool:
        return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)

    return [f"{key}: {old[key]!r} in the checkpoint, {new[key]!r} now"
            for key in sorted(old.keys() & new.keys()) if not resumable(key) and old[key] != new[key]]


def run_steps(rt: Runtime, run: RunConfig, optim: OptimConfig, train_step: TrainStep, config: dict[str, Any],
              resume: bool, clips_per_step: int) -> LoopResult:
    """The training loop of every stage: ``train_step`` at ``optim``'s scheduled LR up to ``run.max_steps``.

    ``resume`` continues from the run's ``latest`` checkpoint (none there is an error naming the run
    directory searched); without it an existing checkpoint is an error, so a run is never silently
    overwritten. Checkpoints every ``run.save_every`` steps, at the end and when the wall-clock
    budget ``run.max_minutes`` runs out (then the loop stops early); ``config`` is stored in each.
    """
    run_dir = run.run_dir
    start = 0
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is not None:
        state = ckpt.load(latest)
        changes = config_changes(state.config, config)
        if changes:
            raise ValueError(f"--resume with a config that differs from the checkpoint's ({latest}): "
                             + "; ".join(changes) + ". Resume with the run's own config (only "
                             + ", ".join(RESUMABLE_KEYS) + " may change), or start a new run under another "
                             "run.name")
        train_step.restore(state, latest)
        if rt.rank in state.rng and len(state.rng) == rt.world_size:
            ckpt.set_rng_state(state.rng[rt.rank])
        start = state.step
        if rt.is_main:
            print(f"resuming from {latest} (step {start})", flush=True)
    elif resume:  # a typo in run.name must not silently start a new run
        raise ValueError(nothing_to_resume(run))
    elif latest is not None:
        raise ValueError(existing_run(run_dir, latest))
    result = LoopResult(step=start, checkpoint=latest if resume else None)
    if start >= run.max_steps:
        return result

    def save(step: int) -> None:
        rngs = rt.gather_objects(ckpt.rng_state())
        parts = train_step.state() if rt.is_main or rt.fsdp else None  # sharded: every rank all-gathers
        if rt.is_main:
            assert parts is not None
            state = ckpt.RunState(step=step, model=parts.model, ema=parts.ema, optimizer=parts.optimizer,
                                  config=config, rng=dict(enumerate(rngs)), extra=parts.extra)
            result.checkpoint = ckpt.save(run_dir, state, run.keep_checkpoints)
        rt.barrier()

    logger = TrainLogger(rt, run_dir, run.max_steps, start, clips_per_step)
    t_start = time.perf_counter()
    with StopRequest() as stop:
        try:
            for step in range(start, run.max_steps):
                lr = lr_at(step, optim, run.max_steps)
                scalars = train_step(step, lr, result.checkpoint)
                result.step = step + 1
                result.losses.append(scalars["loss"])
                log = (step + 1) % run.log_every == 0 or step == start
                logger.step(step, {**scalars, "lr": lr}, log)
                for tag, value in train_step.after_step(step + 1).items():
                    logger.scalar(tag, value, step + 1)
                over_budget = run.max_minutes is not None and (time.perf_counter() - t_start) > 60 * run.max_minutes
                # Both decided together on every rank, so all stop after the same step.
                over_budget, stopping = rt.any_each(over_budget, stop.signal_name is not None)
                if (step + 1) % run.save_every == 0 or step + 1 == run.max_steps or over_budget or stopping:
                    save(step + 1)
                if stopping and step + 1 < run.max_steps:
                    # a rank the signal did not reach stops because another did: name it as the launcher's stop
                    raise TrainingInterrupted(stop.signal_name or "SIGTERM", step + 1, result.checkpoint)
                if over_budget:
                    result.stopped_early = True
                    if rt.is_main:
                        print(f"\nwall-clock budget of {run.max_minutes} min reached at step {step + 1}; "
                              f"checkpoint saved", flush=True)
                    break
        finally:
            logger.close()
    return result


class LaunchError(ValueError):
    """The launcher started a different number of processes than it was asked for."""


def launch_mismatch(actual: int, env: Mapping[str, str] | None = None,
                    launcher_argv: Sequence[str] | None = None) -> str | None:
    """Why this launch is not what was asked for, or ``None``: a run asked for N processes must not train on fewer.

    ``actual`` is the world size this process sees. The number asked for is ``WORLD_SIZE`` where the launcher
    sets it (torchrun, ``accelerate launch --multi_gpu``, mpirun) or ``ACCELERATE_NUM_PROCESSES``. accelerate's
    single-process launcher (``accelerate launch --cpu --num_processes 2``, no ``--multi_gpu``) sets neither:
    it starts one process, marked by its ``ACCELERATE_*`` variables plus the ``MASTER_PORT`` it only sets when
    asked for more than one process; the number asked is then read from the launcher's command line
    (``launcher_argv``, default: the parent process's) where it is there. We fail rather than warn: the
    committed configs give each process one thread, so one process of two would silently take twice the
    planned wall time (and any ``run.max_minutes`` budget would stop it half-way).
    """
    env = os.environ if env is None else env
    hint = ("on CPU start N processes with `accelerate launch --multi_gpu --num_processes N --num_machines 1 "
            "--mixed_precision no --dynamo_backend no -m trainer.<stage> ...` (gloo), or launch without "
            "--num_processes to train in one process")
    for var in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        if env.get(var, "").strip().isdigit():
            asked = int(env[var])
            if asked != actual:
                return f"the launch asked for {asked} processes ({var}={asked}) but this run has {actual}; {hint}"
            return None
    by_accelerate = any(k in env for k in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION"))
    if not (by_accelerate and "MASTER_PORT" in env) or actual != 1:
        return None
    argv = _parent_argv() if launcher_argv is None else list(launcher_argv)
    asked_n = _num_processes_arg(argv) if any("accelerate" in a for a in argv[:3]) else None
    if asked_n is not None and asked_n <= 1:
        return None
    asked_text = f"{asked_n} processes" if asked_n is not None else "more than one process"
    return (f"accelerate launch was asked for {asked_text} but started only this one (without --multi_gpu, "
            f"e.g. with --cpu, it runs a single process); {hint}")


def _parent_argv() -> list[str]:
    """The parent process's command line (Linux ``/proc``); empty where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _num_processes_arg(argv: Sequence[str]) -> int | None:
    """``--num_processes N`` (or ``--num-processes=N``) from an ``accelerate launch`` command line."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def default_threads() -> int:
    """Threads per process when the config leaves it open: the cores split between processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // world)


# ---------------------------------------------------------------------------------------- command line


def stage_parser(config_cls: type, *, prog: str, description: str, no_export_help: str) -> argparse.ArgumentParser:
    """The command line of a config-driven training stage; the stage adds its own flags to it.

    ``--config`` (YAML over ``config_cls``'s defaults), ``--set KEY=VALUE``, ``--resume`` and
    ``--no-export``; the epilog lists every config field with its default, and the ``--config``
    help names the config's sections and top-level keys as they are (read from the dataclass).
    """
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    sections = [n for n in names if dataclasses.is_dataclass(hints[n])]
    top_level = [n for n in names if n not in sections]
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (YAML keys; nested sections as key.sub), with their defaults:\n"
               + "\n".join(describe_config(config_cls)))
    p.add_argument("--config", type=Path, default=None,
                   help=f"YAML file overriding {config_cls.__name__} fields (sections: {', '.join(sections)}; "
                        f"top level: {', '.join(top_level)}). Unknown keys are errors.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field after the YAML, e.g. --set run.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's latest checkpoint (bit-exact with a fixed seed)")
    p.add_argument("--check", action="store_true",
                   help="check the config and every input the run reads (checkpoints, datasets, the run directory) "
                        "without doing any work: list each one, say what the run would build first, and name the "
                        "command that makes each missing input; exit 0 when the run could start, else 2")
    p.add_argument("--no-export", action="store_true", help=no_export_help)
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="shorthand for --set run.device=DEVICE: auto (CUDA where available, else cpu), cpu, cuda or "
                        "cuda:N; CUDA asked for on a machine without it exits 2 before any work")
    return p


def run_stage(config_cls: type[T], args: argparse.Namespace, body: Callable[[T], object]) -> int:
    """Load the stage's config from ``args`` (``--config``, ``--set``) and run ``body(cfg)``.

    Returns the exit code: 0 done; 128 + signal number when SIGINT/SIGTERM stopped it (130, 143) after its
    checkpoint was written; 1 training failed (a non-finite loss, an unusable checkpoint);
    2 a bad config or arguments (an unknown key, a bad value, an existing run without ``--resume``,
    ``--resume`` with nothing to resume, missing inputs, a launch with fewer processes than asked),
    reported before any training starts where the config, the launch and the files decide it.
    """
    try:
        overrides = [*args.overrides, *([f"run.device={args.device}"] if args.device is not None else [])]
        cfg = load_config(config_cls, args.config, overrides)
        resolve_device(cfg.run.device)  # type: ignore[attr-defined]  # CUDA without CUDA: exit 2 now
        # Before any work: a single-process launch asked for several processes is refused here already
        # (make_runtime checks the process group it actually gets).
        mismatch = launch_mismatch(int(os.environ.get("WORLD_SIZE", "1")))
        if mismatch is not None:
            raise LaunchError(mismatch)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        body(cfg)
    except (NonFiniteLossError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # e.g. an existing run without --resume
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits (a local call, no collective).

    Left to interpreter shutdown, a gloo group's threads are destroyed while still joinable and the
    C++ runtime aborts the process ("terminate called without an active exception", exit -6) after
    its work is done: seen on a loaded 2-core machine at the end of a 2-process run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
