"""The seeded epoch order, and the command line every training stage shares: flags read from the config dataclass,
and exit codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from trainer.common.checkpoint import CheckpointError
from trainer.common.config import RunConfig
from trainer.common.runtime import EpochOrder, NonFiniteLossError, run_stage, sample_generator, stage_parser


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
