"""Which device a command runs on: ``--device auto|cpu|cuda|cuda:N`` turned into a ``torch.device``.

Every entry point (``streamgen serve``/``generate``, the benchmarks, the trainer stages) resolves its
device here once, before anything loads, and hands the result on; nothing below the entry points
chooses a device by itself. ``auto`` is ``cuda:0`` when PyTorch sees a CUDA device, else ``cpu``.
A request this machine cannot honour (CUDA without CUDA, an index past the last GPU, a dtype the
device cannot run) is a ``ValueError`` naming the device and what to use instead, so the CLIs exit 2
with one line.

This module never allocates on a device and never imports torch at import time (the CLIs' ``--help``
stays instant); it only reads ``torch.cuda.is_available`` / ``device_count`` / ``get_device_capability``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")  # what --device accepts (N: a CUDA device index)
DEVICE_HELP = "device to run on: auto (cuda:0 when CUDA is available, else cpu), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


class NoCudaError(ValueError):
    """CUDA was asked for on a machine where PyTorch sees no CUDA device."""


def parse_device(text: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"auto"`` -> ``("auto", None)``. Unknown text raises ``ValueError``.

    Only the syntax is checked here (no torch import): an index is allowed on ``cuda`` alone.
    """
    match = _PATTERN.fullmatch(text.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"unknown device {text!r}; use one of {', '.join(DEVICE_NAMES)}")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


def resolve_device(text: str) -> torch.device:
    """The ``torch.device`` for ``--device text`` on this machine.

    ``auto`` -> ``cuda:0`` where ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` -> ``cuda:0``.
    Raises :class:`NoCudaError` (a ``ValueError``) for CUDA without CUDA, ``ValueError`` for an
    unknown string or an index past the last CUDA device.
    """
    import torch

    kind, index = parse_device(text)
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        raise NoCudaError(f"device {text!r} asked for CUDA but PyTorch sees no CUDA device on this machine "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                          f"use --device cpu or auto")
    count = torch.cuda.device_count()
    index = 0 if index is None else index
    if index >= count:
        raise ValueError(f"device {text!r} does not exist: this machine has {count} CUDA device(s), "
                         f"cuda:0..cuda:{count - 1}; use one of those (or check CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DeviceInfo:
    """What a run prints at start: the device and, on CUDA, which card."""

    device: torch.device
    name: str  # "cpu" or the CUDA device's name
    memory_bytes: int | None  # total device memory (CUDA only)

    def describe(self) -> str:
        if self.memory_bytes is None:
            return str(self.device)
        return f"{self.device} ({self.name}, {self.memory_bytes / 2**30:.0f} GiB)"


def device_info(device: torch.device) -> DeviceInfo:
    import torch

    if device.type != "cuda":
        return DeviceInfo(device, "cpu", None)
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo(device, props.name, int(props.total_memory))


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype ``device`` cannot run, naming what to use instead.

    float16 on a CPU (no fast kernels, and the model's norms/softmax assume a wider range: use
    bfloat16 where the CPU has native bf16, else float32); bfloat16 on a CUDA device without bf16
    support (pre-Ampere: use float16 or float32).
    """
    import torch

    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError(f"dtype float16 is not supported on {device}: use float32, or bfloat16 on a CPU with "
                         f"native bf16 (--dtype auto picks)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not cuda_has_native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"dtype bfloat16 is not supported on {device} ({name}, no native bf16): use float32 "
                         f"(or float16 where the model allows it); --dtype auto picks float32 there")


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` itself (not the current one) computes in bf16 natively: compute capability
    8.0 or newer (Ampere on). ``torch.cuda.is_bf16_supported()`` alone also says yes where bf16 is only
    emulated (pre-Ampere), and asks about the current device. ROCm: torch's check without emulation."""
    import torch

    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on CPU): timings must not end before the work does."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
