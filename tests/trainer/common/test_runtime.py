"""The seeded epoch order, and the command line every training stage shares: flags read from the config dataclass,
and exit codes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from trainer import vae
from trainer.common.checkpoint import CheckpointError
from trainer.common.config import RunConfig
from trainer.common.runtime import (
    EpochOrder,
    NonFiniteLossError,
    launch_mismatch,
    run_stage,
    sample_generator,
    stage_parser,
)

from ..conftest import REPO, tiny_vae_config, write_yaml


def test_epoch_order_visits_every_item_once_per_epoch_in_a_seeded_order() -> None:
    order = EpochOrder(5, seed=3, stream=7)
    epochs = [[order(sample) for sample in range(5 * e, 5 * e + 5)] for e in range(3)]
    assert all(sorted(items) == [0, 1, 2, 3, 4] for items in epochs)
    assert epochs[1] == torch.randperm(5, generator=sample_generator(3, 1, 0, stream=7)).tolist()
    assert len({tuple(items) for items in epochs}) == 3  # a new order each epoch
    assert EpochOrder(5, seed=3, stream=7)(12) == epochs[2][2]  # a resumed run starts mid-epoch on the same item
    assert [EpochOrder(5, seed=3, stream=8)(s) for s in range(5)] != epochs[0]  # streams are independent


@dataclass(frozen=True)
class _StageConfig:
    preset: str = "test"
    steps: int = 3
    run: RunConfig = field(default_factory=lambda: RunConfig(name="stage"))


def test_stage_parser_names_the_config_sections_and_shares_the_flags() -> None:
    p = stage_parser(_StageConfig, prog="python -m trainer.x", description="a stage", no_export_help="skip it")
    config_help = next(a.help for a in p._actions if a.dest == "config")
    assert config_help == "YAML file overriding _StageConfig fields (sections: run; top level: preset, steps). " \
                          "Unknown keys are errors."
    assert "steps: int = 3" in p.epilog and "run.name: str = 'stage'" in p.epilog  # every field, with its default
    args = p.parse_args(["--config", "c.yaml", "--set", "steps=4", "--set", "run.name=b", "--resume", "--no-export"])
    assert (args.config, args.overrides, args.resume, args.no_export) == (Path("c.yaml"), ["steps=4", "run.name=b"],
                                                                          True, True)


@pytest.mark.parametrize("error,code", [(None, 0), (NonFiniteLossError("nan"), 1), (CheckpointError("torn"), 1),
                                        (ValueError("run exists"), 2)])
def test_run_stage_exit_codes(error: Exception | None, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    args = stage_parser(_StageConfig, prog="x", description="", no_export_help="").parse_args(["--set", "steps=7"])
    seen: list[_StageConfig] = []

    def body(cfg: _StageConfig) -> None:
        seen.append(cfg)
        if error is not None:
            raise error

    assert run_stage(_StageConfig, args, body) == code
    assert [c.steps for c in seen] == [7]
    assert capsys.readouterr().err == ("" if error is None else f"error: {error}\n")


def test_run_stage_rejects_a_bad_config_before_the_body_runs(capsys: pytest.CaptureFixture[str]) -> None:
    args = stage_parser(_StageConfig, prog="x", description="", no_export_help="").parse_args(["--set", "stepz=1"])
    assert run_stage(_StageConfig, args, lambda cfg: pytest.fail("the body ran")) == 2
    assert "stepz" in capsys.readouterr().err


# What `accelerate launch --cpu --num_processes 2` sets in the one process it starts (no WORLD_SIZE).
_ACCELERATE_SINGLE = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no",
                      "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env,argv,actual,expected", [
    (_ACCELERATE_SINGLE, ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "x"], 1,
     "accelerate launch was asked for 2 processes but started only this one"),
    (_ACCELERATE_SINGLE, ["accelerate", "launch", "--cpu", "--num-processes=3", "x.py"], 1, "asked for 3 processes"),
    (_ACCELERATE_SINGLE, ["accelerate", "launch", "--config_file", "two.yaml", "x.py"], 1, "more than one process"),
    (_ACCELERATE_SINGLE, ["accelerate", "launch", "--cpu", "--num_processes", "1", "x.py"], 1, None),
    ({"WORLD_SIZE": "2"}, [], 1, "the launch asked for 2 processes (WORLD_SIZE=2) but this run has 1"),
    ({"ACCELERATE_NUM_PROCESSES": "4", "MASTER_PORT": "1"}, [], 2, "asked for 4 processes"),
    ({"WORLD_SIZE": "2", **_ACCELERATE_SINGLE}, [], 2, None),  # accelerate launch --multi_gpu: got what it asked
    ({}, [], 1, None),  # plain python
    ({"MASTER_PORT": "29500"}, [], 1, None),  # a MASTER_PORT of the environment alone is no launch
])
def test_launch_mismatch_names_what_was_asked(env: dict[str, str], argv: list[str], actual: int,
                                              expected: str | None) -> None:
    message = launch_mismatch(actual, env=env, launcher_argv=argv)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message and "--multi_gpu" in message, message


def test_run_stage_refuses_a_launch_with_fewer_processes(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_NUM_PROCESSES", "2")
    args = stage_parser(_StageConfig, prog="x", description="", no_export_help="").parse_args([])
    assert run_stage(_StageConfig, args, lambda cfg: pytest.fail("the body ran")) == 2
    assert "asked for 2 processes" in capsys.readouterr().err


def test_accelerate_launch_cpu_with_two_processes_is_refused(tmp_path: Path) -> None:
    """``accelerate launch --cpu --num_processes 2`` starts ONE process (no --multi_gpu): the stage says so and
    fails before any work, instead of training silently on one process."""
    cfg = tiny_vae_config(tmp_path, max_steps=1, save_every=1)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer.vae",
           "--config", str(write_yaml(cfg, tmp_path / "vae.yaml")), "--no-export"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]  # the stage exits 2; the launcher turns that into 1
    assert "accelerate launch was asked for 2 processes but started only this one" in proc.stderr
    assert not cfg.run.run_dir.exists()  # nothing trained


def test_resume_with_nothing_to_resume_is_an_error_naming_the_run_dir(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_vae_config(tmp_path, max_steps=1, save_every=1)
    typo = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="vea"))
    with pytest.raises(ValueError, match=f"--resume found no checkpoint in run directory {typo.run.run_dir}"):
        vae.train(typo, resume=True, export=False)  # the library path refuses too
    assert not typo.run.run_dir.exists()
    path = write_yaml(cfg, tmp_path / "vae.yaml")
    assert vae.main(["--config", str(path), "--resume", "--set", "run.name=vea"]) == 2
    err = capsys.readouterr().err
    assert f"run directory {typo.run.run_dir}" in err and "run.name='vea'" in err and "drop --resume" in err, err
    assert not typo.run.run_dir.exists()


def test_resume_with_a_config_that_changes_training_is_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_vae_config(tmp_path, max_steps=2, save_every=2)
    path = write_yaml(cfg, tmp_path / "vae.yaml")
    assert vae.main(["--config", str(path), "--no-export"]) == 0
    latest = (cfg.run.run_dir / "checkpoints" / "latest").read_text().strip()
    # A different learning rate or batch would continue another run than the one checkpointed.
    assert vae.main(["--config", str(path), "--resume", "--no-export", "--set", "optim.lr=0.01",
                     "--set", "data.global_batch=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume with a config that differs from the checkpoint's") and latest in err
    assert "optim.lr: 0.001 in the checkpoint, 0.01 now" in err
    assert "data.global_batch: 4 in the checkpoint, 2 now" in err
    assert (cfg.run.run_dir / "checkpoints" / "latest").read_text().strip() == latest  # nothing trained
    # Budgets, threads and logging may change: a longer run resumes.
    assert vae.main(["--config", str(path), "--resume", "--no-export", "--set", "run.max_steps=3",
                     "--set", "run.max_minutes=5", "--set", "run.log_every=2"]) == 0
    assert (cfg.run.run_dir / "checkpoints" / "latest").read_text().strip() != latest
