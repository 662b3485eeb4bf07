"""streamgen.perf: the analytic FLOP count against a hand count and against the model itself; guards that
refuse impossible figures (MFU over 100 %, more frames than the peak allows)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from streamgen.config import ModelConfig
from streamgen.model.transformer import CausalWanTransformer
from streamgen.perf import ImpossibleFigure, matmul_peak_flops, realtime_factor, transformer_forward_flops, utilisation

TINY = ModelConfig(num_layers=1, num_heads=1, head_dim=6, ffn_dim=8, latent_channels=2, text_dim=4,
                   text_max_tokens=3)


def test_flop_count_equals_a_hand_count() -> None:
    # d = 6, 4 tokens per frame, 1 query frame (q = 4 tokens) over 2 key frames (k = 8), patch 2*1*2*2 = 8:
    #   self-attn projections 2*4*6*6*4 = 1152, scores + weighted sum 2*2*4*8*6 = 768,
    #   cross-attn q/out 2*4*6*6*2 = 576, cross scores + sum 2*2*4*3*6 = 288, FFN 2*4*6*8*2 = 768,
    #   patch embedding 2*4*8*6 = 384, head 2*4*6*8 = 384.
    flops = transformer_forward_flops(TINY, tokens_per_frame=4, query_frames=1, key_frames=2)
    assert (flops.linear, flops.attention, flops.total) == (1152 + 576 + 768 + 384 + 384, 768 + 288, 4320)


def test_flop_count_matches_the_model_forward() -> None:
    """torch's FLOP counter over a real forward (it counts GEMMs and convs; CPU SDPA is not counted, so the
    attention part is compared with a hand count): ours leaves out only the per-frame time-embedding and
    modulation MLPs, which are tiny next to the per-token matmuls at this size."""
    cfg = ModelConfig(num_layers=2, num_heads=2, head_dim=32, ffn_dim=256, latent_channels=4, text_dim=16,
                      text_max_tokens=8)
    model = CausalWanTransformer(cfg).eval()
    frames, h, w = 3, 8, 8
    context = model.encode_text(torch.randn(1, cfg.text_max_tokens, cfg.text_dim))
    x = torch.randn(1, cfg.latent_channels, frames, h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.full((1,), 500.0), context)
    ours = transformer_forward_flops(cfg, tokens_per_frame=(h // 2) * (w // 2), query_frames=frames,
                                     key_frames=frames)
    counts = counter.get_flop_counts()["Global"]
    gemm_ops = ("aten.addmm", "aten.mm", "aten.convolution")
    measured = sum(v for op, v in counts.items() if str(op) in gemm_ops)
    assert ours.linear <= measured <= 1.05 * ours.linear, (ours, counts)
    q = k = frames * (h // 2) * (w // 2)
    assert ours.attention == cfg.num_layers * 4 * q * (k + cfg.text_max_tokens) * cfg.dim


def test_mfu_above_100_percent_is_refused() -> None:
    assert utilisation(50e9, 1.0, 100e9) == pytest.approx(0.5)
    with pytest.raises(ImpossibleFigure, match="2200 %"):
        utilisation(22e9, 1.0, 1e9)  # a bf16 forward timed against an fp32... or an emulated-bf16 peak
    for bad in ((0, 1.0, 1e9), (1e9, 0.0, 1e9), (1e9, 1.0, -1.0)):
        with pytest.raises(ImpossibleFigure):
            utilisation(*bad)


def test_realtime_factor_is_guarded_by_the_peak() -> None:
    # 160 frames in 2 s at 16 fps = 5x real time; 1 GFLOP per frame -> 80 GFLOP/s, under a 100 GFLOP/s peak.
    assert realtime_factor(160, 2.0, 16, flops_per_frame=1e9, peak_flops=100e9) == pytest.approx(5.0)
    with pytest.raises(ImpossibleFigure):  # a fake timing: 10x faster than the GEMM peak allows
        realtime_factor(160, 0.2, 16, flops_per_frame=1e9, peak_flops=100e9)
    with pytest.raises(ImpossibleFigure):
        realtime_factor(0, 1.0, 16, flops_per_frame=1e9, peak_flops=100e9)


def test_peak_is_measured_in_the_requested_dtype() -> None:
    assert matmul_peak_flops(torch.float32, size=64, seconds=0.01) > 0
    assert matmul_peak_flops(torch.float32, size=64, seconds=0.01, quantize="int8") > 0


def test_the_best_peak_is_the_faster_of_both_linear_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """MFU's denominator is the fastest GEMM of the dtype: with prepacked linears faster than F.linear, a peak
    measured on F.linear alone would let a true figure read as over 100 %."""
    import streamgen.perf as perf
    from streamgen.model.prepack import onednn_unavailable

    if onednn_unavailable() is not None:
        pytest.skip(f"needs oneDNN: {onednn_unavailable()}")
    assert matmul_peak_flops(torch.float32, size=64, seconds=0.01, linear="onednn") > 0
    with pytest.raises(ValueError, match="aten or onednn"):
        matmul_peak_flops(torch.float32, size=64, seconds=0.01, linear="mkl")
    with pytest.raises(ValueError, match="does not apply"):  # INT8 times its own linear: never silently ignored
        matmul_peak_flops(torch.float32, size=64, seconds=0.01, quantize="int8", linear="onednn")
    fake = {"aten": 100e9, "onednn": 250e9}
    monkeypatch.setattr(perf, "matmul_peak_flops", lambda dtype, quantize="none", device="cpu", linear="aten":
                        fake[linear] if quantize == "none" else 50e9)
    assert perf.best_matmul_peak_flops(torch.float32) == 250e9
    assert perf.best_matmul_peak_flops(torch.float32, quantize="int8") == 50e9  # INT8 runs its own linear
    fake["aten"] = 300e9
    assert perf.best_matmul_peak_flops(torch.float32) == 300e9
