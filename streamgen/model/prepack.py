"""oneDNN-prepacked linear layers for CPU inference (``--linear onednn``, what ``auto`` picks on a CPU).

``F.linear`` on a CPU re-reads its weight in plain row-major layout on every call (float32 goes to
MKL's ``sgemm``, bf16 to oneDNN with a per-call weight reorder). Reordering each weight once, at load,
into oneDNN's blocked layout for the chunk's token count and calling oneDNN's inner product on it is
what Inductor's CPU freezing pass does for a compiled model; here it is done eagerly, so it needs no
compiler and no start-up time. Measured on a 2-core AMD EPYC with ``avx512_bf16`` (docs/speed.md): the
default preset's chunk GEMMs run 1.3-1.6x faster in bf16 and 2-3x in float32 (MKL takes its AVX2 code on
AMD CPUs; oneDNN its AVX512 code); with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) still
1.05-1.35x.

Results: bf16 outputs are bitwise equal to ``F.linear``'s on the measured machine; float32 outputs differ
by summation order only (~3e-6 relative). ``tests/model/test_prepack.py`` checks the whole transformer
against the unpacked one. Inference only: the packed weight is an opaque oneDNN tensor with no gradient,
so the swapped layers' weights are frozen (``requires_grad=False``) and a forward that would need a
gradient (an input that requires one) is refused. A weight moved, cast, replaced or written in place after
packing is refused as stale (device, dtype, storage and version counter are checked per call); a write
through ``.data`` bypasses the version counter and is *not* seen, so load weights before packing. The
original ``weight``/``bias`` stay as attributes (for ``state_dict`` and anything that reads them); the packed
copy adds one weight's memory per layer.

Applied after the dtype cast, never inside the model: :func:`prepack_linears` swaps ``nn.Linear``
modules for :class:`PrepackedLinear`. Nothing here runs at import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

LINEAR_KERNELS = ("auto", "onednn", "aten")


@dataclass(frozen=True)
class LinearChoice:
    """Which kernel the transformer's linear layers run, and a one-line reason for the start-up log."""

    kernel: str  # "onednn" | "aten"
    reason: str


def onednn_unavailable(dtype: torch.dtype = torch.float32) -> str | None:
    """Why this torch build or CPU cannot run prepacked oneDNN linears in ``dtype``, or ``None`` when it can.

    Beyond the build, oneDNN packs bf16 weights only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT (an
    AVX2-only CPU refuses): a tiny weight is packed once per dtype to find out.
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "this torch build has oneDNN (mkldnn) disabled or missing"
    for op in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, op):
            return f"this torch build has no torch.ops.mkldnn.{op}"
    return _pack_probe(dtype)


@functools.cache
def _pack_probe(dtype: torch.dtype) -> str | None:
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN linears run float32 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    try:
        with torch.no_grad():
            w = torch.ones(8, 8, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
            y = torch.ops.mkldnn._linear_pointwise(torch.ones(4, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError as err:
        name = str(dtype).removeprefix("torch.")
        return f"oneDNN cannot pack {name} weights on this CPU ({str(err).splitlines()[0]})"
    if not bool((y == 8).all()):
        return "oneDNN's packed linear gave a wrong result in the start-up check"
    return None


def resolve_linear(kernel: str, device: torch.device | str, *, dtype: torch.dtype = torch.float32,
                   quantize: str = "none", compile: bool = False) -> LinearChoice:
    """``auto`` -> ``onednn`` on a CPU where oneDNN packs ``dtype`` (not INT8, not compiled), else ``aten``.

    An explicit ``onednn`` that cannot run here (a GPU, INT8, ``--compile``, no oneDNN) is a ``ValueError``
    naming what to use instead, never a silent fall-back.
    """
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}; choose one of {', '.join(LINEAR_KERNELS)}")
    device = torch.device(device)
    if kernel == "aten":
        return LinearChoice("aten", "asked for (--linear aten)")
    blocker = None
    if device.type != "cpu":
        blocker = f"prepacked oneDNN linears are a CPU path, not {device.type}; cuBLAS already runs the GEMMs"
    elif quantize != "none":
        blocker = f"--quantize {quantize} replaces the linear layers with its own INT8 ones"
    elif compile:
        blocker = "--compile leaves the linear layers to Inductor"
    else:
        blocker = onednn_unavailable(dtype)
    if blocker is None:
        why = "asked for (--linear onednn)" if kernel == "onednn" else "auto: CPU, weights reordered once at load"
        return LinearChoice("onednn", why)
    if kernel == "onednn":
        raise ValueError(f"--linear onednn cannot run here: {blocker}; use --linear aten (or auto)")
    return LinearChoice("aten", f"auto: {blocker}")


class PrepackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is reordered once into oneDNN's layout; same inputs, same outputs."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(f"PrepackedLinear needs a CPU weight, got {linear.weight.device}")
        why = onednn_unavailable(linear.weight.dtype)
        if why is not None:
            raise ValueError(f"cannot prepack this linear layer: {why}; use --linear aten")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Frozen: the packed copy has no gradient, so the weights it stands for cannot take one either.
        self.weight = linear.weight.requires_grad_(False)
        self.bias = None if linear.bias is None else linear.bias.requires_grad_(False)
        self.rows_hint = rows_hint
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self._packed_from = self._source_state()

    def _source_state(self) -> tuple[object, ...]:
        w = self.weight
        return (w.device, w.dtype, w.data_ptr(), w._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._source_state() != self._packed_from:
            raise RuntimeError("PrepackedLinear: the weight was moved, cast or written after packing, so the packed "
                               "copy is stale; load weights and cast the model before prepack_linears()")
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError("PrepackedLinear is inference-only (no gradient flows through its packed weight): "
                               "train or differentiate the model with --linear aten")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"PrepackedLinear: input {x.dtype} against weight {self.weight.dtype}")
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rows_hint={self.rows_hint}")


def prepack_linears(model: nn.Module, rows_hint: int) -> int:
    """Swap every ``nn.Linear`` under ``model`` for a :class:`PrepackedLinear` in place; returns how many.

    ``rows_hint``: the GEMM row count the packed layout is tuned for (a chunk's token count); other row
    counts run correctly. The model must be on a CPU in its serving dtype (float32 or bf16).
    """
    if rows_hint < 1:
        raise ValueError(f"rows_hint must be >= 1, got {rows_hint}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                why = onednn_unavailable(child.weight.dtype)
                if why is not None:
                    raise ValueError(f"cannot prepack linear layers: {why}; use --linear aten")
                setattr(parent, name, PrepackedLinear(child, rows_hint))
                swapped += 1
    return swapped
