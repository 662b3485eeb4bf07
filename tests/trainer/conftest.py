"""Tiny-config fixtures for the trainer stages: a few-step VAE checkpoint and a latent dataset (test preset);
helpers the stage tests share: configs as YAML, a 2-process ``accelerate launch`` and a run's final weights."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streamgen.model.text import HashTokenEncoder
from trainer import latent_data
from trainer.common import checkpoint as ckpt
from trainer.common.config import build_config
from trainer.teacher import TeacherTrainConfig
from trainer.vae import VAETrainConfig

REPO = Path(__file__).resolve().parents[2]


def tiny_vae_config(tmp: Path, **run: object) -> VAETrainConfig:
    """A VAE run on the ``test`` preset (32x32, 4 latent channels) that takes well under a second per step."""
    return build_config(VAETrainConfig, {
        "preset": "test", "export_path": str(tmp / "vae.safetensors"),
        "run": {"runs_dir": str(tmp / "runs"), "name": "vae", "max_steps": 6, "save_every": 3, "log_every": 1,
                "num_threads": 1, **run},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"num_frames": 4, "crop_size": 16, "global_batch": 4, "heldout_clips": 2, "heldout_frames": 4,
                 "stats_clips": 2},
    })


def tiny_teacher_config(tmp: Path, vae_path: Path, latents_dir: Path, *, clip_latent_frames: int | None = None,
                        precision: str = "fp32", **run: object) -> TeacherTrainConfig:
    """Horizon 2; ``clip_latent_frames`` > 2 trains on random crops of longer clips (6 of them, so it stays tiny)."""
    clips = {} if clip_latent_frames is None else {"clip_latent_frames": clip_latent_frames, "num_clips": 6}
    return build_config(TeacherTrainConfig, {
        "preset": "test", "precision": precision, "export_path": str(tmp / "teacher.safetensors"),
        "run": {"runs_dir": str(tmp / "runs"), "name": "teacher", "max_steps": 6, "save_every": 3, "log_every": 1,
                "num_threads": 1, **run},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"vae_checkpoint": str(vae_path), "latents_dir": str(latents_dir), "num_clips": 12,
                 "num_latent_frames": 2, "global_batch": 4, "prompt_dropout": 0.25, **clips},
        "sample": {"num_steps": 2, "png_path": str(tmp / "samples.png")},
    })


@pytest.fixture(scope="session")
def tiny_vae_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step ``test``-preset VAE exported with latent stats (its quality is irrelevant)."""
    from trainer.vae import train

    tmp = tmp_path_factory.mktemp("vae_ckpt")
    cfg = tiny_vae_config(tmp, max_steps=2, save_every=2)
    train(cfg)
    return Path(cfg.export_path)


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory: pytest.TempPathFactory, tiny_vae_checkpoint: Path) -> Path:
    """A 12-clip latent dataset built with the hash prompt encoder (no MiniLM load)."""
    tmp = tmp_path_factory.mktemp("latents")
    cfg = tiny_teacher_config(tmp, tiny_vae_checkpoint, tmp / "latents")
    latent_data.build(tmp / "latents", cfg.dataset_spec(), batch=4, log=False,
                      token_encoder=HashTokenEncoder())
    return tmp / "latents"


LONG_CLIP_LATENT_FRAMES = 6  # 3x the tiny teacher's horizon of 2: 5 crop starts per clip


@pytest.fixture(scope="session")
def tiny_long_latents(tmp_path_factory: pytest.TempPathFactory, tiny_vae_checkpoint: Path) -> Path:
    """A 6-clip latent dataset of clips 3x the tiny teacher's horizon long (random-crop training)."""
    tmp = tmp_path_factory.mktemp("long_latents")
    cfg = tiny_teacher_config(tmp, tiny_vae_checkpoint, tmp / "latents", clip_latent_frames=LONG_CLIP_LATENT_FRAMES)
    latent_data.build(tmp / "latents", cfg.dataset_spec(), batch=4, log=False, token_encoder=HashTokenEncoder())
    return tmp / "latents"


def write_yaml(cfg: Any, path: Path) -> Path:
    """A config dataclass as a YAML file the CLIs accept (tuples as lists)."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    path.write_text(yaml.safe_dump(plain(dataclasses.asdict(cfg))))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of the run's latest checkpoint."""
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None
    return load_file(str(latest / "model.safetensors"))


def launch_two_processes(stage: str, cfg: Any, yaml_path: Path, timeout_s: float, resume: bool = False) -> str:
    """Run ``python -m trainer.<stage> --config <cfg as YAML> --no-export [--resume]`` under ``accelerate launch
    --multi_gpu --num_processes 2`` (gloo on CPU, one thread per process); fail unless it ran on 2 processes.
    Returns its standard output."""
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", f"trainer.{stage}",
           "--config", str(write_yaml(cfg, yaml_path)), "--no-export", *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime: 2 process(es)" in proc.stdout
    return proc.stdout
