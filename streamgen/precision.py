"""Which floating-point dtype is fast here: bf16 only where the hardware multiplies it natively.

CPUs differ by two orders of magnitude: with AVX512-BF16 or AMX a bf16 GEMM runs ~4.5x faster than
fp32, but on an AVX2-only CPU PyTorch emulates bf16 and a GEMM runs at ~1 GFLOP/s against fp32's
~165 (measured on a 2-core AMD EPYC). So ``auto`` -- the default of the server, the CLI, the
benchmarks and the trainer -- reads the CPU's flags and picks fp32 where bf16 would be emulated.
Nothing here runs at import (torch is imported inside the functions, so the CLI's ``--help`` stays
instant); the flag read is cached, the GEMM probe runs only where flags cannot be read or a user forces
bf16 on a CPU without it.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("auto", "float32", "bfloat16")
# CPU flags (Linux /proc/cpuinfo spelling) that mean a native bf16 dot product / matrix unit.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model runs in, and a one-line reason a user can read at start-up."""

    dtype: torch.dtype
    reason: str
    warning: str | None = None  # set when the user forced a dtype this device runs slowly

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...] | None:
    """The native-bf16 flags this CPU reports, or ``None`` where its flags cannot be read."""
    path = Path(cpuinfo)
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in BF16_CPU_FLAGS if f in flags)
    return None


def gemm_bf16_slowdown(size: int = 256, repeats: int = 5) -> float:
    """Time of a bf16 GEMM over an fp32 one of the same size on this CPU (> 1: bf16 is slower).

    Sub-second even where bf16 is emulated (256^3 at ~1 GFLOP/s is ~30 ms).
    """
    import torch

    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: first-call dispatch and packing
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        timings[dtype] = best
    return timings[torch.bfloat16] / max(timings[torch.float32], 1e-9)


def cpu_bf16_is_native() -> tuple[bool, str]:
    """Whether bf16 matmuls are native on this CPU, and how that was decided."""
    flags = cpu_bf16_flags()
    if flags is not None:
        if flags:
            return True, f"CPU has {'/'.join(flags)}"
        return False, f"CPU has no {' or '.join(BF16_CPU_FLAGS)} (bf16 would be emulated)"
    # No readable flag list (macOS, some containers): measure instead of guessing.
    slowdown = gemm_bf16_slowdown()
    return slowdown < 1.0, f"GEMM probe on {platform.machine() or 'this CPU'}: bf16 takes {slowdown:.2f}x fp32"


@functools.cache
def bf16_gemms_native() -> bool:
    """:func:`cpu_bf16_is_native`'s answer, cached for the process: the hot paths' question (the attention
    backend asks it per call). Where it is False (an AVX2-only CPU) a bf16 GEMM is emulated at ~1 % of the
    float32 rate, while PyTorch's attention and the float32 norms are not: a bf16 model there outruns its own
    GEMMs. A test that wants the other answer patches this function (or clears its cache around patched flags)."""
    return cpu_bf16_is_native()[0]


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> DtypeChoice:
    """Turn ``auto`` / ``float32`` / ``bfloat16`` into a dtype for ``device``.

    ``auto``: bf16 on CUDA devices that support it, else fp32 there; on a CPU, bf16 only with native
    bf16 units (see :func:`cpu_bf16_is_native`). A forced ``bfloat16`` on a CPU without them is
    allowed, with a warning giving the measured slowdown. A dtype the device cannot run (bfloat16 on a
    CUDA device without bf16) raises ``ValueError`` naming what to use instead
    (:func:`streamgen.device.check_dtype`, which also refuses float16 on a CPU), as do unknown names
    and devices. float16 is not offered: the model's fp32-sensitive ops are checked in bf16 only.
    """
    import torch

    from streamgen.device import check_dtype, cuda_has_native_bf16

    by_name = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}: use cpu or cuda[:N]")
    if name != "auto":
        check_dtype(by_name[name], device)
    if device.type == "cuda":
        if name == "auto":
            if cuda_has_native_bf16(device):
                return DtypeChoice(torch.bfloat16, "auto: CUDA device with bf16 support")
            return DtypeChoice(torch.float32, "auto: this CUDA device has no bf16 support")
        return DtypeChoice(by_name[name], "forced")
    native, why = cpu_bf16_is_native()
    if name == "auto":
        return DtypeChoice(torch.bfloat16 if native else torch.float32, f"auto: {why}")
    if name == "bfloat16" and not native:
        slowdown = gemm_bf16_slowdown()
        return DtypeChoice(torch.bfloat16, "forced", warning=(
            f"--dtype bfloat16 on a CPU without native bf16 ({why}): a GEMM runs {slowdown:.0f}x slower than "
            "float32 here; use --dtype auto or float32"))
    return DtypeChoice(by_name[name], "forced")


def resolve_precision(name: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """The trainer's ``precision`` setting (``auto`` / ``bf16`` / ``fp32``) resolved for ``device``.

    Returns (``"bf16"`` or ``"fp32"``, reason). ``bf16`` means bf16 autocast over fp32 master weights
    (on CUDA: accelerate's ``mixed_precision="bf16"``). ``auto`` on CUDA is bf16 where the device
    supports it; ``bf16`` on a CUDA device without it raises ``ValueError``.
    """
    import torch

    from streamgen.device import check_dtype, cuda_has_native_bf16

    if name not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {name!r}; choose one of auto, bf16, fp32")
    device = torch.device(device)
    if device.type == "cuda":
        bf16_ok = cuda_has_native_bf16(device)
        if name == "bf16":
            check_dtype(torch.bfloat16, device)
        if name != "auto":
            return name, "forced"
        return ("bf16", "auto: CUDA device with bf16 support") if bf16_ok else (
            "fp32", "auto: this CUDA device has no bf16 support")
    if name != "auto":
        return name, "forced"
    native, why = cpu_bf16_is_native()
    return ("bf16" if native else "fp32"), f"auto: {why}"
