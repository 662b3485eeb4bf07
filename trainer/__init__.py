"""streamgen trainer: procedural data, teacher, Self-Forcing distillation and evaluation.

The trainer imports :mod:`streamgen`; :mod:`streamgen` never imports the trainer.

Its own dependencies (accelerate, TensorBoard, matplotlib, SciPy, PyYAML) are the ``train`` extra,
which a serving install leaves out. Importing ``trainer`` checks that they are present (a lookup,
nothing is imported), so every ``python -m trainer.*`` stops at once naming the extra, rather than
at a bare ``ModuleNotFoundError`` or, for the lazily imported plotting, after hours of training.
"""

from __future__ import annotations

import importlib.util

# import name -> distribution name, of the `train` extra in pyproject.toml
TRAIN_EXTRA: dict[str, str] = {"accelerate": "accelerate", "tensorboard": "tensorboard", "matplotlib": "matplotlib",
                               "scipy": "scipy", "yaml": "pyyaml"}


def _missing_train_extra() -> list[str]:
    return [dist for module, dist in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]


if _missing := _missing_train_extra():
    raise ModuleNotFoundError(f"the trainer needs the 'train' extra (missing: {', '.join(_missing)}): "
                              f"pip install 'streamgen[train]'", name=_missing[0])
