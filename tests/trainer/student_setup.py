"""Shared tiny setup for the student stages (ODE init, Self-Forcing): ``test`` preset, random models, CPU.

:func:`assets` bootstraps a random VAE, an 8-clip latent dataset of 6 latent frames (two chunks of 3)
and a random teacher with horizon 6 once per session directory; the config builders point at them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from trainer.common.config import build_config, merge
from trainer.distill_config import SelfForcingConfig
from trainer.ode_init import OdeInitConfig
from trainer.self_forcing import bootstrap_tiny

HORIZON = 6
NUM_CLIPS = 8


def _data(root: Path) -> dict[str, Any]:
    return {"vae_checkpoint": str(root / "vae.safetensors"), "latents_dir": str(root / "latents"),
            "num_clips": NUM_CLIPS, "num_latent_frames": HORIZON, "encode_batch": 4}


@functools.cache
def assets(root: Path) -> Path:
    """Random tiny VAE, latents and teacher under ``root`` (built once per ``root``); returns ``root``."""
    teacher = str(root / "teacher.safetensors")
    cfg = build_config(SelfForcingConfig, {"preset": "test", "data": _data(root),
                                           "models": {"teacher": teacher, "student_init": teacher, "bootstrap": True}})
    bootstrap_tiny(cfg, horizon=HORIZON)
    return root


def sf_config(tmp: Path, root: Path, mode: str = "sf", **changes: Any) -> SelfForcingConfig:
    """A Self-Forcing run of a few steps on the tiny assets (fp32, global batch 2)."""
    base: dict[str, Any] = {
        "mode": mode, "preset": "test", "precision": "fp32", "export_path": str(tmp / "student.safetensors"),
        "export_dtype": "fp32", "global_batch": 2,
        "models": {"teacher": str(root / "teacher.safetensors"), "student_init": str(root / "teacher.safetensors")},
        "run": {"runs_dir": str(tmp / "runs"), "name": f"sf_{mode}", "max_steps": 4, "save_every": 2,
                "log_every": 1, "num_threads": 1},
        "optim": {"lr": 1e-3},
        "dmd": {"gen_every": 2},
        "data": _data(root),
        "eval": {"classifier": None},
    }
    if mode == "sfpp":
        base["rollout"] = {"num_frames": 12}
    return build_config(SelfForcingConfig, merge(base, changes))


def ode_config(tmp: Path, root: Path, **changes: Any) -> OdeInitConfig:
    """An ODE-init run: 4 pairs of 8 teacher Euler steps, 4 regression steps."""
    base: dict[str, Any] = {
        "preset": "test", "precision": "fp32", "teacher": str(root / "teacher.safetensors"),
        "export_path": str(tmp / "student_ode.safetensors"), "export_dtype": "fp32",
        "global_batch": 2,
        "run": {"runs_dir": str(tmp / "runs"), "name": "ode", "max_steps": 4, "save_every": 2, "log_every": 1,
                "num_threads": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "data": _data(root),
        "pairs": {"dir": str(tmp / "pairs"), "num_pairs": 4, "teacher_steps": 8, "shard_size": 2},
    }
    return build_config(OdeInitConfig, merge(base, changes))
