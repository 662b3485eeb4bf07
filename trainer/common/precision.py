"""The ``precision`` setting of every trainer stage: ``auto`` (the default), ``bf16`` or ``fp32``.

``bf16`` is bf16 autocast over fp32 master weights. On a CPU it pays only where the CPU multiplies
bf16 natively (AVX512-BF16 / AMX); on an AVX2-only CPU PyTorch emulates it and a teacher step runs
~30x slower than fp32 (docs/training.md). On CUDA ``auto`` is bf16 wherever the GPU supports it, run
as accelerate's ``mixed_precision="bf16"`` on the prepared model. ``auto`` picks with the server's detection
(:func:`streamgen.precision.resolve_precision`) once at the start of a stage; the stage then runs and
records (checkpoint config, report) the resolved value, so a run's record says what it actually used.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, TypeVar

from streamgen.precision import resolve_precision

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16")  # what a config may say
EXPORT_DTYPES = ("fp32", "bf16")  # what a stored checkpoint may be

C = TypeVar("C")


def resolve_config_precision(cfg: C, stage: str, log: bool = True, device: torch.device | str = "cpu") -> C:
    """``cfg`` with ``cfg.precision`` resolved to ``"bf16"`` or ``"fp32"`` for ``device``; prints the choice."""
    choice, reason = resolve_precision(cfg.precision, device)  # type: ignore[attr-defined]
    if log:
        print(f"{stage}: precision {choice} ({reason})", flush=True)
    return dataclasses.replace(cfg, precision=choice)  # type: ignore[type-var]
