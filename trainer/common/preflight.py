"""Preflight: every file a stage run reads, checked before any work and listed by ``--check``.

A stage lists its inputs as :class:`Input` (the config key or flag that names it, the path, whether
it is there, and the command that makes it). :func:`preflight` then, before anything is built:

* refuses a missing *required* input, listing **every** missing one with its command (a user fixes
  them all in one go instead of discovering them one run at a time);
* announces an input the run *makes itself* when it is missing (the latent dataset, ODE pairs) with
  its size and rough cost, so a run never spends twenty minutes rendering clips without a word;
* reports a missing *optional* input with what the run skips without it.

With ``--check`` it prints the whole list. The run directory is an input too: ``--resume`` needs a
checkpoint there, and a fresh run must not find one (no silent overwrite). This module never builds
anything.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer import latent_data
from trainer.common import checkpoint as ckpt
from trainer.common.config import RunConfig
from trainer.latent_data import LatentDatasetSpec

# Render + VAE-encode throughput of the default preset (128x128): 1600 clips x 24 frames in 440 s on 2 idle
# cores (docs/training.md, ~87 frames/s); 31.5 frames/s on one thread of a 2-core AMD EPYC at load average ~12
# (2.8x slower), hence "2-3x under load". Only used for the announced estimate; the progress bar has the truth.
ENCODE_PIXELS_PER_S = 1600 * 24 * 128 * 128 / 440


class MissingInputError(ValueError):
    """Required inputs of a run are missing (the message lists each with the command that makes it)."""


@dataclass(frozen=True)
class Input:
    """One file or directory a run reads."""

    key: str  # the config key (or flag) that names it, e.g. "models.teacher"
    path: Path
    present: bool
    make: str  # the command that makes it (for a flag's input, e.g. --resume: what to do instead)
    built_by_run: str | None = None  # the run makes it first when missing: what that costs
    optional: str | None = None  # the run goes on without it: what it skips
    detail: str = ""  # said when present, e.g. "resumes from step 200"

    @property
    def status(self) -> str:
        if self.present:
            return "ok"
        if self.built_by_run is not None:
            return "build"
        if self.optional is not None:
            return "skip"
        return "MISSING"

    def describe(self) -> str:
        """One line per input (``--check``), with what happens or what to run where it is not there."""
        head = f"  {self.status:<8} {self.key}: {self.path}"
        if self.present:
            return head + (f" ({self.detail})" if self.detail else "")
        if self.built_by_run is not None:
            return f"{head}\n           the run builds it first: {self.built_by_run}\n           to build it ahead: " \
                   f"{self.make}"
        if self.optional is not None:
            return f"{head}\n           without it {self.optional}; make it: {self.make}"
        return f"{head}\n           {self.make if self.key.startswith('--') else 'make it: ' + self.make}"


def file_input(key: str, path: str | Path, make: str, *, built_by_run: str | None = None,
               optional: str | None = None) -> Input:
    path = Path(path)
    return Input(key, path, path.is_file(), make, built_by_run, optional)


def command(module: str, *args: str) -> str:
    """``python -m <module> <args>``, each argument shell-quoted (paste-able)."""
    return shlex.join(["python", "-m", module, *args])


def stage_command(module: str, config: str | None, sets: dict[str, object] | None = None, *flags: str) -> str:
    """The command line of a config-driven stage: ``--config`` plus one ``--set`` per changed field."""
    args = ["--config", config] if config is not None else []
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={'null' if value is None else value}"]
    return command(module, *args, *flags)


def self_command(module: str, config: Path | None, overrides: Sequence[str], *flags: str) -> str:
    """This very invocation (same ``--config`` and ``--set``) with other ``flags``, e.g. ``--encode-only``."""
    args = ["--config", str(config)] if config is not None else []
    for text in overrides:
        args += ["--set", text]
    return command(module, *args, *flags)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Stage module -> (the file names of its committed configs, its default config); a checkpoint's "make it"
# command is the committed config that exports that very path, else the default config with export_path set.
_MAKERS = {
    "trainer.vae": ("vae_*.yaml", "configs/vae_default.yaml"),
    "trainer.teacher": ("teacher_*.yaml", "configs/teacher_default.yaml"),
    "trainer.ode_init": ("ode_init_*.yaml", "configs/ode_init_default.yaml"),
    "trainer.self_forcing": ("*.yaml", "configs/sf_default.yaml"),
}


def checkpoint_command(module: str, path: str | Path) -> str:
    """The command that exports a checkpoint to ``path`` with stage ``module`` (see ``_MAKERS``)."""
    if module == "trainer.eval.classifier":
        return command(module, "--train", "--out", str(path))
    pattern, default = _MAKERS[module]
    for config in sorted(CONFIGS.glob(pattern)):
        try:
            data = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and str(data.get("export_path")) == str(path) \
                and (module != "trainer.self_forcing" or "mode" in data):
            return stage_command(module, f"configs/{config.name}")
    return stage_command(module, default, {"export_path": path})


def encode_cost(num_clips: int, num_frames: int, height: int, width: int, latent_bytes: int) -> str:
    """Size and rough time of rendering + VAE-encoding a latent dataset (announced before it starts)."""
    frames = num_clips * num_frames
    minutes = frames * height * width / ENCODE_PIXELS_PER_S / 60
    when = "under a minute" if minutes < 1 else f"~{minutes:.0f} min"
    return (f"{num_clips} clips x {num_frames} frames at {height}x{width} ({frames} frames) rendered and "
            f"VAE-encoded, {latent_bytes / 2**20:.0f} MiB of latents; {when} on 2 idle CPU cores, 2-3x that "
            "under load (a progress bar shows the real rate)")


def latents_input(key: str, directory: str | Path, spec: LatentDatasetSpec, latent_shape: tuple[int, ...],
                  make: str) -> Input:
    """The latent dataset at ``directory`` for ``spec``: present when its manifest matches, else the run builds it.

    ``latent_shape`` is one clip's ``(C, F, h, w)``, for the announced size.
    """
    directory = Path(directory)
    manifest = directory / latent_data.MANIFEST
    present = manifest.is_file() and (directory / latent_data.TENSORS).is_file() \
        and json.loads(manifest.read_text()).get("spec") == spec.key()
    size = spec.num_clips * math.prod(latent_shape) * 4
    cost = encode_cost(spec.num_clips, spec.num_pixel_frames, spec.height, spec.width, size)
    if not present and manifest.is_file():
        cost = f"it holds a dataset for another spec and is rebuilt: {cost}"
    return Input(key, directory, present, make, built_by_run=cost,
                 detail=f"{spec.num_clips} clips x {spec.num_pixel_frames} frames")


def run_inputs(run: RunConfig, resume: bool) -> list[Input]:
    """The run directory as an input: ``--resume`` needs a checkpoint there; a fresh run must find none.

    Raises ``ValueError`` for a fresh run over an existing checkpoint (pass ``--resume`` or another name).
    """
    latest = ckpt.latest_checkpoint(run.run_dir)
    if resume:
        if latest is None:
            return [Input("--resume", ckpt.checkpoint_dir(run.run_dir) / ckpt.LATEST, False, nothing_to_resume(run))]
        return [Input("--resume", latest, True, "", detail="resumes from this checkpoint")]
    if latest is not None:
        raise ValueError(existing_run(run.run_dir, latest))
    return []


def nothing_to_resume(run: RunConfig) -> str:
    """What to do when ``--resume`` finds no checkpoint (the message names the run directory searched)."""
    return (f"--resume found no checkpoint in run directory {run.run_dir} (run.runs_dir={run.runs_dir!r}, "
            f"run.name={run.name!r}; searched {ckpt.checkpoint_dir(run.run_dir) / ckpt.LATEST}): check run.name "
            "and run.runs_dir, or drop --resume to start a new run")


def existing_run(run_dir: Path, latest: Path) -> str:
    return f"{run_dir} already has checkpoint {latest}; pass --resume to continue it or choose another run.name"


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints, decided before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def preflight(inputs: Sequence[Input], check: bool, title: str = "inputs") -> None:
    """Print the inputs (``check``), refuse missing required ones, announce what the run builds first.

    Raises :class:`MissingInputError` naming every missing required input and the command that makes it.
    """
    main = is_main_process()
    if check and main:
        print(f"{title}:" if inputs else f"{title}: none (this stage renders its own data)", flush=True)
        for item in inputs:
            print(item.describe(), flush=True)
    missing = [i for i in inputs if i.status == "MISSING"]
    if missing:
        lines = [f"  {i.make}" if i.key.startswith("--") else
                 f"  {i.key}: {i.path} does not exist\n    make it: {i.make}" for i in missing]
        raise MissingInputError(f"{len(missing)} input(s) missing, nothing was started:\n" + "\n".join(lines))
    if check and main:
        built = [i.key for i in inputs if i.status == "build"]
        print("check passed: the run can start" + (f"; it first builds {', '.join(built)}" if built else ""),
              flush=True)
    if not check and main:
        for item in inputs:
            if item.status == "build":
                print(f"{item.key} {item.path} does not exist yet: building it first: {item.built_by_run}",
                      flush=True)
            elif item.status == "skip":
                print(f"warning: {item.key} {item.path} does not exist: {item.optional}", flush=True)
