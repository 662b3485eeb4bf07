"""Post-construction INT8 for the transformer's linear layers (CPU), applied after loading, never inside the model.

``int8``: PyTorch's dynamic quantisation -- weights stored as per-tensor INT8, activations quantised
per call, GEMMs in INT8 (fbgemm / x86 kernels, which run on AVX2 as well as AVX512 CPUs). Only the DiT
blocks' ``nn.Linear`` layers are converted: the patch embedding, the time/text embedders and the output
head stay in float32 (they are a few percent of the FLOPs and the head's error would land directly in
the predicted velocity). The model must be float32 on a CPU; anything else is a clear error.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZE_MODES = ("none", "int8")


def check_quantize(mode: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming what to use if ``mode`` cannot run on ``device`` in ``dtype``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"--quantize {mode} runs on CPU only (dynamic INT8 kernels), not on {device}; "
                         "on a GPU use --quantize none with --dtype bfloat16")
    if dtype != torch.float32:
        raise ValueError(f"--quantize {mode} needs the float32 model (it quantises float32 weights), got "
                         f"{str(dtype).removeprefix('torch.')}; use --dtype float32 (or auto on a CPU without bf16)")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        raise ValueError(f"--quantize {mode}: this torch build has no x86/fbgemm INT8 engine "
                         f"(has {', '.join(engines)}); use --quantize none")


def quantize_transformer(model: nn.Module, mode: str) -> nn.Module:
    """Convert ``model.blocks``' linear layers in place per ``mode`` and return ``model`` (eval mode)."""
    param = next(model.parameters())
    check_quantize(mode, param.device, param.dtype)
    if mode == "none":
        return model
    from torch.ao.quantization import quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    with warnings.catch_warnings():
        # torch marks torch.ao as deprecated in favour of torchao, but torchao 0.18's int8 dynamic path runs
        # ~14x *slower* than float32 on an AVX2 CPU (3.7 s vs 0.26 s for a default-preset chunk forward;
        # torch.ao's: 0.18 s), so we keep torch.ao while this torch release ships it.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*",
                                category=DeprecationWarning)
        model.blocks = quantize_dynamic(model.eval().blocks, {nn.Linear}, dtype=torch.qint8)
    return model
