"""Resumable, atomic run checkpoints under ``runs/<name>/checkpoints/``.

Layout of one checkpoint (a directory, ``step_00001234``)::

    model.safetensors   trainable weights (fp32)
    ema.safetensors     EMA weights (fp32)
    state.pt            optimizer state, step, config, per-rank RNG states (torch, numpy, python), and
                        the stage's ``extra`` (e.g. its evaluation history)

It is written into a temporary sibling directory, each file fsynced, then the directory is
renamed into place (``os.replace``), and only *then* is the ``latest`` pointer (a one-line text
file, itself replaced atomically) moved to it. A crash at any moment leaves ``latest`` naming a
complete checkpoint. Loading checks every file and raises :class:`CheckpointError` with the path
and the reason, never a half-loaded state. This module never decides *when* to save.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from streamgen.model.weights import atomic_save_safetensors, load_state_strict, publish_atomically

LATEST = "latest"
_PREFIX = "step_"


class CheckpointError(ValueError):
    """A run checkpoint is missing, incomplete or corrupt."""


@dataclass
class RunState:
    """What a stage hands to :func:`save` and gets back from :func:`load`."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    config: dict[str, Any]
    rng: dict[int, dict[str, Any]]  # rank -> RNG states
    # What the stage keeps across a resume besides weights and optimizer, e.g. the evaluation history that
    # report.json lists (a resumed run's report covers the whole run, not only the steps after the resume).
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch CPU, numpy, python)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish_atomically(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temp file in the same directory, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_atomically(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(run_dir: Path, state: RunState, keep: int) -> Path:
    """Write ``state`` as a new checkpoint, point ``latest`` at it, prune to the newest ``keep``; returns its dir.

    Single-process operation: under multi-process training only rank 0 calls it (with every
    rank's RNG state gathered into ``state.rng``).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        meta = {"step": str(state.step)}
        atomic_save_safetensors(state.model, tmp / "model.safetensors", meta)
        atomic_save_safetensors(state.ema, tmp / "ema.safetensors", meta)
        _torch_save_atomic({"step": state.step, "optimizer": state.optimizer, "config": state.config,
                            "rng": state.rng, "extra": state.extra}, tmp / "state.pt")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, final.name + "\n")  # last: only a complete checkpoint becomes "latest"
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    latest = latest_checkpoint(root.parent)
    for old in steps[:-keep]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".{_PREFIX}*.tmp"):  # temp dirs of a crashed save
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint directory ``latest`` names, or ``None`` if the run has none yet."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name.startswith(_PREFIX) or "/" in name:
        raise CheckpointError(f"{pointer} is corrupt: it holds {name!r}, not a checkpoint name")
    path = checkpoint_dir(run_dir) / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path}, which does not exist")
    return path


def load(path: Path) -> RunState:
    """Read a checkpoint directory; any missing or unreadable file raises :class:`CheckpointError`."""
    path = Path(path)
    for name in ("model.safetensors", "ema.safetensors", "state.pt"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        model = load_file(str(path / "model.safetensors"))
        ema = load_file(str(path / "ema.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} has corrupt weights: {exc}") from exc
    try:
        # weights_only=False: the state holds numpy/python RNG tuples; we only read our own files.
        raw = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt state.pt: {exc}") from exc
    if not isinstance(raw, dict) or not {"step", "optimizer", "config", "rng"} <= set(raw):
        raise CheckpointError(f"checkpoint {path} state.pt lacks step/optimizer/config/rng")
    return RunState(step=int(raw["step"]), model=model, ema=ema, optimizer=raw["optimizer"], config=raw["config"],
                    rng=raw["rng"], extra=dict(raw.get("extra") or {}))  # checkpoints written before `extra`: {}


def restore_modules(state: RunState, model: nn.Module, ema: nn.Module, path: Path) -> None:
    """Strictly load the checkpoint's weights into ``model`` and ``ema`` (mismatch -> :class:`CheckpointError`)."""
    try:
        load_state_strict(model, state.model, what=f"checkpoint {path} (model)")
        load_state_strict(ema, state.ema, what=f"checkpoint {path} (ema)")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
