"""streamgen.device: --device parsing and resolution, dtype checks per device, and the CLI's early exit.

CUDA's presence is faked by patching ``torch.cuda``'s query functions: resolution only reads them.
Tests marked ``gpu`` run the same checks on a real CUDA device where there is one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamgen import device as dev
from streamgen import precision

REPO = Path(__file__).resolve().parents[1]


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool = True) -> None:
    """``count`` fake GPUs: compute capability 8.0 with ``bf16``, else 7.0 (a V100), whose
    ``is_bf16_supported()`` still says True (torch counts bf16 emulation by default)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if bf16 else (7, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake V100")


@pytest.mark.parametrize(("text", "parsed"), [("auto", ("auto", None)), ("cpu", ("cpu", None)),
                                              ("cuda", ("cuda", None)), ("cuda:3", ("cuda", 3)),
                                              (" CUDA:0 ", ("cuda", 0))])
def test_parse_accepts_the_documented_forms(text: str, parsed: tuple[str, int | None]) -> None:
    assert dev.parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cpu:0", "auto:1", "mps", "", "cuda:1:2"])
def test_unknown_device_strings_name_the_valid_ones(text: str) -> None:
    with pytest.raises(ValueError, match=r"unknown device .* use one of auto, cpu, cuda, cuda:N"):
        dev.resolve_device(text)


def test_auto_is_cpu_without_cuda_and_cuda0_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")
    _fake_cuda(monkeypatch, 2)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_says_so_and_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    for text in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(dev.NoCudaError, match=rf"device '{text}' asked for CUDA but .* use --device cpu or auto"):
            dev.resolve_device(text)


def test_cuda_index_out_of_range_names_the_valid_range(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 2)
    with pytest.raises(ValueError,
                       match=r"'cuda:2' does not exist: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        dev.resolve_device("cuda:2")


def test_fp16_on_cpu_is_refused_naming_what_to_use() -> None:
    with pytest.raises(ValueError, match="float16 is not supported on cpu: use float32"):
        dev.check_dtype(torch.float16, torch.device("cpu"))
    dev.check_dtype(torch.float32, torch.device("cpu"))
    dev.check_dtype(torch.bfloat16, torch.device("cpu"))


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 1, bf16=False)
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError,
                       match=r"bfloat16 is not supported on cuda:0 \(Fake V100, no native bf16\): use float32"):
        dev.check_dtype(torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="use float32"):
        precision.resolve_dtype("bfloat16", cuda)
    with pytest.raises(ValueError, match="use float32"):
        precision.resolve_precision("bf16", cuda)
    assert precision.resolve_dtype("auto", cuda).dtype == torch.float32
    assert precision.resolve_precision("auto", cuda)[0] == "fp32"
    dev.check_dtype(torch.float16, cuda)  # fine on a GPU


def test_dtype_auto_is_bf16_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 1, bf16=True)
    cuda = torch.device("cuda", 0)
    choice = precision.resolve_dtype("auto", cuda)
    assert choice.dtype == torch.bfloat16 and "CUDA" in choice.reason
    assert precision.resolve_precision("auto", cuda) == ("bf16", "auto: CUDA device with bf16 support")
    assert precision.resolve_dtype("float32", cuda).dtype == torch.float32


def test_cpu_device_info() -> None:
    info = dev.device_info(torch.device("cpu"))
    assert info.describe() == "cpu" and info.memory_bytes is None
    dev.synchronize(torch.device("cpu"))  # a no-op, never an error


def _no_cuda_env() -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the early exit is tested on GPU machines too.
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x", "--num-frames", "4", "--out", "/nonexistent/x.mp4"],
    ["serve", "--port", "0"],
])
def test_cli_device_cuda_without_cuda_exits_2_before_loading(command: list[str]) -> None:
    """One line, exit 2, and nothing loaded: the transformer checkpoint named does not exist, so reaching
    any loading would print a different error; the model and engine modules are never imported."""
    probe = ("import sys, runpy; sys.argv = ['streamgen'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('streamgen.cli', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    loaded = sorted(m for m in sys.modules if m.startswith(('streamgen.model', 'streamgen.engine', "
             "'streamgen.server', 'streamgen.pipeline')))\n"
             "    print('LOADED', loaded, file=sys.stdout); raise\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", probe, *command, "--device", "cuda:0",
                          "--transformer", "/nonexistent/model.safetensors"],
                         cwd=REPO, env=_no_cuda_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "asked for CUDA but PyTorch sees no CUDA device" in lines[0] and "--device cpu" in lines[0]
    assert lines[0].startswith(f"streamgen {command[0]}: error: ")
    assert "LOADED []" in res.stdout, res.stdout
    assert elapsed < 60, elapsed  # an import of torch at most, never a model load


def test_cli_rejects_an_unknown_device_with_the_valid_forms() -> None:
    res = subprocess.run([sys.executable, "-m", "streamgen.cli", "generate", "--prompt", "x", "--num-frames", "4",
                          "--out", "/tmp/x.mp4", "--device", "gpu"], cwd=REPO, env=_no_cuda_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "unknown device 'gpu'; use one of auto, cpu, cuda, cuda:N" in res.stderr


@pytest.mark.gpu
def test_real_cuda_device_resolves_and_runs_its_auto_dtype() -> None:
    cuda = torch.device("cuda", 0)
    assert dev.resolve_device("auto") == cuda
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match="does not exist"):
        dev.resolve_device(f"cuda:{count}")
    choice = precision.resolve_dtype("auto", cuda)
    assert choice.dtype == (torch.bfloat16 if dev.cuda_has_native_bf16(torch.device("cuda")) else torch.float32)
    x = torch.randn(64, 64, device=cuda, dtype=choice.dtype)
    assert torch.isfinite(x @ x).all()
    assert "GiB" in dev.device_info(cuda).describe()


def test_device_fixture_gives_a_usable_device(device: torch.device) -> None:
    """The ``device`` fixture other tests adopt: cpu always, cuda:0 where CUDA is available."""
    x = torch.ones(3, device=device)
    assert x.device.type == device.type and float(x.sum()) == 3.0
