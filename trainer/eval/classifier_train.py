"""Training loop of the attribute classifier on rendered clips (``python -m trainer.eval.classifier --train``).

Data: ``num_train_clips`` clips of the *train* split are rendered once at ``render_size`` (the
generated video size) and reduced to classifier windows in memory; each window starts at a
random frame in ``[0, max_start_frames]`` so the classifier does not rely on frame 0. A
second, differently seeded train-split set measures in-distribution accuracy, and the
*heldout* split (unseen kind/colour pairs) measures what we report. The schedule adapts to
the machine: training progress is the larger of ``step / num_steps`` and ``elapsed /
max_minutes``, the cosine learning rate follows it and training ends at progress 1. So a slow
or shared CPU (other jobs starting mid-run) gets fewer steps, never a schedule cut off before
the learning rate has decayed.

Weights are stored in bf16 when that costs no more than ``bf16_tolerance`` accuracy on any
head, else in fp32. This module must never be imported by evaluation code paths that only
load a checkpoint (it renders data).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from streamgen.config import override
from streamgen.model.weights import save_checkpoint
from trainer.data.attributes import ATTRIBUTE_KEYS, attribute_index
from trainer.data.dataset import clip_identity
from trainer.data.renderer import render_frames
from trainer.eval.classifier import CHECKPOINT_KIND, AttributeClassifier, ClassifierConfig, resize_frames


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Data, optimisation and budget of one classifier training run."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    render_size: int = 128
    fps: float = 16.0
    data_seed: int = 0
    num_train_clips: int = 12000
    num_val_clips: int = 200
    num_heldout_clips: int = 600
    max_start_frames: int = 16
    batch_size: int = 32
    num_steps: int = 6000
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.05
    noise_std: float = 0.02
    blur_prob: float = 0.3
    blur_mix: float = 0.6  # how far a blurred sample moves towards its 3x3 box blur
    max_minutes: float = 12.5
    eval_every: int = 500
    log_every: int = 50
    num_threads: int = 1
    # Rendering runs in this many spawned processes (1: in this process). Spawned, not forked:
    # a fork of a process whose OpenMP pool has started can hang.
    num_render_workers: int = 1
    device: str = "cpu"
    seed: int = 0
    bf16_tolerance: float = 0.005

    def __post_init__(self) -> None:
        for name in ("render_size", "num_train_clips", "num_val_clips", "num_heldout_clips", "batch_size",
                     "num_steps", "eval_every", "log_every", "num_threads", "num_render_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_start_frames < 0 or self.warmup_steps < 0:
            raise ValueError("ClassifierTrainConfig.max_start_frames and warmup_steps must be >= 0")
        if not (self.lr > 0 and self.max_minutes > 0 and self.fps > 0):
            raise ValueError("ClassifierTrainConfig.lr, max_minutes and fps must be > 0")
        if not (0.0 <= self.blur_prob <= 1.0 and 0.0 <= self.blur_mix <= 1.0):
            raise ValueError("ClassifierTrainConfig.blur_prob and blur_mix must lie in [0, 1]")
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"ClassifierTrainConfig.device must be cpu or cuda[:N], got {self.device!r}")


def train_config(changes: Mapping[str, Any] | None = None) -> ClassifierTrainConfig:
    """The default config with ``changes`` applied (unknown keys raise)."""
    return override(ClassifierTrainConfig(), dict(changes or {}))


@dataclass
class WindowSet:
    """Rendered classifier windows: ``videos`` uint8 ``[N, T, S, S, 3]``, ``labels`` int64 ``[N, K]``."""

    videos: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.videos.shape[0])


def render_windows(split: str, seed: int, num_clips: int, cfg: ClassifierTrainConfig,
                   random_start: bool, progress_every: int = 0) -> WindowSet:
    """Render ``num_clips`` classifier windows of ``split`` (clip ``i`` = ``clip_identity(seed, split, i)``).

    The result does not depend on ``cfg.num_render_workers``.
    """
    starts = np.random.default_rng([seed, 0x57A7]).integers(0, cfg.max_start_frames + 1, size=num_clips)
    if not random_start:
        starts[:] = 0
    workers = min(cfg.num_render_workers, num_clips)
    if workers <= 1:
        return _render_range(split, seed, 0, starts, cfg, progress_every)
    bounds = np.linspace(0, num_clips, workers + 1).astype(int)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_render_range, [(split, seed, int(a), starts[a:b], cfg, 0)
                                             for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return WindowSet(np.concatenate([p.videos for p in parts]), np.concatenate([p.labels for p in parts]))


def _render_range(split: str, seed: int, first: int, starts: np.ndarray, cfg: ClassifierTrainConfig,
                  progress_every: int) -> WindowSet:
    """Windows of clips ``first .. first + len(starts) - 1``, clip ``first + i`` from frame ``starts[i]``."""
    torch.set_num_threads(1)
    m = cfg.model
    num_clips = len(starts)
    videos = np.empty((num_clips, m.num_frames, m.image_size, m.image_size, 3), dtype=np.uint8)
    labels = np.empty((num_clips, len(ATTRIBUTE_KEYS)), dtype=np.int64)
    t0 = time.time()
    for i in range(num_clips):
        spec, render_seed = clip_identity(seed, split, first + i)
        indices = int(starts[i]) + m.frame_stride * np.arange(m.num_frames)
        clip = render_frames(spec, indices, cfg.render_size, cfg.render_size, cfg.fps, seed=render_seed)
        x = resize_frames(clip.frames, m.image_size)  # [3, T, S, S] in [-1, 1]
        videos[i] = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
        index = attribute_index(spec)
        labels[i] = [index[key] for key in ATTRIBUTE_KEYS]
        if progress_every and (i + 1) % progress_every == 0:
            print(f"rendered {i + 1}/{num_clips} {split} clips in {time.time() - t0:.0f} s", flush=True)
    return WindowSet(videos, labels)


def to_input(videos: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[B, T, S, S, 3]`` -> float ``[B, 3, T, S, S]`` in [-1, 1] on ``device`` (moved as uint8)."""
    return torch.from_numpy(videos).to(device).permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def augment(x: torch.Tensor, cfg: ClassifierTrainConfig, g: torch.Generator) -> torch.Tensor:
    """Blur and noise, the kinds of damage a VAE decoder does. Never colour or brightness jitter:
    colour, lighting and tint are labels."""
    b = x.shape[0]
    blurred = F.avg_pool3d(x, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    pick = (torch.rand(b, generator=g, device=x.device) < cfg.blur_prob).float().view(b, 1, 1, 1, 1)
    x = x + pick * cfg.blur_mix * (blurred - x)
    return x + cfg.noise_std * torch.randn(x.shape, generator=g, device=x.device)


def loss_fn(logits: dict[str, torch.Tensor], labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum over heads of the cross-entropy; ``labels [B, K]`` in :data:`ATTRIBUTE_KEYS` order."""
    return sum(F.cross_entropy(logits[key], labels[:, k], label_smoothing=label_smoothing)
               for k, key in enumerate(ATTRIBUTE_KEYS))  # type: ignore[return-value]


@torch.no_grad()
def accuracy(model: AttributeClassifier, data: WindowSet, batch_size: int = 64) -> dict[str, float]:
    """Per-head accuracy on ``data`` plus ``"mean"`` over heads."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = np.zeros(len(ATTRIBUTE_KEYS))
    for i in range(0, len(data), batch_size):
        logits = model(to_input(data.videos[i:i + batch_size], device))
        labels = torch.from_numpy(data.labels[i:i + batch_size]).to(device)
        for k, key in enumerate(ATTRIBUTE_KEYS):
            correct[k] += int((logits[key].argmax(-1) == labels[:, k]).sum())
    model.train(was_training)
    out = {key: float(correct[k] / len(data)) for k, key in enumerate(ATTRIBUTE_KEYS)}
    out["mean"] = float(np.mean([out[key] for key in ATTRIBUTE_KEYS]))
    return out


def heldout_accuracy(model: AttributeClassifier, cfg: ClassifierTrainConfig) -> dict[str, float]:
    """Per-head accuracy on ``cfg.num_heldout_clips`` heldout windows (each from frame 0)."""
    data = render_windows("heldout", cfg.data_seed, cfg.num_heldout_clips, cfg, random_start=False)
    return accuracy(model, data)


def format_accuracy(acc: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


def lr_at(step: int, progress: float, cfg: ClassifierTrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine in ``progress`` (0..1) down to 2% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _bf16_roundtrip(model: AttributeClassifier) -> AttributeClassifier:
    copy = AttributeClassifier(model.cfg).to(next(model.parameters()).device)
    copy.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return copy.eval()


def train(cfg: ClassifierTrainConfig, out: str | Path, log_dir: str | Path) -> dict[str, Any]:
    """Render data, train, evaluate on heldout, save ``out``; returns the summary written to the log."""
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ClassifierTrainConfig.device={cfg.device!r}, but torch sees no CUDA device")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / "metrics.jsonl").open("a")

    def record(**row: Any) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    t_start = time.time()
    train_set = render_windows("train", cfg.data_seed, cfg.num_train_clips, cfg, random_start=True,
                               progress_every=1000)
    # A different dataset seed: same distribution, disjoint render seeds.
    val_set = render_windows("train", cfg.data_seed + 1, cfg.num_val_clips, cfg, random_start=True)
    heldout_set = render_windows("heldout", cfg.data_seed, cfg.num_heldout_clips, cfg, random_start=False)
    record(event="data", seconds=round(time.time() - t_start, 1), train=len(train_set), val=len(val_set),
           heldout=len(heldout_set))

    model = AttributeClassifier(cfg.model).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed)
    order_rng = np.random.default_rng(cfg.seed)
    t_loop = time.time()
    budget_s = cfg.max_minutes * 60.0
    step = 0
    progress = 0.0
    while progress < 1.0:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, cfg)
        ids = order_rng.integers(0, len(train_set), size=cfg.batch_size)
        x = augment(to_input(train_set.videos[ids], device), cfg, g)
        labels = torch.from_numpy(train_set.labels[ids]).to(device)
        loss = loss_fn(model(x), labels, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        progress = max(step / cfg.num_steps, (time.time() - t_loop) / budget_s)
        if step % cfg.log_every == 0:
            record(event="step", step=step, loss=round(float(loss.detach()), 4),
                   lr=round(lr_at(step, progress, cfg), 6), progress=round(progress, 3),
                   minutes=round((time.time() - t_loop) / 60, 2))
        if step % cfg.eval_every == 0 and progress < 1.0:
            record(event="eval", step=step, val=accuracy(model, val_set), heldout=accuracy(model, heldout_set))

    model.eval()
    fp32 = {"val": accuracy(model, val_set), "heldout": accuracy(model, heldout_set)}
    bf16_model = _bf16_roundtrip(model)
    bf16 = {"val": accuracy(bf16_model, val_set), "heldout": accuracy(bf16_model, heldout_set)}
    worst_drop = max(fp32["heldout"][k] - bf16["heldout"][k] for k in ATTRIBUTE_KEYS)
    dtype = torch.bfloat16 if worst_drop <= cfg.bf16_tolerance else None
    final = bf16 if dtype is not None else fp32
    model.cpu()
    summary = {"event": "final", "steps": step, "train_minutes": round((time.time() - t_loop) / 60, 2),
               "total_minutes": round((time.time() - t_start) / 60, 2), "dtype": "bf16" if dtype else "fp32",
               "fp32": fp32, "bf16": bf16}
    save_checkpoint(model, out, kind=CHECKPOINT_KIND, config=cfg.model, dtype=dtype,
                    extra_metadata={"heldout_accuracy": json.dumps(final["heldout"]),
                                    "val_accuracy": json.dumps(final["val"]), "steps": str(step),
                                    "train_config": json.dumps(dataclasses.asdict(cfg))})
    record(**summary, out=str(out))
    log.close()
    return summary
