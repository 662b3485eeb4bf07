"""The committed stage configs (configs/*.yaml): each parses into its stage's config, says ``precision: auto``,
and the horizon-12 ones roll out what their comments promise (ODE init / Self-Forcing: the teacher's whole
horizon of 4 chunks; Self-Forcing++: 10x it, every window past the rolling cache's first eviction)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamgen.config import get_preset
from trainer.common.config import load_config
from trainer.distill_config import SelfForcingConfig, resolve_geometry
from trainer.ode_init import OdeInitConfig
from trainer.rollout import first_evicting_chunk
from trainer.teacher import TeacherTrainConfig
from trainer.vae import VAETrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def stage_config(path: Path) -> Any:
    name = path.name
    cls = (TeacherTrainConfig if name.startswith("teacher") else VAETrainConfig if name.startswith("vae")
           else OdeInitConfig if name.startswith("ode_init") else SelfForcingConfig)
    return load_config(cls, path, [])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_config_parses_with_precision_auto(path: Path) -> None:
    assert stage_config(path).precision == "auto"


def test_horizon_12_configs_roll_out_as_documented() -> None:
    teacher = stage_config(CONFIGS / "teacher_h12.yaml")
    preset = get_preset(teacher.preset)
    horizon, chunk = teacher.data.num_latent_frames, preset.sampler.chunk_frames
    assert horizon >= 12 and teacher.clip_latent_frames * 4 / preset.video.fps >= 10  # >= 10 s clips, cropped
    assert teacher.init_checkpoint == "checkpoints/teacher_default.safetensors"
    assert teacher.export_path != teacher.init_checkpoint  # never overwrites the committed teacher
    students = {m: stage_config(CONFIGS / f"{m}_h12.yaml") for m in ("sf", "tf", "df", "sfpp")}
    ode = stage_config(CONFIGS / "ode_init_h12.yaml")
    for cfg in (ode, *students.values()):  # every student stage reads the teacher's dataset and export
        assert cfg.data.spec(preset, horizon) == teacher.dataset_spec()
    assert ode.teacher == teacher.export_path
    for mode, cfg in students.items():
        assert cfg.models.teacher == teacher.export_path
        assert cfg.models.student_init == ode.export_path
        geom = resolve_geometry(cfg, horizon, chunk)
        assert geom.window_frames == horizon and geom.window_frames // chunk >= 4
        if mode == "sfpp":
            assert geom.num_frames >= 10 * horizon
            assert geom.min_window_start >= first_evicting_chunk(preset.cache, chunk)  # type: ignore[operator]
            assert cfg.export_path != "checkpoints/student_default.safetensors"
        else:
            assert geom.num_frames == horizon


def test_the_served_vae_is_the_decoder_fine_tune_of_stage_1() -> None:
    """configs/vae_decoder_ft.yaml starts from what configs/vae_default.yaml exports, keeps its encoder and
    exports the file the default model serves; the committed files agree (same latent space)."""
    from streamgen.default_model import VAE_FILE, checkpoints_dir
    from trainer.eval.inputs import latent_space_id

    stage1, ft = stage_config(CONFIGS / "vae_default.yaml"), stage_config(CONFIGS / "vae_decoder_ft.yaml")
    assert ft.init_checkpoint == stage1.export_path and not ft.train_encoder and ft.loss.object_weight > 0
    assert Path(ft.export_path).name == VAE_FILE
    served, init = checkpoints_dir() / VAE_FILE, checkpoints_dir() / Path(stage1.export_path).name
    assert latent_space_id(served) == latent_space_id(init)
    # Stage 1c is another latent space; the teacher that starts retraining in it reads its export.
    colour, teacher = stage_config(CONFIGS / "vae_colour.yaml"), stage_config(CONFIGS / "teacher_colour_h12.yaml")
    assert colour.train_encoder and colour.init_checkpoint == stage1.export_path
    assert teacher.data.vae_checkpoint == colour.export_path
    assert latent_space_id(checkpoints_dir() / Path(colour.export_path).name) != latent_space_id(init)
