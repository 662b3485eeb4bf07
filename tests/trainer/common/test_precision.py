"""``precision: auto`` of the trainer stages: resolved once, printed, and the resolved value kept in the config."""

from __future__ import annotations

import pytest

from streamgen.precision import resolve_precision
from trainer.common.precision import resolve_config_precision
from trainer.distill_config import SelfForcingConfig
from trainer.ode_init import OdeInitConfig
from trainer.teacher import TeacherTrainConfig
from trainer.vae import VAETrainConfig

STAGES = (VAETrainConfig, TeacherTrainConfig, OdeInitConfig, SelfForcingConfig)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_every_stage_defaults_to_auto_and_resolves_it(cls: type, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = cls()
    assert cfg.precision == "auto"
    expected, reason = resolve_precision("auto")
    resolved = resolve_config_precision(cfg, "stage")
    assert resolved.precision == expected in ("bf16", "fp32")
    assert capsys.readouterr().out == f"stage: precision {expected} ({reason})\n"
    assert resolved.run == cfg.run  # nothing else changes


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_a_forced_precision_is_kept(forced: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = resolve_config_precision(TeacherTrainConfig(precision=forced), "teacher", log=False)
    assert cfg.precision == forced and capsys.readouterr().out == ""


def test_an_unknown_precision_is_refused() -> None:
    for cls in STAGES:
        with pytest.raises(ValueError, match="precision must be one of"):
            cls(precision="fp16")
