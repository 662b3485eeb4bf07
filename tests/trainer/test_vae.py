"""VAE stage: bit-exact kill-and-resume, NaN stop keeping the last good checkpoint, corrupt checkpoints, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamgen.model.weights import load_vae, save_checkpoint
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


def decoder_fine_tune_config(tmp_path: Path, init: Path, name: str, **changes: object) -> vae_stage.VAETrainConfig:
    """A 3-step ``train_encoder: false`` run of the ``test`` preset from ``init``, exporting to ``tmp_path``."""
    from trainer.common.config import build_config

    return build_config(vae_stage.VAETrainConfig, {
        "preset": "test", "export_path": str(tmp_path / f"{name}.safetensors"),
        "init_checkpoint": str(init), "train_encoder": False,
        "run": {"runs_dir": str(tmp_path / "runs"), "name": name, "max_steps": 3, "save_every": 3, "num_threads": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "data": {"num_frames": 4, "crop_size": 16, "global_batch": 4, "heldout_clips": 2, "heldout_frames": 4,
                 "stats_clips": 2},
        **changes,
    })


def test_decoder_fine_tune_keeps_the_latent_space(tmp_path: Path, tiny_vae_checkpoint: Path) -> None:
    """``train_encoder: false``: encoder weights and latent stats exactly the init checkpoint's; the decoder moved."""

    # An fp32 init: a bf16 export of the fine-tune would round its encoder, so the export keeps the init's dtype.
    init = tmp_path / "init_fp32.safetensors"
    save_checkpoint(load_vae(tiny_vae_checkpoint), init, kind="vae", config=load_vae(tiny_vae_checkpoint).cfg,
                    dtype=torch.float32, extra_metadata=LatentStats.from_checkpoint(tiny_vae_checkpoint).metadata())
    tiny_vae_checkpoint = init
    cfg = decoder_fine_tune_config(tmp_path, tiny_vae_checkpoint, "dec", loss={"object_weight": 4.0})
    vae_stage.train(cfg)
    before, after = load_vae(tiny_vae_checkpoint), load_vae(cfg.export_path)
    enc = {id(p) for p in before.encoder_parameters()}
    names = {n for n, p in before.named_parameters() if id(p) in enc}
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    assert names and all(torch.equal(a[n], b[n]) for n in names)
    assert any(not torch.equal(a[n], b[n]) for n in a if n not in names)
    assert LatentStats.from_checkpoint(cfg.export_path) == LatentStats.from_checkpoint(tiny_vae_checkpoint)
    assert vae_stage.checkpoint_dtype(cfg.export_path) == "fp32"


def test_decoder_fine_tune_config_errors(tmp_path: Path) -> None:
    from trainer.common.config import build_config

    with pytest.raises(ValueError, match="set init_checkpoint"):
        build_config(vae_stage.VAETrainConfig, {"preset": "test", "train_encoder": False})
    with pytest.raises(ValueError, match="export to a new path"):
        build_config(vae_stage.VAETrainConfig, {"preset": "test", "init_checkpoint": "x.safetensors",
                                                "export_path": "x.safetensors"})


def test_object_weight_weights_the_product_pixels() -> None:
    video = torch.zeros(1, 3, 4, 8, 8)
    mask = torch.zeros(1, 4, 8, 8)
    mask[..., :2, :2] = 1.0  # 1/16 of the frame is the product
    z = torch.ones(1, 4, 1, 2, 2)
    on_object, off_object = video.clone(), video.clone()
    on_object[..., :2, :2] = 0.5
    off_object[..., 4:6, 4:6] = 0.5  # the same error on as many background pixels
    cfg = vae_stage.VAELossConfig(object_weight=4.0, edge=0.0)
    _, on = vae_stage.reconstruction_loss(video, on_object, z, cfg, mask)
    _, off = vae_stage.reconstruction_loss(video, off_object, z, cfg, mask)
    # weights 5 on the product, 1 elsewhere, normalised by their mean (1.25): 4 vs 0.8 per unit error
    assert on["l1"] == pytest.approx(off["l1"] * 5.0)
    _, plain = vae_stage.reconstruction_loss(video, on_object, z, vae_stage.VAELossConfig(edge=0.0))
    assert on["l1"] == pytest.approx(plain["l1"] * 4.0)
    with pytest.raises(ValueError, match="needs the object mask"):
        vae_stage.reconstruction_loss(video, on_object, z, cfg)
    # Normalised per clip: a batch's loss is the mean of its clips' losses, however the batch is split
    # (a clip without the product and one with it, as on two processes).
    two, recon = torch.zeros(2, 3, 4, 8, 8), torch.rand(2, 3, 4, 8, 8)
    masks = torch.zeros(2, 4, 8, 8)
    masks[1, :, 2:6, 2:6] = 1.0
    whole, _ = vae_stage.reconstruction_loss(two, recon, z.expand(2, -1, -1, -1, -1), cfg, masks)
    halves = [vae_stage.reconstruction_loss(two[i:i + 1], recon[i:i + 1], z, cfg, masks[i:i + 1])[0] for i in (0, 1)]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2)


def test_temporal_loss_prices_judder_not_offsets() -> None:
    """loss.temporal compares frame-to-frame differences: a reconstruction that holds frames still and jumps
    (the judder it is there to remove) costs more than one that moves smoothly with a constant offset, which
    costs nothing; it enters the total only when its weight is set."""
    torch.manual_seed(0)
    n = 12
    ramp = torch.linspace(-0.5, 0.5, n).view(1, 1, n, 1, 1).expand(2, 3, n, 8, 8)  # a steady brightening
    stepped = ramp[:, :, (torch.arange(n) // 4) * 4]  # held for 4 frames, then a jump
    offset = ramp + 0.1
    assert vae_stage.temporal_loss(offset, ramp).item() < 1e-7
    judder = vae_stage.temporal_loss(stepped, ramp).item()
    assert judder > 0.05
    latents = torch.randn(2, 4, 3, 2, 2)
    on = vae_stage.VAELossConfig(temporal=2.0)
    total_on, parts_on = vae_stage.reconstruction_loss(ramp, stepped, latents, on)
    total_off, parts_off = vae_stage.reconstruction_loss(ramp, stepped, latents, vae_stage.VAELossConfig())
    assert "temporal" not in parts_off and parts_on["temporal"] == pytest.approx(judder)
    assert total_on.item() == pytest.approx(total_off.item() + 2.0 * judder, rel=1e-5)
    with pytest.raises(ValueError, match="loss.temporal must be >= 0"):
        vae_stage.VAELossConfig(temporal=-1.0)


def test_decoder_fine_tune_adds_post_grow_blocks_starting_from_the_init(tmp_path: Path,
                                                                      tiny_vae_checkpoint: Path) -> None:
    """``post_grow_blocks: 1`` on a 0-block init: the new block starts as the identity (the init's decode, bit
    for bit), the encoder and latent stats stay the init's, and the export loads for the preset."""
    import dataclasses

    from streamgen.config import get_preset
    from streamgen.model.vae import CausalVideoVAE

    init = load_vae(tiny_vae_checkpoint).eval()
    assert init.cfg.post_grow_blocks == 0
    grown = CausalVideoVAE(dataclasses.replace(init.cfg, post_grow_blocks=1)).eval()
    vae_stage.load_init(grown, str(tiny_vae_checkpoint))
    z = torch.randn(1, init.cfg.latent_channels, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(grown.decode(z), init.decode(z))

    cfg = decoder_fine_tune_config(tmp_path, tiny_vae_checkpoint, "grow", loss={"temporal": 1.0}, post_grow_blocks=1)
    vae_stage.train(cfg)
    after = load_vae(cfg.export_path, expected=get_preset("test").vae)  # another decoder layout, same latent space
    assert after.cfg.post_grow_blocks == 1
    enc = dict(init.named_parameters())
    names = [n for n, p in after.named_parameters() if n.startswith(("enc_in", "enc_stages", "enc_out"))]
    assert names and all(torch.equal(dict(after.named_parameters())[n], enc[n]) for n in names)
    assert any(".post_blocks.0." in n for n, _ in after.named_parameters())
    assert LatentStats.from_checkpoint(cfg.export_path) == LatentStats.from_checkpoint(tiny_vae_checkpoint)

    # Back to fewer blocks than the file has: refused, naming the setting.
    with pytest.raises(ValueError, match="has 1 post-grow decoder blocks, this run builds 0: set post_grow_blocks: 1"):
        vae_stage.load_init(CausalVideoVAE(init.cfg), cfg.export_path)
    # An encoder that grows pre-pool blocks (train_encoder) starts from the init's latents exactly.
    both = CausalVideoVAE(dataclasses.replace(init.cfg, pre_pool_blocks=1, post_grow_blocks=1)).eval()
    vae_stage.load_init(both, cfg.export_path)
    video = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(both.encode(video), after.encode(video))
        assert torch.equal(both.decode(z), after.decode(z))
    # The other architecture fields still have to match the preset.
    with pytest.raises(ValueError, match="base_channels"):
        load_vae(cfg.export_path, expected=dataclasses.replace(get_preset("test").vae, base_channels=16))


def test_fresh_decoder_loads_only_the_encoder(tiny_vae_checkpoint: Path) -> None:
    import dataclasses

    from streamgen.model.vae import CausalVideoVAE
    from trainer.common.config import build_config

    init = load_vae(tiny_vae_checkpoint)
    torch.manual_seed(0)
    fresh = CausalVideoVAE(init.cfg)
    reference = {n: p.clone() for n, p in fresh.named_parameters()}
    vae_stage.load_init(fresh, str(tiny_vae_checkpoint), decoder=False)
    enc = {id(p) for p in fresh.encoder_parameters()}
    init_params = dict(init.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, init_params[name] if id(p) in enc else reference[name]), name
    assert any(not torch.equal(reference[n], init_params[n]) for n, p in fresh.named_parameters() if id(p) in enc)
    # A frozen encoder keeps the file's layout: more pre-pool blocks than it has would stay identities forever.
    with pytest.raises(ValueError, match="keeps the encoder of .* which has 0 pre-pool blocks: set pre_pool_blocks: 0"):
        vae_stage.load_init(CausalVideoVAE(dataclasses.replace(init.cfg, pre_pool_blocks=1)),
                            str(tiny_vae_checkpoint), encoder_frozen=True)
    with pytest.raises(ValueError, match="fresh_decoder trains a new decoder for a frozen encoder"):
        build_config(vae_stage.VAETrainConfig, {"preset": "test", "init_checkpoint": str(tiny_vae_checkpoint),
                                                "fresh_decoder": True})
