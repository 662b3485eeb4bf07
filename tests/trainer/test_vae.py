"""VAE stage: bit-exact kill-and-resume, NaN stop keeping the last good checkpoint, corrupt checkpoints, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamgen.model.weights import load_vae
from trainer import vae as vae_stage
from trainer.common import checkpoint as ckpt
from trainer.common.latents import LatentStats
from trainer.common.runtime import NonFiniteLossError

from .conftest import tiny_vae_config, write_yaml


def test_kill_and_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = vae_stage.train(tiny_vae_config(tmp_path / "full"), export=False)
    assert len(full.losses) == 6

    cfg = tiny_vae_config(tmp_path / "killed")
    real, calls = vae_stage.reconstruction_loss, [0]

    def killed_at_step_4(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 5:  # step index 4: after the step-3 checkpoint, before the next one
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vae_stage, "reconstruction_loss", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        vae_stage.train(cfg, export=False)
    monkeypatch.setattr(vae_stage, "reconstruction_loss", real)
    resumed = vae_stage.train(cfg, resume=True, export=False)

    assert resumed.losses == full.losses[3:]  # exactly equal, not approximately
    a = load_file(str(ckpt.latest_checkpoint(cfg.run.run_dir) / "model.safetensors"))  # type: ignore[operator]
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "full" / "runs" / "vae") / "model.safetensors"))  # type: ignore[operator]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_without_resume_is_refused(tmp_path: Path) -> None:
    cfg = tiny_vae_config(tmp_path, max_steps=3)
    vae_stage.train(cfg, export=False)
    with pytest.raises(ValueError, match="pass --resume"):
        vae_stage.train(cfg, export=False)


@pytest.mark.parametrize("run, message", [({"gradient_checkpointing": True}, "no checkpointed blocks"),
                                          ({"parallel": "fsdp"}, "FSDP .* is for the DiT stages")])
def test_dit_only_run_options_are_refused_before_any_work(tmp_path: Path, run: dict[str, object],
                                                          message: str) -> None:
    cfg = tiny_vae_config(tmp_path, **run)
    with pytest.raises(ValueError, match=message):
        vae_stage.train(cfg, export=False)
    assert not cfg.run.run_dir.exists()


def test_unknown_parallel_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run.parallel must be ddp or fsdp, got 'zero3'"):
        tiny_vae_config(tmp_path, parallel="zero3")


def test_nan_stops_with_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_vae_config(tmp_path)
    real, calls = vae_stage.reconstruction_loss, [0]

    def nan_at_step_4(*args: object, **kwargs: object) -> tuple[torch.Tensor, dict[str, float]]:
        calls[0] += 1
        loss, parts = real(*args, **kwargs)  # type: ignore[arg-type]
        return (loss * float("nan"), parts) if calls[0] == 5 else (loss, parts)

    monkeypatch.setattr(vae_stage, "reconstruction_loss", nan_at_step_4)
    with pytest.raises(NonFiniteLossError, match="at step 4.*last good checkpoint is .*step_00000003"):
        vae_stage.train(cfg, export=False)
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None and latest.name == "step_00000003"
    assert ckpt.load(latest).step == 3
    assert not Path(cfg.export_path).exists()

    # Through the CLI: exit code 1 and a message that names the checkpoint.
    calls[0] = 0
    cli_cfg = tiny_vae_config(tmp_path / "cli")
    assert vae_stage.main(["--config", str(write_yaml(cli_cfg, tmp_path / "c.yaml"))]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 4" in err and "step_00000003" in err


def test_corrupt_checkpoint_resume_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_vae_config(tmp_path, max_steps=3)
    vae_stage.train(cfg, export=False)
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None
    (latest / "model.safetensors").write_bytes(b"not a safetensors file")
    path = write_yaml(tiny_vae_config(tmp_path, max_steps=6), tmp_path / "c.yaml")
    assert vae_stage.main(["--config", str(path), "--resume", "--no-export"]) == 1
    assert f"checkpoint {latest} has corrupt weights" in capsys.readouterr().err


def test_export_records_latent_stats(tiny_vae_checkpoint: Path) -> None:
    stats = LatentStats.from_checkpoint(tiny_vae_checkpoint)
    vae = load_vae(tiny_vae_checkpoint)
    assert len(stats.mean) == vae.cfg.latent_channels
    z = torch.randn(2, vae.cfg.latent_channels, 1, 2, 2)
    torch.testing.assert_close(stats.normalize(stats.denormalize(z)), z)
    report = (Path(tiny_vae_checkpoint).parent / "runs" / "vae" / "report.json")
    assert report.is_file() and (report.parent / "reconstructions.png").is_file()


def test_losses_are_finite_and_per_sample() -> None:
    video = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    z = torch.randn(2, 4, 1, 2, 2)
    loss, parts = vae_stage.reconstruction_loss(video, video, z, vae_stage.VAELossConfig())
    assert parts["l1"] == 0 and parts["edge"] == 0
    # The latent regulariser of a batch is the mean of its samples' (batch splits do not change it).
    whole = vae_stage.latent_scale_loss(z)
    halves = (vae_stage.latent_scale_loss(z[:1]) + vae_stage.latent_scale_loss(z[1:])) / 2
    torch.testing.assert_close(whole, halves)
    assert vae_stage.latent_scale_loss(torch.ones(1, 4, 1, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)
