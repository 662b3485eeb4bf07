"""streamgen.precision: bf16 only where the CPU multiplies it natively; forced bf16 warns with the slowdown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamgen import precision

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse avx2 fma", ()),
    ("fpu avx2 avx512f avx512_bf16", ("avx512_bf16",)),
    ("fpu avx512_bf16 amx_tile amx_bf16", ("amx_bf16", "avx512_bf16")),
])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, flags: str, expected: tuple[str, ...]) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    precision.cpu_bf16_flags.cache_clear()
    try:
        assert precision.cpu_bf16_flags(str(info)) == expected
        assert precision.cpu_bf16_flags(str(tmp_path / "missing")) is None
    finally:
        precision.cpu_bf16_flags.cache_clear()


@pytest.mark.parametrize(("flags", "dtype"), [((), torch.float32), (("avx512_bf16",), torch.bfloat16),
                                               (("amx_bf16",), torch.bfloat16)])
def test_auto_picks_bf16_only_with_native_units(monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...],
                                                dtype: torch.dtype) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    choice = precision.resolve_dtype("auto", "cpu")
    assert choice.dtype == dtype and choice.warning is None
    assert choice.reason.startswith("auto: ")
    assert precision.resolve_precision("auto")[0] == ("bf16" if dtype == torch.bfloat16 else "fp32")


def test_unreadable_flags_fall_back_to_a_measured_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: None)
    monkeypatch.setattr(precision, "gemm_bf16_slowdown", lambda: 150.0)
    assert precision.resolve_dtype("auto").dtype == torch.float32
    monkeypatch.setattr(precision, "gemm_bf16_slowdown", lambda: 0.25)
    choice = precision.resolve_dtype("auto")
    assert choice.dtype == torch.bfloat16 and "0.25x" in choice.reason


def test_forced_bf16_without_native_units_warns_with_the_slowdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    monkeypatch.setattr(precision, "gemm_bf16_slowdown", lambda: 147.0)
    choice = precision.resolve_dtype("bfloat16")
    assert choice.dtype == torch.bfloat16
    assert choice.warning is not None and "147x slower" in choice.warning and "float32" in choice.warning
    assert precision.resolve_dtype("float32").warning is None


def test_bad_names_are_errors_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        precision.resolve_dtype("float16")
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        precision.resolve_precision("fp16")


def test_gemm_probe_returns_a_positive_ratio() -> None:
    assert precision.gemm_bf16_slowdown(size=32, repeats=1) > 0


def test_cli_rejects_an_unknown_dtype_before_loading() -> None:
    res = subprocess.run([sys.executable, "-m", "streamgen.cli", "generate", "--prompt", "x", "--num-frames", "4",
                          "--out", "/tmp/x.mp4", "--dtype", "float16"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "float16" in res.stderr
