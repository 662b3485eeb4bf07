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


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("+1e-4", 1e-4), (".5", 0.5), ("2", 2.0),
                                        ("3.0e-4", 3e-4)])
def test_number_text_parses_as_a_float_in_yaml_and_set(tmp_path: Path, text: str, value: float) -> None:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; a float field takes it as the number it is."""
    from_set = load_config(VAETrainConfig, None, [f"optim.lr={text}"]).optim.lr
    from_yaml = load_config(VAETrainConfig, write(tmp_path, f"optim:\n  lr: {text}\n")).optim.lr
    assert from_set == from_yaml == value and isinstance(from_set, float)
    assert load_config(VAETrainConfig, None, ["optim.betas=[.5, 9.99e-1]"]).optim.betas == (0.5, 0.999)
    assert load_config(VAETrainConfig, None, ["optim.grad_clip=1e1"]).optim.grad_clip == 10.0  # float | None
    assert load_config(VAETrainConfig, None, ["run.name=1e3"]).run.name == "1e3"  # a str field keeps its text
    with pytest.raises(ValueError, match=r"run.max_steps = '1e3' \(str\) is not an int"):
        load_config(VAETrainConfig, None, ["run.max_steps=1e3"])


@pytest.mark.parametrize("text", ["-1e-4", "-.5", "-2E-3"])
def test_negative_number_text_reaches_the_range_check(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match=f"^--set optim.lr={text}: optim.lr must be > 0, got -"):
        load_config(VAETrainConfig, None, [f"optim.lr={text}"])
    path = write(tmp_path, f"optim:\n  lr: {text}\n")
    with pytest.raises(ValueError, match=f"^{path}: optim.lr must be > 0, got -"):
        load_config(VAETrainConfig, path)


def test_an_error_names_the_yaml_file_or_the_set_that_caused_it(tmp_path: Path) -> None:
    good = write(tmp_path, "optim:\n  lr: 1.0e-3\n")
    cases = [(good, ["run.max_steps=10", "optim.lr=-1e-4"], "--set optim.lr=-1e-4"),
             (good, ["optim.lrr=1"], "--set optim.lrr=1"),
             (good, ["optim.schedule=linear", "run.max_steps=10"], "--set optim.schedule=linear"),
             (good, ["optim.lr=[1,"], "--set optim.lr=[1,"),
             (good, ["optim.lr"], "--set optim.lr")]
    for path, sets, origin in cases:
        with pytest.raises(ValueError) as info:
            load_config(VAETrainConfig, path, sets)
        assert str(info.value).startswith(f"{origin}: "), (sets, str(info.value))
        assert str(good) not in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1e-4\n")
    with pytest.raises(ValueError, match=f"^{bad}: optim.lr must be > 0"):
        load_config(VAETrainConfig, bad, ["run.max_steps=10"])  # the --set is innocent
    assert load_config(VAETrainConfig, bad, ["optim.lr=2e-4"]).optim.lr == 2e-4  # a --set may repair the file
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1,\n")
    with pytest.raises(ValueError, match=f"config file {broken} is not valid YAML"):
        load_config(VAETrainConfig, broken)


def test_cli_error_names_the_set_not_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(vae, "train", lambda *_, **__: pytest.fail("training started despite a bad --set"))
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n")
    assert vae.main(["--config", str(path), "--set", "optim.lr=-1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set optim.lr=-1e-4: optim.lr must be > 0, got -0.0001"), err
