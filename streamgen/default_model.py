"""The committed default model: where its weights live and how a command finds and checks them.

``streamgen serve`` and ``streamgen generate`` without ``--transformer`` / ``--vae`` serve the
``default`` preset's trained student and VAE from the repository's ``checkpoints/`` (or the
directory in ``$STREAMGEN_CHECKPOINTS``, e.g. a volume mounted into a container). Missing or
corrupt files are a clear error that names the command restoring them; nothing ever falls back
to random weights (that takes an explicit ``--random-init``).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PRESET = "default"
STUDENT_FILE = "student_default.safetensors"
VAE_FILE = "vae_default.safetensors"
ENV_DIR = "STREAMGEN_CHECKPOINTS"
MODEL_DIR = "default"  # checkpoints/default/model.json: the same two files as a model directory (`--model`)


def checkpoints_dir() -> Path:
    """``$STREAMGEN_CHECKPOINTS``, else the ``checkpoints/`` beside the ``streamgen`` package (the repo's)."""
    env = os.environ.get(ENV_DIR, "").strip()
    return Path(env) if env else Path(__file__).resolve().parent.parent / "checkpoints"


def model_dir() -> Path:
    """The default model as a model directory (its ``model.json`` references the two files above)."""
    return checkpoints_dir() / MODEL_DIR


def restore_hint(directory: Path) -> str:
    if os.environ.get(ENV_DIR, "").strip():
        return f"put the files into ${ENV_DIR} ({directory}) or unset it to use the repository's checkpoints/"
    return (f"restore them with `git checkout -- checkpoints/{STUDENT_FILE} checkpoints/{VAE_FILE}` in the "
            "repository (they are committed), pass --transformer and --vae, or use --random-init for random weights")


def resolve(preset: str, transformer: Path | None, vae: Path | None, random_init: bool
            ) -> tuple[Path | None, Path | None]:
    """The checkpoints a command should load: the given ones, or the committed default model's.

    Raises ``ValueError`` with the restore command when the default files are missing or do not
    load as streamgen checkpoints of the right kind; with ``random_init`` returns ``(None, None)``.
    """
    if random_init:
        if transformer is not None or vae is not None:
            raise ValueError("--random-init takes no --transformer / --vae")
        return None, None
    if transformer is not None and vae is not None:
        return transformer, vae
    if transformer is not None or vae is not None:
        raise ValueError("give both --transformer and --vae, or neither for the committed default model")
    if preset != DEFAULT_PRESET:
        raise ValueError(f"preset {preset!r} has no committed weights: give --transformer and --vae, "
                         f"or --random-init for random weights")
    from streamgen.model.weights import read_checkpoint

    directory = checkpoints_dir()
    paths = (directory / STUDENT_FILE, directory / VAE_FILE)
    for path, kind in zip(paths, ("transformer", "vae"), strict=True):
        if not path.is_file():
            raise ValueError(f"the default model's weights are missing: {path} not found; {restore_hint(directory)}")
        try:
            read_checkpoint(path, kind)
        except ValueError as exc:
            raise ValueError(f"the default model's weights are unusable: {exc}; {restore_hint(directory)}") from exc
    return paths
