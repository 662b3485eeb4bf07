"""streamgen trainer: procedural data, teacher, Self-Forcing distillation and evaluation.

The trainer imports :mod:`streamgen`; :mod:`streamgen` never imports the trainer.

Its own dependencies (accelerate, TensorBoard, matplotlib, SciPy, PyYAML) are the ``train`` extra,
which a serving install leaves out. Importing ``trainer`` checks that they are present (a lookup,
nothing is imported), so every ``python -m trainer.*`` stops at once naming the extra, rather than
at a bare ``ModuleNotFoundError`` or, for the lazily imported plotting, after hours of training.
The one exception: with ``STREAMGEN_TRAIN_LAZY_OK=1`` (set by ``benchmarks/gpu_check.py`` for its test
runs on a GPU image without them) the lazily imported ones, matplotlib and SciPy, may be missing.
"""

from __future__ import annotations

import importlib.util
import os

# import name -> distribution name, of the `train` extra in pyproject.toml
TRAIN_EXTRA: dict[str, str] = {"accelerate": "accelerate", "tensorboard": "tensorboard", "matplotlib": "matplotlib",
                               "scipy": "scipy", "yaml": "pyyaml"}


# imported only inside the functions that plot or compute a Frechet distance
LAZY_MODULES = frozenset({"matplotlib", "scipy"})


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it (gpu_check's --block-modules) or a broken one
        return False


def _missing_train_extra() -> list[str]:
    lazy_ok = os.environ.get("STREAMGEN_TRAIN_LAZY_OK") == "1"
    return [dist for module, dist in TRAIN_EXTRA.items()
            if not _installed(module) and not (lazy_ok and module in LAZY_MODULES)]


if _missing := _missing_train_extra():
    raise ModuleNotFoundError(f"the trainer needs the 'train' extra (missing: {', '.join(_missing)}): "
                              f"pip install 'streamgen[train]'", name=_missing[0])
