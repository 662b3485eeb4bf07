"""benchmarks/cpu_kernels.py: every kernel's rate is bounded by the machine's fastest matmul rate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cpu_kernels  # noqa: E402

from streamgen.perf import ImpossibleFigure  # noqa: E402


def test_a_bf16_kernel_faster_than_the_bf16_gemms_is_not_called_impossible(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without native bf16 the bf16 GEMM peak is ~1-15 GFLOP/s while PyTorch's attention widens to
    float32 inside and runs ~5x faster: its utilisation is taken against the faster (float32) peak."""
    peaks = {torch.float32: 1e12, torch.bfloat16: 1e3}  # bf16 GEMMs "emulated"; every kernel runs above 1e3
    monkeypatch.setattr(cpu_kernels, "best_matmul_peak_flops", lambda dtype: peaks[dtype])
    report = cpu_kernels.main(["--preset", "test", "--threads", "1", "--repeats", "2"])
    assert report["of_peak_denominator_gflops"] == 1e3
    bf16 = report["dtypes"]["bfloat16"]
    assert bf16["matmul_peak_gflops"] == 1e-6
    assert 0 < bf16["kernels"]["attention_sdpa"]["of_peak"] < 1


def test_a_rate_above_both_peaks_still_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "best_matmul_peak_flops", lambda dtype: 1e3)
    with pytest.raises(ImpossibleFigure, match="> 100 %"):
        cpu_kernels.main(["--preset", "test", "--threads", "1", "--repeats", "2"])
