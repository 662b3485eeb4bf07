"""Preflight: ``--check`` of every stage lists each input, every missing one with the command that makes it,
and what the run would build first; a real run refuses missing inputs before any work and announces builds."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from streamgen.config import get_preset
from streamgen.model.text import HashTokenEncoder
from trainer import latent_data, ode_init, self_forcing, teacher, vae
from trainer.common.config import load_config
from trainer.common.preflight import Input, preflight
from trainer.teacher import TeacherTrainConfig

from ..conftest import tiny_teacher_config, tiny_vae_config, write_yaml
from ..student_setup import HORIZON, NUM_CLIPS, assets, ode_config, sf_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets(tmp_path_factory.getbasetemp() / "student_assets")


def test_vae_check_passes_without_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tiny_vae_config(tmp_path), tmp_path / "vae.yaml")
    assert vae.main(["--config", str(path), "--check"]) == 0
    assert "check passed: the run can start" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_teacher_check_lists_every_missing_input_with_its_command(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_teacher_config(tmp_path, tmp_path / "no_vae.safetensors", tmp_path / "latents")
    cfg = dataclasses.replace(cfg, init_checkpoint=str(tmp_path / "no_init.safetensors"))
    path = write_yaml(cfg, tmp_path / "teacher.yaml")
    assert teacher.main(["--config", str(path), "--check"]) == 2
    out, err = capsys.readouterr()
    assert f"MISSING  data.vae_checkpoint: {tmp_path / 'no_vae.safetensors'}" in out
    assert f"MISSING  init_checkpoint: {tmp_path / 'no_init.safetensors'}" in out
    assert f"build    data.latents_dir: {tmp_path / 'latents'}" in out
    assert f"python -m trainer.teacher --config {path} --encode-only" in out  # how to build the latents ahead
    assert "2 input(s) missing" in err  # all of them, not the first only
    assert f"python -m trainer.vae --config configs/vae_default.yaml --set export_path={tmp_path}/no_vae" in err
    assert f"python -m trainer.teacher --config configs/teacher_default.yaml --set export_path={tmp_path}/no_init" \
        in err
    # A real run is refused the same way before anything is built.
    assert teacher.main(["--config", str(path), "--no-export"]) == 2
    assert "2 input(s) missing" in capsys.readouterr().err
    assert not (tmp_path / "latents").exists() and not (tmp_path / "runs").exists()


def test_committed_teacher_config_names_the_config_that_makes_its_init(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/teacher_default.yaml starts from runs/teacher_h3.safetensors, which configs/teacher_h3.yaml makes."""
    args = teacher.build_parser().parse_args(["--config", "configs/teacher_default.yaml", "--check"])
    cfg = load_config(TeacherTrainConfig, Path(teacher.__file__).parents[1] / "configs" / "teacher_default.yaml")
    found = {i.key: i for i in teacher.inputs(cfg, args)}
    if not found["init_checkpoint"].present:
        assert found["init_checkpoint"].make == "python -m trainer.teacher --config configs/teacher_h3.yaml"
    assert found["data.vae_checkpoint"].make == "python -m trainer.vae --config configs/vae_decoder_ft.yaml"


def test_student_check_announces_the_latent_dataset_the_run_would_build(tmp_path: Path, root: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The fresh-clone case: the checkpoints exist, the latent dataset does not. ``--check`` passes but says the
    run renders it first (size, cost) and how to build it ahead; it builds nothing itself."""
    missing = str(tmp_path / "latents_h6")
    cfg = sf_config(tmp_path, root, "sf", data={"latents_dir": missing},
                    eval={"every": 2, "classifier": str(tmp_path / "no_classifier.safetensors")})
    assert self_forcing.main(["--config", str(write_yaml(cfg, tmp_path / "sf.yaml")), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"build    data.latents_dir: {missing}" in out
    assert f"the run builds it first: {NUM_CLIPS} clips x 24 frames at 32x32" in out
    assert "python -m trainer.teacher --set preset=test" in out and "--encode-only" in out
    assert "skip     eval.classifier" in out and "python -m trainer.eval.classifier --train --out" in out
    assert "check passed: the run can start; it first builds data.latents_dir" in out
    assert '"window_frames": 6' in out
    ode = ode_config(tmp_path, root, data={"latents_dir": missing})
    assert ode_init.main(["--config", str(write_yaml(ode, tmp_path / "ode.yaml")), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"build    data.latents_dir: {missing}" in out and f"build    pairs.dir: {ode.pairs.dir}" in out
    assert "--pairs-only" in out
    assert not Path(missing).exists() and not (tmp_path / "runs").exists() and not Path(ode.pairs.dir).exists()


def test_student_check_lists_every_missing_checkpoint(tmp_path: Path, root: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = sf_config(tmp_path, root, "sf", models={"teacher": str(tmp_path / "t.safetensors"),
                                                  "student_init": str(tmp_path / "s.safetensors"),
                                                  "critic_init": str(tmp_path / "c.safetensors")},
                    losses={"regression": 1.0, "regression_pairs": str(tmp_path / "pairs")})
    assert self_forcing.main(["--config", str(write_yaml(cfg, tmp_path / "sf.yaml")), "--check"]) == 2
    err = capsys.readouterr().err
    assert "4 input(s) missing" in err, err
    for key, module in (("models.teacher", "trainer.teacher"), ("models.student_init", "trainer.ode_init"),
                        ("models.critic_init", "trainer.teacher"), ("losses.regression_pairs", "trainer.ode_init")):
        assert f"  {key}: " in err and f"python -m {module} " in err, key
    assert "ODE pairs" in err


def test_student_encode_command_builds_exactly_the_dataset_the_stage_reads(tmp_path: Path, root: Path) -> None:
    """The printed ``trainer.teacher --encode-only`` command must make the spec the student stage then loads."""
    cfg = sf_config(tmp_path, root, "sf", data={"latents_dir": str(tmp_path / "elsewhere")})
    (item,) = [i for i in ode_init.student_data_inputs(cfg.data, get_preset("test"), HORIZON)
               if i.key == "data.latents_dir"]
    argv = shlex.split(item.make)
    assert argv[:3] == ["python", "-m", "trainer.teacher"] and "--encode-only" in argv
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    built = load_config(TeacherTrainConfig, None, sets)
    assert built.data.latents_dir == cfg.data.latents_dir
    assert built.dataset_spec() == cfg.data.spec(get_preset("test"), HORIZON)


def test_a_run_announces_what_it_builds_and_shows_a_progress_bar(tmp_path: Path, tiny_vae_checkpoint: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    built = Input("data.latents_dir", tmp_path / "latents", False, "python -m trainer.teacher --encode-only",
                  built_by_run="12 clips x 8 frames at 32x32")
    skipped = Input("eval.classifier", tmp_path / "c.safetensors", False, "make", optional="no adherence")
    preflight([built, skipped], check=False)
    out = capsys.readouterr().out
    assert f"data.latents_dir {tmp_path / 'latents'} does not exist yet: building it first: 12 clips" in out
    assert "warning: eval.classifier" in out
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tmp_path / "latents")
    latent_data.build(tmp_path / "latents", cfg.dataset_spec(), batch=4, token_encoder=HashTokenEncoder())
    out, err = capsys.readouterr()
    assert "building latent dataset" in out and "12 clips" in out
    assert "latent dataset: 100%" in err and "12/12" in err  # the tqdm bar
