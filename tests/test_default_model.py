"""The committed default model: found by default, never silently replaced by random weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamgen import cli, default_model
from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE
from streamgen.model.weights import save_checkpoint


@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(default_model.ENV_DIR, str(tmp_path))
    return tmp_path


def _write_valid(directory: Path) -> None:
    preset = get_preset("test")  # resolve() checks kind and integrity; the loaders check the preset
    save_checkpoint(CausalWanTransformer(preset.model), directory / default_model.STUDENT_FILE, kind="transformer",
                    config=preset.model)
    save_checkpoint(CausalVideoVAE(preset.vae), directory / default_model.VAE_FILE, kind="vae", config=preset.vae)


def test_default_paths_are_used_when_none_are_given(checkpoints: Path) -> None:
    _write_valid(checkpoints)
    assert default_model.resolve("default", None, None, False) == (checkpoints / default_model.STUDENT_FILE,
                                                                   checkpoints / default_model.VAE_FILE)
    given = (Path("a.safetensors"), Path("b.safetensors"))
    assert default_model.resolve("default", *given, False) == given
    assert default_model.resolve("test", None, None, True) == (None, None)


def test_missing_default_weights_name_the_restore_step(checkpoints: Path) -> None:
    with pytest.raises(ValueError, match="weights are missing.*student_default.safetensors not found"):
        default_model.resolve("default", None, None, False)


def test_corrupt_default_weights_are_refused(checkpoints: Path) -> None:
    _write_valid(checkpoints)
    (checkpoints / default_model.VAE_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="unusable.*STREAMGEN_CHECKPOINTS"):
        default_model.resolve("default", None, None, False)


def test_repo_hint_names_git_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(default_model.ENV_DIR, raising=False)
    assert "git checkout -- checkpoints/student_default.safetensors" in default_model.restore_hint(tmp_path)
    assert default_model.checkpoints_dir() == Path(default_model.__file__).resolve().parent.parent / "checkpoints"


@pytest.mark.parametrize(("preset", "transformer", "vae", "random_init", "message"), [
    ("test", None, None, False, "no committed weights"),
    ("default", Path("t.safetensors"), None, False, "give both"),
    ("default", Path("t.safetensors"), Path("v.safetensors"), True, "takes no"),
])
def test_inconsistent_flags_are_refused(preset: str, transformer: Path | None, vae: Path | None, random_init: bool,
                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        default_model.resolve(preset, transformer, vae, random_init)


@pytest.mark.parametrize("command", [["generate", "--prompt", "a red mug", "--num-frames", "4", "--out", "x.mp4"],
                                     ["serve", "--port", "0"]])
def test_cli_without_weights_exits_2_with_the_restore_step(checkpoints: Path, command: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "weights are missing" in err and "random" not in err.split("missing")[0]
