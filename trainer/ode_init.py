"""``python -m trainer.ode_init``: teacher ODE trajectories -> the causal student's initialisation.

CausVid (Yin et al. 2025, arXiv 2412.07772, section 3.3) and Self-Forcing (arXiv 2506.08009,
appendix) start the few-step causal student by regression on the bidirectional teacher's
probability-flow ODE. Two parts:

1. **ODE pairs** (:func:`build_pairs`): for captions of the latent dataset, integrate the teacher
   (many-step Euler with CFG, :func:`trainer.sampling.sample_teacher`) from noise and record the
   state at each of the student's timesteps plus the final ``x_0``. Euler's path is piecewise
   linear in the noise level, so the state at a level between two Euler nodes is their linear
   interpolation *exactly* (:func:`trajectory_at`); any ``teacher_steps`` works, and a multiple of
   ``len(denoising_steps)`` puts every student level on a node. Pairs are written in shards
   (safetensors, atomic) under a directory whose ``manifest.json`` names the exact teacher file
   (by content hash) and settings, so a rerun reuses finished shards and a changed teacher or
   setting rebuilds them.
2. **Regression** (:func:`train`): the student, initialised from the teacher's weights (same
   architecture), sees each chunk of a pair at one of the student's levels (drawn per chunk), with
   the block-causal mask over the teacher's horizon ``T``, and regresses ``x_0``:
   ``L = || x_0_student(x_{t_c}) - x_0^ODE ||^2``. As in Self-Forcing's ``ode_regression``, earlier
   chunks are seen at *their own* noisy level, not clean (the DMD stage then trains on the exact
   inference context).

The shared student-stage helpers (the latent data config, the teacher horizon, loading a
checkpoint against a preset with a clear mismatch message) live here and are reused by
:mod:`trainer.self_forcing`. This module never changes the architecture or the latent space.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from streamgen.config import ModelConfig, Preset, get_preset, to_dict
from streamgen.model.masks import block_causal_mask, chunk_ends
from streamgen.model.sampler import student_timesteps, x0_from_velocity
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import atomic_save_safetensors, load_transformer, read_metadata, save_checkpoint
from streamgen.precision import resolve_precision
from trainer import latent_data
from trainer.common.checkpoint import write_text_atomic
from trainer.common.config import OptimConfig, RunConfig, check
from trainer.common.precision import EXPORT_DTYPES, PRECISIONS, resolve_config_precision
from trainer.common.preflight import (
    Input,
    checkpoint_command,
    file_input,
    latents_input,
    preflight,
    run_inputs,
    self_command,
    stage_command,
)
from trainer.common.runtime import (
    Runtime,
    local_indices,
    make_runtime,
    run_loop,
    run_stage,
    sample_generator,
    stage_parser,
)
from trainer.sampling import sample_teacher, teacher_timesteps

MANIFEST = "manifest.json"


# ---------------------------------------------------------------- shared student-stage helpers
@dataclass(frozen=True)
class StudentDataConfig:
    """The teacher's latent dataset (:mod:`trainer.latent_data`): captions + embeddings, and ground-truth clips.

    Its fields must equal the teacher run's ``data`` section so the same directory is found
    (it is built, on rank 0, only if missing).
    """

    vae_checkpoint: str = "checkpoints/vae_default.safetensors"
    latents_dir: str = "runs/latents_default_h6"
    seed: int = 0
    num_clips: int = 1600
    num_latent_frames: int | None = None  # clip length; None = the teacher's horizon (checkpoint metadata)
    encode_batch: int = 8

    def __post_init__(self) -> None:
        check(self.num_clips > 0, f"data.num_clips must be > 0, got {self.num_clips}")
        check(self.num_latent_frames is None or self.num_latent_frames > 0, "data.num_latent_frames must be > 0")
        check(self.encode_batch > 0, f"data.encode_batch must be > 0, got {self.encode_batch}")

    def spec(self, preset: Preset, num_latent_frames: int) -> latent_data.LatentDatasetSpec:
        return latent_data.LatentDatasetSpec(
            vae_checkpoint=self.vae_checkpoint, num_clips=self.num_clips,
            num_pixel_frames=preset.pixel_frames(self.num_latent_frames or num_latent_frames),
            height=preset.video.height, width=preset.video.width, fps=preset.video.fps, seed=self.seed,
            text_max_tokens=preset.model.text_max_tokens)


def check_latents_spec(directory: Path, spec: latent_data.LatentDatasetSpec) -> None:
    """Raise ``ValueError`` if ``directory`` holds a complete latent dataset for another spec."""
    manifest = Path(directory) / latent_data.MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("spec")
        if found != spec.key():
            raise ValueError(f"{directory} holds a latent dataset for {found}, but this run needs {spec.key()} "
                             "(clip length = the teacher's horizon); point data.latents_dir at the teacher's "
                             "latent dataset or at a new directory")


def ensure_latents(directory: Path, spec: latent_data.LatentDatasetSpec, encode_batch: int, rt: Runtime
                   ) -> latent_data.LatentDataset:
    """Load the teacher's latent dataset; build it (rank 0) only where none exists.

    Unlike the teacher stage, a student stage never rebuilds a directory that holds a dataset for
    another spec: that dataset is most likely the teacher's own (e.g. a different horizon), and
    re-encoding over it would destroy it. The mismatch is an error naming both specs.
    """
    check_latents_spec(directory, spec)
    if rt.is_main:
        latent_data.build(Path(directory), spec, batch=encode_batch)
    rt.barrier()
    return latent_data.load(Path(directory), spec)


def student_data_inputs(data: StudentDataConfig, preset: Preset, horizon: int | None) -> list[Input]:
    """The teacher's latent dataset as an input of a student stage, plus the VAE that builds it when it is missing.

    ``horizon`` is the teacher's (``None`` while the teacher checkpoint is missing: then the clip length, and
    so the dataset, is unknown and only the teacher is reported). A directory holding another spec is an
    error here already (:func:`check_latents_spec`): a student stage never rebuilds over it.
    """
    frames = data.num_latent_frames or horizon
    if frames is None:
        return []
    spec = data.spec(preset, frames)
    check_latents_spec(Path(data.latents_dir), spec)
    make = stage_command("trainer.teacher", None, {  # the teacher stage's encoder, set to exactly this spec
        "preset": preset.name, "data.vae_checkpoint": data.vae_checkpoint, "data.latents_dir": data.latents_dir,
        "data.num_clips": data.num_clips, "data.num_latent_frames": frames, "data.clip_latent_frames": None,
        "data.seed": data.seed}, "--encode-only")
    shape = (preset.model.latent_channels, frames, preset.latent_height, preset.latent_width)
    latents = latents_input("data.latents_dir", data.latents_dir, spec, shape, make)
    if latents.present:
        return [latents]
    return [latents, file_input("data.vae_checkpoint", data.vae_checkpoint,
                                checkpoint_command("trainer.vae", data.vae_checkpoint))]


def teacher_horizon(path: str | Path) -> int:
    """The teacher's horizon ``T`` in latent frames, from its checkpoint metadata (``num_latent_frames``)."""
    meta = read_metadata(path)
    if "num_latent_frames" not in meta:
        raise ValueError(f"teacher checkpoint {path} records no num_latent_frames (its horizon); "
                         "export it with trainer.teacher")
    return int(meta["num_latent_frames"])


def load_for_preset(path: str | Path, preset: Preset, what: str) -> tuple[CausalWanTransformer, dict[str, str]]:
    """Load a transformer checkpoint that must match ``preset``'s model; refuse anything else, saying why."""
    if not Path(path).is_file():
        raise ValueError(f"{what} checkpoint {path} does not exist")
    meta = read_metadata(path)
    if meta.get("preset", preset.name) != preset.name:
        raise ValueError(f"{what} checkpoint {path} was made for preset {meta['preset']!r}, not {preset.name!r}")
    try:
        model = load_transformer(path, expected=preset.model)
    except ValueError as exc:
        raise ValueError(f"{what} does not match preset {preset.name!r} (model, latent channels, text dim must all "
                         f"agree): {exc}") from exc
    return model, meta  # type: ignore[return-value]


def check_same_latent_space(metas: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse checkpoints trained in different VAE latent spaces (their ``vae_checkpoint`` metadata differ)."""
    seen = {what: str(Path(m["vae_checkpoint"]).resolve()) for what, m in metas.items() if "vae_checkpoint" in m}
    if len(set(seen.values())) > 1:
        raise ValueError("checkpoints were trained in different latent spaces (VAE files): "
                         + ", ".join(f"{k}: {v}" for k, v in seen.items()))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file (first 16 hex digits): identifies the exact teacher weights behind a pair set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- ODE pairs
@dataclass(frozen=True)
class PairsConfig:
    """How the teacher's ODE pairs are made."""

    dir: str = "runs/ode_pairs_default"
    num_pairs: int = 256
    teacher_steps: int = 48  # Euler steps; a multiple of the student's 4 puts its levels on nodes
    cfg_scale: float = 4.0  # v_u + s (v_c - v_u); Self-Forcing's cond + 3 (cond - uncond) is 4.0
    shift: float = 5.0
    shard_size: int = 8  # pairs per shard file (and per teacher batch)
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.num_pairs > 0, f"pairs.num_pairs must be > 0, got {self.num_pairs}")
        check(self.teacher_steps > 0, f"pairs.teacher_steps must be > 0, got {self.teacher_steps}")
        check(self.cfg_scale >= 1, f"pairs.cfg_scale must be >= 1, got {self.cfg_scale}")
        check(self.shift > 0, f"pairs.shift must be > 0, got {self.shift}")
        check(self.shard_size > 0, f"pairs.shard_size must be > 0, got {self.shard_size}")


@dataclass
class ODEPairs:
    """``trajectory [P, S, C, T, h, w]`` (state at each of the student's ``S`` levels), ``x0 [P, C, T, h, w]``,
    ``text_emb [P, L, D]``, and the levels ``timesteps`` (``S`` floats, decreasing)."""

    trajectory: torch.Tensor
    x0: torch.Tensor
    text_emb: torch.Tensor
    timesteps: list[float]

    def __len__(self) -> int:
        return self.x0.shape[0]


def trajectory_at(states: list[torch.Tensor], times: list[float], t: float) -> torch.Tensor:
    """The Euler path's state at level ``t`` from its nodes ``states[k]`` at decreasing ``times[k]``.

    An Euler step ``x_{k+1} = x_k + (s_{k+1} - s_k) v(x_k)`` is a straight line in ``s = t / 1000``,
    so linear interpolation between the two nodes around ``t`` is exact, not an approximation.
    """
    if not times[-1] <= t <= times[0]:
        raise ValueError(f"level {t} lies outside the trajectory [{times[-1]}, {times[0]}]")
    for k in range(len(times) - 1):
        hi, lo = times[k], times[k + 1]
        if lo <= t <= hi:
            if abs(t - hi) < 1e-4 or hi == lo:
                return states[k]
            if abs(t - lo) < 1e-4:
                return states[k + 1]
            w = (hi - t) / (hi - lo)
            return states[k] + w * (states[k + 1] - states[k])
    raise AssertionError("unreachable: t is inside [times[-1], times[0]]")


def pairs_spec(cfg: PairsConfig, preset: Preset, teacher: str, horizon: int,
               data: latent_data.LatentDatasetSpec, bf16: bool) -> dict[str, Any]:
    """Everything a pair set depends on; a directory with another spec is rebuilt, never mixed."""
    return {"teacher": str(teacher), "teacher_sha256": file_digest(teacher), "preset": preset.name,
            "horizon": horizon, "student_timesteps": student_timesteps(preset.sampler), "data": data.key(),
            "num_pairs": cfg.num_pairs, "teacher_steps": cfg.teacher_steps, "cfg_scale": cfg.cfg_scale,
            "shift": cfg.shift, "shard_size": cfg.shard_size, "seed": cfg.seed, "bf16": bf16}


def _shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.safetensors"


def _shard_done(path: Path, spec_hash: str) -> bool:
    if not path.is_file():
        return False
    try:
        return read_metadata(path).get("spec") == spec_hash
    except ValueError:
        return False


@torch.no_grad()
def build_pairs(directory: Path, cfg: PairsConfig, preset: Preset, teacher_path: str, horizon: int,
                data: latent_data.LatentDataset, data_spec: latent_data.LatentDatasetSpec, rt: Runtime,
                bf16: bool = True) -> None:
    """Write the ODE pair shards this rank owns (shard ``s`` on rank ``s % world``), skipping finished ones.

    Rank 0 writes ``manifest.json`` once every shard exists. Pair ``i`` uses clip ``i mod N``'s caption
    and noise from ``sample_generator(seed, 0, i)``, so the set does not depend on the process count.
    """
    directory = Path(directory)
    spec = pairs_spec(cfg, preset, teacher_path, horizon, data_spec, bf16)
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    manifest = directory / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == spec:
        return
    directory.mkdir(parents=True, exist_ok=True)
    if rt.is_main:
        manifest.unlink(missing_ok=True)
        for stale in directory.glob("shard_*.safetensors"):
            if not _shard_done(stale, spec_hash):
                stale.unlink()
    rt.barrier()
    num_shards = -(-cfg.num_pairs // cfg.shard_size)
    mine = [s for s in range(num_shards) if s % rt.world_size == rt.rank]
    todo = [s for s in mine if not _shard_done(_shard_path(directory, s), spec_hash)]
    if todo:
        teacher, _ = load_for_preset(teacher_path, preset, "teacher")
        teacher.eval()
        levels = student_timesteps(preset.sampler)
        times = teacher_timesteps(cfg.teacher_steps, cfg.shift, preset.sampler.num_train_timesteps)
        shape = (preset.model.latent_channels, horizon, preset.latent_height, preset.latent_width)
        bar = tqdm(todo, desc=f"ODE pairs (rank {rt.rank})", disable=not rt.is_main, dynamic_ncols=True)
        t0 = time.perf_counter()
        for n, shard in enumerate(bar):
            ids = list(range(shard * cfg.shard_size, min(cfg.num_pairs, (shard + 1) * cfg.shard_size)))
            clips = [i % len(data) for i in ids]
            cond = torch.stack([data.text_emb[data.caption_ids[c]] for c in clips])
            noise = torch.stack([torch.randn(shape, generator=sample_generator(cfg.seed, 0, i, stream=5))
                                 for i in ids])
            x0, states = sample_teacher(teacher, noise, cond, torch.zeros_like(cond), num_steps=cfg.teacher_steps,
                                        cfg_scale=cfg.cfg_scale, shift=cfg.shift, bf16=bf16, return_trajectory=True)
            nodes = [*states, x0]  # type: ignore[list-item]
            trajectory = torch.stack([trajectory_at(nodes, times, t) for t in levels], dim=1)  # [b, S, C, T, h, w]
            atomic_save_safetensors({"trajectory": trajectory, "x0": x0, "text_emb": cond},
                                    _shard_path(directory, shard), {"spec": spec_hash})
            bar.set_postfix(pairs_s=f"{len(ids) * (n + 1) / (time.perf_counter() - t0):.2f}")
        bar.close()
    rt.barrier()
    if rt.is_main:
        write_text_atomic(manifest, json.dumps({"spec": spec, "spec_hash": spec_hash, "num_shards": num_shards}))
    rt.barrier()


def load_pairs(directory: Path) -> ODEPairs:
    """Load a complete pair set (its manifest exists); anything else raises ``ValueError``."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} holds no complete ODE pair set (no {MANIFEST}); run trainer.ode_init")
    info = json.loads(manifest.read_text())
    parts = [load_file(str(_shard_path(directory, s))) for s in range(info["num_shards"])]
    return ODEPairs(torch.cat([p["trajectory"] for p in parts]), torch.cat([p["x0"] for p in parts]),
                    torch.cat([p["text_emb"] for p in parts]), list(info["spec"]["student_timesteps"]))


# ---------------------------------------------------------------- regression
@dataclass(frozen=True)
class OdeInitConfig:
    preset: str = "default"
    precision: str = "auto"  # auto: bf16 only on CPUs with native bf16 (trainer.common.precision)
    teacher: str = "checkpoints/teacher_default.safetensors"  # also the student's initial weights
    export_path: str = "checkpoints/student_ode_default.safetensors"
    export_dtype: str = "bf16"  # weights as stored (loaders upcast); bf16 halves the file, serving runs bf16
    global_batch: int = 8
    run: RunConfig = field(default_factory=lambda: RunConfig(name="ode_init_default"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, betas=(0.9, 0.999), warmup_steps=20,
                                                                   schedule="constant", ema_decay=0.99))
    data: StudentDataConfig = field(default_factory=StudentDataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)

    def __post_init__(self) -> None:
        get_preset(self.preset)
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.global_batch > 0, f"global_batch must be > 0, got {self.global_batch}")
        check(self.export_dtype in EXPORT_DTYPES,
              f"export_dtype must be one of {EXPORT_DTYPES}, got {self.export_dtype!r}")

    @property
    def model(self) -> ModelConfig:
        return get_preset(self.preset).model


class MaskedForward(nn.Module):
    """``(x_t, per-frame t, prompt embeddings) -> velocity`` under a fixed block-causal mask, in one
    forward (text projection included) so that DDP sees every parameter it trains."""

    def __init__(self, model: CausalWanTransformer, mask: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, timesteps, self.model.encode_text(text_emb), attn_mask=self.mask)


def chunk_levels(g: torch.Generator, num_frames: int, chunk_frames: int, num_levels: int) -> torch.Tensor:
    """``[num_frames]`` level index per frame: one uniform draw per chunk (CausVid's per-block timestep)."""
    ends = chunk_ends(num_frames, chunk_frames)
    chunk_of = torch.unique_consecutive(ends, return_inverse=True)[1]  # [F] chunk index of each frame
    per_chunk = torch.randint(num_levels, (int(chunk_of.max()) + 1,), generator=g)
    return per_chunk[chunk_of]


def regression_batch(pairs: ODEPairs, ids: list[int], seed: int, step: int, chunk_frames: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t [B, C, T, h, w], t [B, T], text_emb [B, L, D], x0 [B, C, T, h, w])`` for global sample ids.

    Sample ``i`` of ``step`` takes a pair drawn uniformly and one of the student's levels per chunk, all
    from ``sample_generator(seed, step, i)``: the same on any number of processes and on resume.
    """
    xs, ts, embs, x0s = [], [], [], []
    levels = torch.tensor(pairs.timesteps)
    for i in ids:
        g = sample_generator(seed, step, i, stream=6)
        p = int(torch.randint(len(pairs), (1,), generator=g).item())
        idx = chunk_levels(g, pairs.x0.shape[2], chunk_frames, len(levels))  # [T]
        frames = torch.arange(pairs.x0.shape[2])
        xs.append(pairs.trajectory[p][idx, :, frames].transpose(0, 1))  # [C, T, h, w]
        ts.append(levels[idx])
        embs.append(pairs.text_emb[p])
        x0s.append(pairs.x0[p])
    return torch.stack(xs), torch.stack(ts), torch.stack(embs), torch.stack(x0s)


@dataclass
class OdeInitResult:
    steps: int
    losses: list[float]


def prepare_pairs(cfg: OdeInitConfig, rt: Runtime) -> tuple[int, dict[str, str]]:
    """Check the teacher, build the latent dataset (rank 0) and the ODE pairs if missing.

    Returns the teacher's horizon ``T`` and its metadata.
    """
    preset = get_preset(cfg.preset)
    _, teacher_meta = load_for_preset(cfg.teacher, preset, "teacher")  # refuse a mismatch before any work
    horizon = teacher_horizon(cfg.teacher)
    spec = cfg.data.spec(preset, horizon)
    data = ensure_latents(Path(cfg.data.latents_dir), spec, cfg.data.encode_batch, rt)
    if data.latents.shape[2] < horizon:
        raise ValueError(f"latent clips have {data.latents.shape[2]} frames, fewer than the teacher horizon {horizon}")
    build_pairs(Path(cfg.pairs.dir), cfg.pairs, preset, cfg.teacher, horizon, data, spec, rt,
                resolve_precision(cfg.precision)[0] == "bf16")  # already resolved when called from train()
    return horizon, teacher_meta


def train(cfg: OdeInitConfig, resume: bool = False, export: bool = True) -> OdeInitResult:
    """Build (or reuse) the ODE pairs, regress the student to ``run.max_steps``, export its EMA on rank 0."""
    preset = get_preset(cfg.preset)
    rt = make_runtime(cfg.run, cfg.precision)
    cfg = resolve_config_precision(cfg, "ode_init", log=rt.is_main, device=rt.device)  # recorded in checkpoints
    horizon, teacher_meta = prepare_pairs(cfg, rt)
    pairs = load_pairs(Path(cfg.pairs.dir))
    bf16 = cfg.precision == "bf16"
    teacher_model, _ = load_for_preset(cfg.teacher, preset, "teacher")
    # The teacher's layout (ModelConfig.with_layout_of: its frame embeddings, if any) is the student's.
    model_cfg = cfg.model.with_layout_of(teacher_model.cfg)
    model = CausalWanTransformer(model_cfg).set_gradient_checkpointing(cfg.run.gradient_checkpointing)
    model.load_state_dict(teacher_model.state_dict())  # same architecture: start from the teacher
    del teacher_model
    model.to(rt.device)
    ema = CausalWanTransformer(model_cfg).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ema.to(rt.device)
    mask = block_causal_mask(horizon, preset.tokens_per_frame, preset.sampler.chunk_frames,
                             preset.cache.window_frames, preset.cache.sink_frames)
    rt.shard(model)  # FSDP (run.parallel fsdp): before the optimizer is built over its parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    wrapped, optimizer = rt.prepare(MaskedForward(model, mask), optimizer)
    autocast = torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = regression_batch(pairs, local_indices(step, cfg.global_batch, rt), cfg.run.seed, step,
                                 preset.sampler.chunk_frames)
        x_t, t, emb, x0 = (x.to(rt.device, non_blocking=True) for x in batch)  # drawn on the CPU, then moved
        with autocast:
            v = wrapped(x_t, t, emb)
        pred = x0_from_velocity(x_t, v.float(), t, preset.sampler.num_train_timesteps)
        return F.mse_loss(pred, x0), {}

    t0 = time.perf_counter()
    loop = run_loop(rt, cfg.run, cfg.optim, model, ema, optimizer, step_fn, to_dict(cfg), resume,
                    clips_per_step=cfg.global_batch // rt.world_size)
    if rt.is_main:
        print(f"ODE regression: step {loop.step} in {time.perf_counter() - t0:.0f} s", flush=True)
    if export and rt.is_main:
        meta = {"stage": "ode_init", "preset": preset.name, "teacher": cfg.teacher, "train_steps": str(loop.step),
                "num_latent_frames": str(horizon), "ode_pairs": cfg.pairs.dir, "num_pairs": str(len(pairs))}
        if "vae_checkpoint" in teacher_meta:
            meta["vae_checkpoint"] = teacher_meta["vae_checkpoint"]
        save_checkpoint(ema, cfg.export_path, kind="transformer", config=model_cfg, extra_metadata=meta,
                        dtype=torch.bfloat16 if cfg.export_dtype == "bf16" else None)
        report = {"steps": loop.step, "final_loss": loop.losses[-1] if loop.losses else None,
                  "mean_loss_last_50": sum(loop.losses[-50:]) / max(1, len(loop.losses[-50:])),
                  "export_path": cfg.export_path}
        (cfg.run.run_dir / "report.json").write_text(json.dumps(report, indent=2))
        print(f"exported EMA student to {cfg.export_path}", flush=True)
    rt.barrier()
    return OdeInitResult(loop.step, loop.losses)


def inputs(cfg: OdeInitConfig, args: argparse.Namespace) -> list[Input]:
    """What this command reads: ``--check`` lists it, and a missing required input stops it before any work."""
    preset = get_preset(cfg.preset)
    teacher = file_input("teacher", cfg.teacher, checkpoint_command("trainer.teacher", cfg.teacher))
    horizon = teacher_horizon(cfg.teacher) if teacher.present else None
    found = [teacher, *student_data_inputs(cfg.data, preset, horizon)]
    if horizon is not None:
        data_spec = cfg.data.spec(preset, horizon)
        manifest = Path(cfg.pairs.dir) / MANIFEST
        made = json.loads(manifest.read_text()).get("spec", {}) if manifest.is_file() else {}
        wanted = pairs_spec(cfg.pairs, preset, cfg.teacher, horizon, data_spec, bf16=False)
        same = {k: v for k, v in made.items() if k != "bf16"} == {k: v for k, v in wanted.items() if k != "bf16"}
        p = cfg.pairs
        cost = (f"{p.num_pairs} teacher ODE solves of {p.teacher_steps} Euler steps with CFG "
                f"({2 * p.num_pairs * p.teacher_steps} teacher forwards over {horizon} latent frames; 192 x 24 took "
                "~8 min on 2 processes for the default preset)")
        found.append(Input("pairs.dir", Path(p.dir), same, self_command("trainer.ode_init", args.config,
                                                                        args.overrides, "--pairs-only"),
                           built_by_run=cost if not made else f"it holds pairs for other settings: rebuilt: {cost}",
                           detail=f"{p.num_pairs} pairs"))
    return found if args.pairs_only else found + run_inputs(cfg.run, args.resume)


def build_parser() -> argparse.ArgumentParser:
    p = stage_parser(
        OdeInitConfig, prog="python -m trainer.ode_init",
        description="Make teacher ODE pairs at the student's levels (reused on rerun) and regress the causal "
                    "student on them, starting from the teacher's weights; export a 'transformer' checkpoint "
                    "(EMA). Run dir: <run.runs_dir>/<run.name>/ (checkpoints/, tb/, report.json).",
        no_export_help="train only; skip the export")
    p.add_argument("--pairs-only", action="store_true", help="build the ODE pairs (and latent dataset) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run(cfg: OdeInitConfig) -> None:
        preflight(inputs(cfg, args), check=args.check)
        if args.check:
            return
        if args.pairs_only:
            prepare_pairs(cfg, make_runtime(cfg.run))
        else:
            train(cfg, resume=args.resume, export=not args.no_export)

    return run_stage(OdeInitConfig, args, run)


if __name__ == "__main__":
    sys.exit(main())
