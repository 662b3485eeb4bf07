"""ODE init: exact trajectory levels, pairs built once and reused, regression trains and exports, mismatch refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamgen.config import get_preset
from streamgen.model.sampler import student_timesteps
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_transformer, read_metadata, save_checkpoint
from trainer import ode_init
from trainer.common import checkpoint as ckpt
from trainer.common.runtime import sample_generator

from .conftest import write_yaml
from .student_setup import HORIZON, assets, ode_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets(tmp_path_factory.getbasetemp() / "student_assets")


def test_trajectory_at_interpolates_the_euler_path_exactly() -> None:
    a, b, c = torch.zeros(3), torch.ones(3), torch.full((3,), 5.0)
    times = [1000.0, 600.0, 0.0]
    assert torch.equal(ode_init.trajectory_at([a, b, c], times, 600.0), b)
    torch.testing.assert_close(ode_init.trajectory_at([a, b, c], times, 700.0), torch.full((3,), 0.75))
    torch.testing.assert_close(ode_init.trajectory_at([a, b, c], times, 300.0), torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="outside"):
        ode_init.trajectory_at([a, b, c], times, 1001.0)


def test_chunk_levels_are_constant_per_chunk() -> None:
    levels = ode_init.chunk_levels(torch.Generator().manual_seed(0), 8, 3, 4)
    assert levels.shape == (8,)
    assert levels[0] == levels[1] == levels[2] and levels[3] == levels[4] == levels[5] and levels[6] == levels[7]


def test_ode_init_end_to_end_reuses_pairs_and_resumes(tmp_path: Path, root: Path) -> None:
    cfg = ode_config(tmp_path, root)
    result = ode_init.train(cfg)
    assert result.steps == 4 and result.losses[-1] < result.losses[0]

    pairs = ode_init.load_pairs(Path(cfg.pairs.dir))
    preset = get_preset("test")
    assert pairs.trajectory.shape == (4, 4, 4, HORIZON, preset.latent_height, preset.latent_width)
    assert pairs.timesteps == pytest.approx(student_timesteps(preset.sampler))
    # Level 1000 is the noise itself, drawn from the pair's own generator.
    noise = torch.randn(pairs.x0.shape[1:], generator=sample_generator(cfg.pairs.seed, 0, 3, stream=5))
    assert torch.equal(pairs.trajectory[3, 0], noise)
    assert not torch.equal(pairs.trajectory[3, 1], pairs.trajectory[3, 0])  # the teacher moved it

    exported = load_transformer(cfg.export_path, expected=preset.model)
    teacher = load_transformer(str(root / "teacher.safetensors"), expected=preset.model)
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(),
                                                      teacher.state_dict().values(), strict=True))
    meta = read_metadata(cfg.export_path)
    assert meta["stage"] == "ode_init" and meta["num_latent_frames"] == str(HORIZON)
    assert meta["teacher"] == str(root / "teacher.safetensors") and meta["train_steps"] == "4"

    shards = sorted(Path(cfg.pairs.dir).glob("shard_*.safetensors"))
    stamps = [s.stat().st_mtime_ns for s in shards]
    assert len(shards) == 2
    code = ode_init.main(["--config", str(write_yaml(cfg, tmp_path / "ode.yaml")), "--resume",
                          "--set", "run.max_steps=6"])
    assert code == 0
    assert [s.stat().st_mtime_ns for s in shards] == stamps  # pairs reused, not rebuilt
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None and latest.name == "step_00000006"
    assert set(load_file(str(latest / "model.safetensors"))) == set(exported.state_dict())


def test_mismatched_teacher_is_refused_before_any_work(tmp_path: Path, root: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    other = dataclasses.replace(get_preset("test").model, num_layers=3)
    bad = tmp_path / "bad_teacher.safetensors"
    save_checkpoint(CausalWanTransformer(other), bad, kind="transformer", config=other,
                    extra_metadata={"num_latent_frames": str(HORIZON)})
    cfg = ode_config(tmp_path, root, teacher=str(bad))
    assert ode_init.main(["--config", str(write_yaml(cfg, tmp_path / "ode.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "does not match preset 'test'" in err and "num_layers" in err
    assert not Path(cfg.pairs.dir).exists() and not cfg.run.run_dir.exists()


def test_a_teacher_with_frame_embeddings_passes_them_to_its_student(tmp_path: Path, root: Path) -> None:
    """ModelConfig.frame_embeddings is the teacher file's own layout: the ODE student starts from it whole
    and exports it (a student built from the preset alone would refuse the teacher's weights)."""
    import dataclasses

    preset = get_preset("test")
    framed_cfg = dataclasses.replace(preset.model, frame_embeddings=5)
    teacher = load_transformer(str(root / "teacher.safetensors"), expected=preset.model)
    framed = CausalWanTransformer(framed_cfg)
    framed.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        framed.condition_embedder.frame_embedding.weight.normal_(0.0, 0.1)
    path = tmp_path / "framed_teacher.safetensors"
    save_checkpoint(framed, path, kind="transformer", config=framed_cfg,
                    extra_metadata={k: v for k, v in read_metadata(root / "teacher.safetensors").items()
                                    if k not in ("config", "kind", "format")})
    cfg = ode_config(tmp_path, root, teacher=str(path))
    ode_init.train(cfg)
    exported = load_transformer(cfg.export_path, expected=preset.model)
    assert exported.cfg.frame_embeddings == 5
    assert not torch.equal(exported.condition_embedder.frame_embedding.weight,
                           torch.zeros_like(exported.condition_embedder.frame_embedding.weight))
