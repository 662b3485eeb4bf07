"""make_runtime on a device: no forced cpu=True, accelerate's bf16 mixed precision on CUDA, run.device validated,
and a CUDA request on a machine without CUDA stopping a stage with exit 2 before any work.

CUDA is faked where the runtime only *asks* about it (resolve_device, resolve_precision, the Accelerator's
arguments); the CPU path runs for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType

from trainer.common import runtime
from trainer.common.config import RunConfig, build_config
from trainer.common.runtime import make_runtime, run_stage, stage_parser

from ..conftest import REPO


def test_cpu_runtime_is_on_the_cpu_with_the_resolved_precision() -> None:
    rt = make_runtime(RunConfig(device="cpu", num_threads=1), "fp32")
    assert rt.device == torch.device("cpu") and rt.precision == "fp32" and rt.world_size == 1
    assert rt.accelerator.device.type == "cpu"
    assert rt.any_true(True) and not rt.any_true(False)
    assert rt.any_each(True, False, True) == (True, False, True)


class _FakeAccelerator:
    def __init__(self, **kwargs: Any) -> None:
        _FakeAccelerator.kwargs = kwargs
        self.num_processes, self.process_index = 1, 0
        self.distributed_type = "NO"
        self.device = torch.device("cuda")


@pytest.mark.parametrize(("precision", "mixed"), [("bf16", "bf16"), ("fp32", "no")])
def test_cuda_runtime_uses_the_gpu_and_accelerates_mixed_precision(monkeypatch: pytest.MonkeyPatch, precision: str,
                                                                  mixed: str) -> None:
    """On CUDA the Accelerator is never built with cpu=True, and a bf16 precision is accelerate's bf16."""
    monkeypatch.setattr(runtime, "resolve_device", lambda text: torch.device("cuda", 1))
    monkeypatch.setattr(runtime, "resolve_precision", lambda name, device: (precision, "test"))
    monkeypatch.setattr(runtime, "Accelerator", _FakeAccelerator)
    monkeypatch.setattr(runtime, "device_info", lambda d: type("I", (), {"describe": lambda self: str(d)})())
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = make_runtime(RunConfig(device="cuda:1", num_threads=1), "auto")
    assert _FakeAccelerator.kwargs == {"cpu": False, "mixed_precision": mixed}
    assert rt.device == torch.device("cuda", 1) and rt.precision == precision
    assert chosen == [torch.device("cuda", 1)]  # accelerate's single-process "cuda" is the current device


def test_an_fsdp_launch_shards_and_needs_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate reporting an FSDP launch (configs/accelerate/fsdp_wan1.3b.yaml on GPUs) turns on the trainer's
    own FSDP2 sharding, as run.parallel fsdp does; on one process there is nothing to shard over."""
    class _Fsdp(_FakeAccelerator):
        processes = 1

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.distributed_type = DistributedType.FSDP
            self.num_processes = _Fsdp.processes

    monkeypatch.setattr(runtime, "Accelerator", _Fsdp)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="FSDP shards the model over processes, but this launch has 1"):
        make_runtime(RunConfig(device="cpu", num_threads=1), "fp32")
    _Fsdp.processes = 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    rt = make_runtime(RunConfig(device="cpu", num_threads=1, parallel="ddp"), "fp32")
    assert rt.fsdp and rt.world_size == 2


def test_one_fixed_gpu_for_several_processes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "resolve_device", lambda text: torch.device("cuda", 1))
    monkeypatch.setattr(runtime, "resolve_precision", lambda name, device: ("bf16", "test"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="run.device cuda:1 names one GPU but this launch has 2 processes"):
        make_runtime(RunConfig(device="cuda:1", num_threads=1), "auto")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3"])
def test_run_device_accepts_the_device_forms(device: str) -> None:
    assert build_config(RunConfig, {"device": device}).device == device


def test_run_device_rejects_unknown_text_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"run.device: unknown device 'gpu0'; use one of auto, cpu, cuda, cuda:N"):
        build_config(RunConfig, {"device": "gpu0"})
    assert build_config(RunConfig, {}).device == "auto" and not build_config(RunConfig, {}).gradient_checkpointing


@dataclass(frozen=True)
class _StageConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="stage"))


def test_stage_device_flag_overrides_run_device_and_cuda_without_cuda_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parser = stage_parser(_StageConfig, prog="x", description="", no_export_help="")
    seen: list[_StageConfig] = []
    assert run_stage(_StageConfig, parser.parse_args(["--device", "cpu"]), seen.append) == 0
    assert seen[0].run.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_stage(_StageConfig, parser.parse_args(["--device", "cuda"]), lambda cfg: pytest.fail("ran")) == 2
    err = capsys.readouterr().err
    assert "asked for CUDA but PyTorch sees no CUDA device" in err and "--device cpu" in err


def test_teacher_with_cuda_on_a_machine_without_it_exits_2_in_one_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "trainer.teacher", "--set", "run.device=cuda", "--check"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "asked for CUDA but PyTorch sees no CUDA device" in lines[0], res.stderr

