"""Speed figures that cannot lie: analytic FLOPs, a measured matmul peak, and guards on what they give.

A benchmark divides an analytic FLOP count by a measured time and by a measured peak. If the peak was
measured in another dtype than the model ran in (bf16 on a CPU that emulates it runs at ~1 GFLOP/s),
"MFU" comes out at 2000 %. So the peak is always measured in the dtype the model runs, and every
derived figure passes a guard that raises :class:`ImpossibleFigure` instead of printing nonsense.
Pure arithmetic except :func:`matmul_peak_flops`; never imported by the model or the engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamgen.config import ModelConfig

if TYPE_CHECKING:
    import torch


class ImpossibleFigure(RuntimeError):
    """A derived speed figure exceeds what the measured hardware peak allows: a timing or peak bug."""


@dataclass(frozen=True)
class ForwardFlops:
    """Matmul FLOPs of one forward, split so each part can be checked against what counts it."""

    linear: int  # projections, FFN, patch embedding and head: GEMMs against weights
    attention: int  # q @ k^T and p @ v, self- and cross-attention

    @property
    def total(self) -> int:
        return self.linear + self.attention


def transformer_forward_flops(model: ModelConfig, tokens_per_frame: int, query_frames: int,
                              key_frames: int) -> ForwardFlops:
    """Matmul FLOPs (2 per multiply-add) of one causal-DiT forward over ``query_frames`` new frames.

    ``key_frames`` counts the frames self-attention reads (cached context + the chunk itself). The
    prompt's cross-attention K/V are computed once per prompt and are not counted; nor are the per-frame
    time-embedding MLPs (a few rows, not per token) or element-wise work (norms, RoPE, modulation, softmax).
    """
    d = model.dim
    q = query_frames * tokens_per_frame
    k = key_frames * tokens_per_frame
    patch = model.latent_channels * math.prod(model.patch_size)
    linear_per_layer = (2 * q * d * d * 4  # self-attention q, k, v, out projections
                        + 2 * q * d * d * 2  # cross-attention q and out projections
                        + 2 * q * d * model.ffn_dim * 2)  # FFN up and down
    attention_per_layer = (2 * 2 * q * k * d  # self-attention scores and weighted sum
                           + 2 * 2 * q * model.text_max_tokens * d)  # cross-attention scores and weighted sum
    embed_and_head = 2 * q * patch * d * 2  # patch embedding (a strided conv: one GEMM) + output head
    return ForwardFlops(linear=model.num_layers * linear_per_layer + embed_and_head,
                        attention=model.num_layers * attention_per_layer)


def matmul_peak_flops(dtype: torch.dtype, size: int | None = None, seconds: float = 1.0, quantize: str = "none",
                      windows: int = 3, device: torch.device | str = "cpu", linear: str = "aten") -> float:
    """Sustained FLOP/s of the model's GEMM (``F.linear`` with a bias) in ``dtype`` on ``device``: MFU's denominator.

    ``F.linear``, not ``a @ b``: on a CPU without native bf16 the two take different kernels (measured
    on an AVX2 EPYC: bf16 ``mm`` ~1 GFLOP/s, bf16 ``linear`` ~5), and the model runs ``linear``.
    ``quantize="int8"`` times the INT8 dynamic linear a quantised model runs instead. The best of
    ``windows`` timing windows is kept, so a burst of load from other processes lowers the peak less
    (a peak measured too low makes a true figure look impossible). At least two GEMMs per window even
    where the dtype is emulated. ``size`` defaults to 512 on a CPU and 4096 on CUDA (a small GEMM
    leaves a GPU idle between launches); on CUDA each window ends with a synchronize. ``linear="onednn"``
    times the prepacked oneDNN linear (:mod:`streamgen.model.prepack`) instead of ``F.linear``: on some
    CPUs it is the faster kernel, and a peak must be the fastest GEMM the model could run.
    """
    import torch

    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 512)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(size, size, device=device).to(dtype)
    if linear not in ("aten", "onednn"):
        raise ValueError(f"linear must be aten or onednn, got {linear!r}")
    if quantize != "none" and linear != "aten":
        raise ValueError(f"quantize={quantize!r} times its own INT8 linear; linear={linear!r} does not apply")
    layer: Any = torch.nn.Linear(size, size, device=device).to(dtype)
    if quantize != "none":
        from streamgen.model.quantize import quantize_transformer

        holder = torch.nn.Module()
        holder.blocks = torch.nn.Sequential(layer)
        layer = quantize_transformer(holder, quantize).blocks
    elif linear == "onednn":
        from streamgen.model.prepack import PrepackedLinear

        layer = PrepackedLinear(layer.requires_grad_(False), size)
    best = 0.0
    with torch.no_grad():
        layer(a)  # warm-up: dispatch, packing, thread pool start (on CUDA: the cuBLAS handle)
        sync()
        for _ in range(windows):
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < seconds / windows:
                layer(a)
                n += 1
                if device.type == "cuda" and n % 8 == 0:
                    sync()  # queued kernels are not done work: check the clock against finished GEMMs
            sync()
            best = max(best, n * 2 * size**3 / (time.perf_counter() - t0))
    return best


def best_matmul_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu", quantize: str = "none") -> float:
    """The fastest GEMM ``device`` runs in ``dtype`` (INT8: the quantised linear): ``F.linear`` and, on a CPU where
    it runs, the prepacked oneDNN linear, whichever is faster -- MFU's denominator never rests on a slow kernel."""
    import torch

    from streamgen.model.prepack import onednn_unavailable

    best = matmul_peak_flops(dtype, quantize=quantize, device=device)
    if quantize == "none" and torch.device(device).type == "cpu" and onednn_unavailable(dtype) is None:
        best = max(best, matmul_peak_flops(dtype, device=device, linear="onednn"))
    return best


def utilisation(flops: float, seconds: float, peak_flops: float, what: str = "MFU") -> float:
    """``flops / seconds / peak``; raises :class:`ImpossibleFigure` above 100 % or on a non-positive input."""
    if flops <= 0 or seconds <= 0 or peak_flops <= 0:
        raise ImpossibleFigure(f"{what}: flops, time and peak must be > 0, got {flops}, {seconds}, {peak_flops}")
    value = flops / seconds / peak_flops
    if value > 1.0:
        raise ImpossibleFigure(
            f"{what} = {100 * value:.0f} % > 100 %: {flops / 1e9:.2f} GFLOP in {seconds * 1e3:.2f} ms is "
            f"{flops / seconds / 1e9:.1f} GFLOP/s against a measured peak of {peak_flops / 1e9:.1f} GFLOP/s; "
            "the peak was measured in another dtype or the timing missed work")
    return value


def realtime_factor(num_frames: int, seconds: float, fps: float, flops_per_frame: float, peak_flops: float) -> float:
    """Generated frames per second over playback fps, guarded by what the matmul peak allows.

    ``flops_per_frame`` is the transformer's analytic cost per pixel frame; if the measured rate implies
    more FLOP/s than the peak, the timing is wrong and :class:`ImpossibleFigure` is raised.
    """
    if num_frames <= 0 or seconds <= 0 or fps <= 0:
        raise ImpossibleFigure(f"real-time factor: frames, time and fps must be > 0, got {num_frames}, "
                               f"{seconds}, {fps}")
    utilisation(flops_per_frame * num_frames, seconds, peak_flops, what="implied transformer utilisation")
    return num_frames / seconds / fps
