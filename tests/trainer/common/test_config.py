"""YAML -> frozen config parsing: unknown keys and bad values fail before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import teacher, vae
from trainer.common.config import OptimConfig, RunConfig, build_config, load_config, parse_override
from trainer.teacher import TeacherTrainConfig
from trainer.vae import VAETrainConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,cls", [("vae_default.yaml", VAETrainConfig),
                                      ("teacher_default.yaml", TeacherTrainConfig)])
def test_committed_configs_parse(name: str, cls: type) -> None:
    cfg = load_config(cls, CONFIGS / name)
    assert cfg.preset == "default"


@pytest.mark.parametrize("text,match", [
    ("optim:\n  lrr: 0.1\n", "unknown field 'lrr'"),
    ("colour: red\n", "unknown field 'colour'"),
    ("run:\n  max_step: 3\n", "unknown field 'max_step'"),
    ("optim:\n  lr: -1.0\n", "optim.lr must be > 0"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("optim:\n  schedule: linear\n", "optim.schedule must be one of"),
    ("run:\n  max_steps: 2.5\n", "run.max_steps"),
    ("preset: huge\n", "unknown preset 'huge'"),
    ("data:\n  crop_size: 60\n", "multiple of the VAE spatial factor"),
    ("optim: 3\n", "optim must be a mapping"),
    ("- a\n- b\n", "mapping at the top level"),
])
def test_bad_vae_config_raises(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(VAETrainConfig, write(tmp_path, text))


def test_bad_teacher_value_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt_dropout"):
        load_config(TeacherTrainConfig, write(tmp_path, "data:\n  prompt_dropout: 1.5\n"))
    with pytest.raises(ValueError, match="timestep_sampling"):
        load_config(TeacherTrainConfig, None, ["flow.timestep_sampling=cubic"])


def test_overrides_and_int_to_float(tmp_path: Path) -> None:
    cfg = load_config(VAETrainConfig, write(tmp_path, "optim:\n  lr: 1\n"), ["run.max_steps=7", "data.crop_size=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 7 and cfg.data.crop_size is None
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert build_config(OptimConfig, {"betas": [0.0, 0.99]}).betas == (0.0, 0.99)
    with pytest.raises(ValueError, match="betas"):
        build_config(OptimConfig, {"betas": [0.9]})
    with pytest.raises(ValueError, match="run.name"):
        RunConfig(name="a/b")


@pytest.mark.parametrize("module", [vae, teacher])
def test_cli_rejects_bad_config_before_training(module: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*_: object, **__: object) -> None:
        raise AssertionError("training started despite a bad config")

    monkeypatch.setattr(module, "train", boom)
    assert module.main(["--config", str(write(tmp_path, "optim:\n  lrr: 0.1\n"))]) == 2  # type: ignore[attr-defined]
    assert "unknown field 'lrr'" in capsys.readouterr().err
    assert module.main(["--config", str(tmp_path / "missing.yaml")]) == 2  # type: ignore[attr-defined]
