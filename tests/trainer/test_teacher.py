"""Teacher stage: bit-exact resume, the many-step CFG sampler, and a 2-process accelerate run equal to 1 process."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamgen.config import get_preset
from streamgen.model import transformer as transformer_module
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_transformer, read_metadata
from streamgen.precision import resolve_precision
from trainer import latent_data
from trainer import teacher as teacher_stage
from trainer.common import checkpoint as ckpt
from trainer.sampling import sample_teacher, teacher_timesteps

from .conftest import (
    LONG_CLIP_LATENT_FRAMES,
    REPO,
    final_weights,
    launch_two_processes,
    tiny_teacher_config,
    write_yaml,
)


def test_latent_dataset_is_normalised_and_complete(tiny_latents: Path, tiny_vae_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents)
    data = latent_data.load(tiny_latents, cfg.dataset_spec())
    preset = get_preset("test")
    assert data.latents.shape == (12, preset.vae.latent_channels, 2, preset.latent_height, preset.latent_width)
    assert len(data.captions) == 12 and data.caption_ids.max() < data.text_emb.shape[0]
    other = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents)
    with pytest.raises(ValueError, match="no complete latent dataset"):
        latent_data.load(tiny_latents, other.dataset_spec().__class__(**{**other.dataset_spec().key(),
                                                                           "num_clips": 13}))


def assert_kill_and_resume_is_bit_exact(cfg: teacher_stage.TeacherTrainConfig, full: teacher_stage.TeacherResult,
                                        full_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill ``cfg``'s run at step 4 (an interrupt inside the 5th loss), resume it, and compare with ``full``."""
    real, calls = teacher_stage.F.mse_loss, [0]

    def killed_at_step_4(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(teacher_stage.F, "mse_loss", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        teacher_stage.train(cfg, export=False)
    monkeypatch.setattr(teacher_stage.F, "mse_loss", real)
    resumed = teacher_stage.train(cfg, resume=True, export=False)
    assert resumed.losses == full.losses[3:]
    a, b = final_weights(cfg.run.run_dir), final_weights(full_root / "runs" / "teacher")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_exact(tmp_path: Path, tiny_vae_checkpoint: Path, tiny_latents: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    full = teacher_stage.train(tiny_teacher_config(tmp_path / "full", tiny_vae_checkpoint, tiny_latents),
                               export=False)
    cfg = tiny_teacher_config(tmp_path / "killed", tiny_vae_checkpoint, tiny_latents)
    assert_kill_and_resume_is_bit_exact(cfg, full, tmp_path / "full", monkeypatch)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_bit_exactly(
        tmp_path: Path, tiny_vae_checkpoint: Path, tiny_latents: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM arrives inside step 2's loss (save_every 3, so no checkpoint is due): the step finishes, a
    checkpoint of step 2 is written, the CLI exits 143 with a message, nothing is exported, the previous
    handlers are back; ``--resume`` then reaches the uninterrupted run's weights bit for bit."""
    full = teacher_stage.train(tiny_teacher_config(tmp_path / "full", tiny_vae_checkpoint, tiny_latents),
                               export=False)
    cfg = tiny_teacher_config(tmp_path / "stopped", tiny_vae_checkpoint, tiny_latents)
    real, calls = teacher_stage.F.mse_loss, [0]

    def sigterm_in_step_2(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(teacher_stage.F, "mse_loss", sigterm_in_step_2)
    code = teacher_stage.main(["--config", str(write_yaml(cfg, tmp_path / "stopped.yaml"))])
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM received: stopped after step 2" in err and "--resume" in err
    assert signal.getsignal(signal.SIGTERM) is before
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None and ckpt.load(latest).step == 2
    assert not Path(cfg.export_path).exists()
    monkeypatch.setattr(teacher_stage.F, "mse_loss", real)
    resumed = teacher_stage.train(cfg, resume=True, export=False)
    assert resumed.losses == full.losses[2:]
    a, b = final_weights(cfg.run.run_dir), final_weights(tmp_path / "full" / "runs" / "teacher")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_a_two_process_launch_stops_every_rank_after_the_same_step(
        tmp_path: Path, tiny_vae_checkpoint: Path, tiny_latents: Path) -> None:
    """``kill <accelerate launch pid>`` (what a job scheduler does): the launcher passes SIGTERM to both
    ranks, they agree on the step to stop after (no rank waits in a collective for the other), rank 0
    writes that step's checkpoint, and a 2-process ``--resume`` continues from it."""
    cfg = tiny_teacher_config(tmp_path / "two", tiny_vae_checkpoint, tiny_latents, max_steps=100_000,
                              save_every=100_000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "trainer.teacher", "--config", str(write_yaml(cfg, tmp_path / "two.yaml")), "--no-export"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe)
        try:
            deadline = time.monotonic() + 120
            while "runtime: 2 process(es)" not in out.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(2.0)  # a few steps
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = err.read_text()
    assert log.count("SIGTERM received: stopped after step") == 2, log[-3000:]  # both ranks, one message each
    steps = {int(m) for m in re.findall(r"stopped after step (\d+)", log)}
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None and len(steps) == 1 and ckpt.load(latest).step == steps.pop() >= 1
    stopped_at = ckpt.load(latest).step
    more = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=stopped_at + 2))
    resumed = launch_two_processes("teacher", more, tmp_path / "two.yaml", timeout_s=120, resume=True)
    assert f"(step {stopped_at})" in resumed
    final = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert final is not None and ckpt.load(final).step == stopped_at + 2


def test_teacher_timesteps_and_sampler() -> None:
    steps = teacher_timesteps(4, shift=5.0)
    assert steps[0] == pytest.approx(1000.0) and steps[-1] == 0.0
    assert steps[1] == pytest.approx(1000 * 5 * 0.75 / (1 + 4 * 0.75), rel=1e-5)  # 937.5
    torch.manual_seed(0)
    model = CausalWanTransformer(get_preset("test").model).eval()
    noise = torch.randn(2, 4, 2, 4, 4)
    cond, uncond = torch.randn(2, 16, 384), torch.zeros(2, 16, 384)
    # A fresh model has a zero output head, so it predicts zero velocity: the ODE leaves the noise alone.
    out = sample_teacher(model, noise, cond, uncond, num_steps=3, cfg_scale=4.0, bf16=False)
    torch.testing.assert_close(out, noise)
    with torch.no_grad():
        model.proj_out.bias.normal_()
    x0, traj = sample_teacher(model, noise, cond, uncond, num_steps=3, cfg_scale=1.0, bf16=False,
                              return_trajectory=True)
    assert len(traj) == 3 and torch.equal(traj[0], noise) and x0.shape == noise.shape
    # Guidance with equal cond/uncond embeddings is no guidance.
    same = sample_teacher(model, noise, cond, cond, num_steps=3, cfg_scale=4.0, bf16=False)
    torch.testing.assert_close(same, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_teacher_sampling_uses_bf16_only_where_the_cpu_has_it(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation samples the teacher without saying a precision: on a CPU without bf16 units that must be
    fp32 (bf16 autocast there is ~30-100x slower), where it has them bf16, as the trainer's ``precision: auto``."""
    import streamgen.precision

    torch.manual_seed(0)
    model = CausalWanTransformer(get_preset("test").model).eval()
    with torch.no_grad():
        model.proj_out.weight.normal_(std=0.1)
    noise, cond = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 16, 384)
    monkeypatch.setattr(streamgen.precision, "cpu_bf16_is_native", lambda: (native, "test"))
    auto = sample_teacher(model, noise, cond, torch.zeros_like(cond), num_steps=2)
    fp32 = sample_teacher(model, noise, cond, torch.zeros_like(cond), num_steps=2, bf16=False)
    bf16 = sample_teacher(model, noise, cond, torch.zeros_like(cond), num_steps=2, bf16=True)
    assert not torch.equal(fp32, bf16)  # the two precisions really differ here
    assert torch.equal(auto, bf16 if native else fp32)


def test_two_processes_equal_one(tmp_path: Path, tiny_vae_checkpoint: Path, tiny_latents: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo, CPU) with the same global batch reaches the
    same weights as one process. Samples, noise and dropout are keyed on global sample indices, so the only
    difference is the order of floating-point sums (gradient all-reduce): tolerance 1e-5 absolute after 4
    fp32 AdamW steps."""
    one = tiny_teacher_config(tmp_path / "one", tiny_vae_checkpoint, tiny_latents, max_steps=4, save_every=4)
    single = teacher_stage.train(one, export=False)
    two = tiny_teacher_config(tmp_path / "two", tiny_vae_checkpoint, tiny_latents, max_steps=4, save_every=4)
    launch_two_processes("teacher", two, tmp_path / "two.yaml", timeout_s=120)
    a, b = final_weights(one.run.run_dir), final_weights(two.run.run_dir)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    assert single.steps == 4


def test_fsdp_equals_one_process_through_a_resume(tmp_path: Path, tiny_vae_checkpoint: Path,
                                                  tiny_latents: Path) -> None:
    """``run.parallel: fsdp`` on 2 CPU processes (FSDP2 over gloo: each DiT block and the root sharded) trains 2
    steps, checkpoints, resumes and trains 2 more: the same weights, EMA and optimizer state as one process
    (tolerance 1e-5 absolute after 4 fp32 AdamW steps: only the order of the gradient sums differs), in the
    same checkpoint layout (full tensors, index-keyed optimizer state), so either mode resumes the other's."""
    one = tiny_teacher_config(tmp_path / "one", tiny_vae_checkpoint, tiny_latents, max_steps=4, save_every=2)
    teacher_stage.train(one, export=False)
    fsdp = tiny_teacher_config(tmp_path / "fsdp", tiny_vae_checkpoint, tiny_latents, max_steps=2, save_every=2,
                               parallel="fsdp")
    out = launch_two_processes("teacher", fsdp, tmp_path / "fsdp.yaml", timeout_s=150)
    assert "FSDP2 (sharded DiT)" in out
    fsdp = dataclasses.replace(fsdp, run=dataclasses.replace(fsdp.run, max_steps=4))
    out = launch_two_processes("teacher", fsdp, tmp_path / "fsdp.yaml", timeout_s=150, resume=True)
    assert "resuming from" in out and "(step 2)" in out
    a_path, b_path = ckpt.latest_checkpoint(one.run.run_dir), ckpt.latest_checkpoint(fsdp.run.run_dir)
    assert a_path is not None and b_path is not None
    a, b = ckpt.load(a_path), ckpt.load(b_path)
    assert a.step == b.step == 4
    for what in ("model", "ema"):
        want, got = getattr(a, what), getattr(b, what)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{what} {key}")
    assert a.optimizer["param_groups"][0]["params"] == b.optimizer["param_groups"][0]["params"]
    assert set(a.optimizer["state"]) == set(b.optimizer["state"])
    for i, state in a.optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b.optimizer["state"][i][key], state[key], atol=1e-5, rtol=1e-3,
                                       msg=f"optimizer {i} {key}")


def test_fsdp_needs_several_processes(tmp_path: Path, tiny_vae_checkpoint: Path, tiny_latents: Path) -> None:
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents, max_steps=1, parallel="fsdp")
    with pytest.raises(ValueError, match="FSDP shards the model over processes, but this launch has 1"):
        teacher_stage.train(cfg, export=False)


@pytest.mark.parametrize("export_dtype", ["bf16", "fp32"])
def test_export_stores_the_ema_weights_in_the_configured_dtype(tmp_path: Path, tiny_vae_checkpoint: Path,
                                                               tiny_latents: Path, export_dtype: str) -> None:
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents, max_steps=2, save_every=2)
    cfg = dataclasses.replace(cfg, export_dtype=export_dtype)
    teacher_stage.train(cfg)
    stored = load_file(cfg.export_path)
    dtype = torch.bfloat16 if export_dtype == "bf16" else torch.float32
    assert {v.dtype for v in stored.values()} == {dtype}
    ema = load_file(str(ckpt.latest_checkpoint(cfg.run.run_dir) / "ema.safetensors"))
    assert set(ema) == set(stored) and all(torch.equal(stored[k], ema[k].to(dtype)) for k in ema)
    assert read_metadata(cfg.export_path)["num_latent_frames"] == "2"
    model = load_transformer(cfg.export_path, expected=get_preset("test").model)
    assert next(model.parameters()).dtype == torch.float32  # loaders upcast
    with pytest.raises(ValueError, match="export_dtype"):
        dataclasses.replace(cfg, export_dtype="fp16")


def test_long_clip_latent_dataset_builds_and_round_trips(tiny_long_latents: Path, tiny_vae_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_long_latents,
                              clip_latent_frames=LONG_CLIP_LATENT_FRAMES)
    spec = cfg.dataset_spec()
    preset = get_preset("test")
    assert spec.num_pixel_frames == preset.pixel_frames(LONG_CLIP_LATENT_FRAMES)  # whole clips, not the horizon
    data = latent_data.load(tiny_long_latents, spec)
    assert data.latents.shape == (6, preset.vae.latent_channels, LONG_CLIP_LATENT_FRAMES, preset.latent_height,
                                  preset.latent_width)
    stored = load_file(str(tiny_long_latents / latent_data.TENSORS))
    assert torch.equal(stored["latents"], data.latents) and torch.isfinite(data.latents).all()
    # A horizon-long dataset of the same clips is a different dataset: never silently mixed.
    short = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_long_latents)
    with pytest.raises(ValueError, match="no complete latent dataset"):
        latent_data.load(tiny_long_latents, dataclasses.replace(short.dataset_spec(), num_clips=6))
    with pytest.raises(ValueError, match="clip_latent_frames must be >="):
        tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_long_latents, clip_latent_frames=1)


def test_random_crops_are_keyed_within_the_clip_and_at_positions_from_zero(
        tiny_long_latents: Path, tiny_vae_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_long_latents,
                              clip_latent_frames=LONG_CLIP_LATENT_FRAMES)
    data = latent_data.load(tiny_long_latents, cfg.dataset_spec())
    a, b = teacher_stage.Batcher(data, cfg), teacher_stage.Batcher(data, cfg)
    horizon = cfg.data.num_latent_frames
    starts = [a.crop_start(step, i) for step in range(20) for i in range(4)]
    assert starts == [b.crop_start(step, i) for step in range(20) for i in range(4)]  # keyed: replays on resume
    assert all(0 <= s <= LONG_CLIP_LATENT_FRAMES - horizon for s in starts)
    assert set(starts) == set(range(LONG_CLIP_LATENT_FRAMES - horizon + 1))  # every start that fits is drawn
    other_seed = teacher_stage.Batcher(data, dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=99)))
    assert starts != [other_seed.crop_start(step, i) for step in range(20) for i in range(4)]
    # The batch holds exactly the crop: x_t = x0 + s (e - x0) with target e - x0, so x0 = x_t - s * target.
    step, ids = 3, [0, 1, 2, 3]
    x_t, t, _, target, offsets = a(step, ids)
    assert x_t.shape[2] == horizon and torch.equal(offsets, torch.zeros(len(ids), dtype=torch.long))
    for row, i in enumerate(ids):
        start = a.crop_start(step, i)
        x0 = data.latents[a.clip_index(i), :, start:start + horizon]
        torch.testing.assert_close(x_t[row] - t[row] / 1000 * target[row], x0, atol=1e-5, rtol=0)
    # The teacher's training forward presents a crop at positions 0..H-1, as the sampler and DMD present windows.
    seen: list[torch.Tensor] = []
    real_rope = transformer_module.rope_freqs

    def recording_rope(positions: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append(positions.clone())
        return real_rope(positions, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(transformer_module, "rope_freqs", recording_rope)
    model = CausalWanTransformer(cfg.model)
    with torch.no_grad():
        teacher_stage.TeacherForward(model)(x_t, t, torch.randn(len(ids), cfg.model.text_max_tokens,
                                                                cfg.model.text_dim))
    assert len(seen) == 1 and torch.equal(seen[0], torch.arange(horizon).expand(len(ids), horizon))
    # With frame embeddings the crop is presented where it lies in its clip: positions start..start + H - 1.
    with_frames = dataclasses.replace(cfg, frame_embeddings=LONG_CLIP_LATENT_FRAMES)
    framed = teacher_stage.Batcher(data, with_frames)
    x_t, t, emb, _, offsets = framed(step, ids)
    assert offsets.tolist() == [framed.crop_start(step, i) for i in ids] and offsets.any()
    seen.clear()
    with torch.no_grad():
        teacher_stage.TeacherForward(CausalWanTransformer(with_frames.model))(x_t, t, emb, offsets)
    assert torch.equal(seen[0], offsets[:, None] + torch.arange(horizon)[None, :])


def test_crop_training_resumes_bit_exactly(tmp_path: Path, tiny_vae_checkpoint: Path, tiny_long_latents: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def cfg_at(root: Path) -> teacher_stage.TeacherTrainConfig:
        return tiny_teacher_config(root, tiny_vae_checkpoint, tiny_long_latents,
                                   clip_latent_frames=LONG_CLIP_LATENT_FRAMES)

    full = teacher_stage.train(cfg_at(tmp_path / "full"), export=False)
    cfg = cfg_at(tmp_path / "killed")
    assert_kill_and_resume_is_bit_exact(cfg, full, tmp_path / "full", monkeypatch)


def test_precision_auto_is_resolved_printed_and_recorded(tmp_path: Path, tiny_vae_checkpoint: Path,
                                                         tiny_latents: Path, capsys: pytest.CaptureFixture) -> None:
    assert teacher_stage.TeacherTrainConfig().precision == "auto"
    expected, reason = resolve_precision("auto")
    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents, precision="auto", max_steps=3)
    teacher_stage.train(cfg, export=False)
    assert f"teacher: precision {expected} ({reason})" in capsys.readouterr().out
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None and ckpt.load(latest).config["precision"] == expected
    with pytest.raises(ValueError, match="precision must be one of"):
        tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents, precision="fp16")


def test_partial_captions_leave_out_exactly_one_attribute() -> None:
    from trainer.data.attributes import ClipSpec
    from trainer.data.captions import caption, parse_caption, partial_caption

    spec = ClipSpec(kind="bottle", colour="purple", material="glossy", background="white_table", motion="slow",
                    camera="static", lighting="soft", tint="warm")
    full = caption(spec)
    assert partial_caption(spec, "colour") == full.replace("purple ", "")
    assert partial_caption(spec, "kind") == full.replace("bottle", "object")
    for without in ("colour", "kind"):
        with pytest.raises(ValueError, match="not a product-clip caption"):
            parse_caption(partial_caption(spec, without))  # never mistaken for a full caption by the evaluation
    with pytest.raises(ValueError, match="without must be one of"):
        partial_caption(spec, "camera")


def test_attribute_dropout_swaps_in_partial_captions_at_its_rate_and_leaves_other_draws_alone(
        tiny_latents: Path, tiny_vae_checkpoint: Path, tmp_path: Path) -> None:
    from streamgen.model.text import HashTokenEncoder

    cfg = tiny_teacher_config(tmp_path, tiny_vae_checkpoint, tiny_latents)
    data = latent_data.load(tiny_latents, cfg.dataset_spec())
    partial = teacher_stage.partial_caption_embeddings(data, cfg.model.text_max_tokens, HashTokenEncoder())
    assert partial.shape == (len(data), 2, *data.text_emb.shape[1:])
    with_ad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, attribute_dropout=0.5))
    plain, mixed = teacher_stage.Batcher(data, cfg), teacher_stage.Batcher(data, with_ad, partial)
    counts = {"full": 0, "no_colour": 0, "no_kind": 0, "none": 0}
    for step in range(60):
        ids = [0, 1, 2, 3]
        a, b = plain(step, ids), mixed(step, ids)
        for x, y in zip(a[:2] + a[3:], b[:2] + b[3:], strict=True):  # noise, timesteps, targets: the same draws
            assert torch.equal(x, y)
        for row, i in enumerate(ids):
            clip = plain.clip_index(i)
            emb = b[2][row]
            if not a[2][row].any():  # prompt dropout: the same samples drop in both
                assert not emb.any()
                counts["none"] += 1
            elif torch.equal(emb, data.text_emb[data.caption_ids[clip]]):
                counts["full"] += 1
            elif torch.equal(emb, partial[clip, 0]):
                counts["no_colour"] += 1
            else:
                assert torch.equal(emb, partial[clip, 1])
                counts["no_kind"] += 1
    kept = counts["full"] + counts["no_colour"] + counts["no_kind"]
    assert 0.35 < (counts["no_colour"] + counts["no_kind"]) / kept < 0.65  # 0.5 of the kept prompts
    assert counts["no_colour"] > 0.3 * (kept - counts["full"]) and counts["no_kind"] > 0.3 * (kept - counts["full"])
    with pytest.raises(ValueError, match="two partial caption embeddings"):
        teacher_stage.Batcher(data, with_ad)
    with pytest.raises(ValueError, match="attribute_dropout must lie in"):
        dataclasses.replace(cfg.data, attribute_dropout=1.5)


def test_temporal_weight_prices_only_what_changes_between_frames() -> None:
    """flow.temporal_weight adds the MSE of the velocity error's frame-to-frame differences: an error that is the
    same in every frame (a static prediction of a static clip's bias) costs nothing extra, one that changes
    between frames (a static prediction of a moving clip) costs the weight times its squared differences."""
    target = torch.randn(2, 4, 5, 3, 3)
    static_error = torch.randn(2, 4, 1, 3, 3).expand(-1, -1, 5, -1, -1)
    plain = torch.nn.functional.mse_loss(target + static_error, target)
    assert torch.allclose(teacher_stage.flow_loss(target + static_error, target, 0.0), plain)
    assert torch.allclose(teacher_stage.flow_loss(target + static_error, target, 2.0), plain)  # no change: no cost
    moving = torch.zeros_like(target)
    moving[:, :, 1::2] = 1.0  # the error flips between 0 and 1 from frame to frame
    expected = moving.square().mean() + 0.5 * moving.diff(dim=2).square().mean()
    assert torch.allclose(teacher_stage.flow_loss(target + moving, target, 0.5), expected)
    one_frame = torch.randn(2, 4, 1, 3, 3)
    zeros = torch.zeros_like(one_frame)
    assert torch.allclose(teacher_stage.flow_loss(one_frame, zeros, 3.0), one_frame.square().mean())
    with pytest.raises(ValueError, match="flow.temporal_weight must be >= 0"):
        teacher_stage.FlowConfig(temporal_weight=-1.0)


def test_frame_deviation_weight_prices_a_slow_trend_that_differences_barely_see() -> None:
    """flow.frame_deviation_weight adds the MSE of the error's deviation from its frame mean: nothing for an error
    the same in every frame, and for a linear trend over 12 frames (a zoom a static prediction misses) ~12x what
    the difference term charges at the same weight."""
    target = torch.randn(2, 4, 12, 3, 3)
    static_error = torch.randn(2, 4, 1, 3, 3).expand(-1, -1, 12, -1, -1)
    plain = torch.nn.functional.mse_loss(target + static_error, target)
    assert torch.allclose(teacher_stage.flow_loss(target + static_error, target, 0.0, 5.0), plain)
    trend = torch.linspace(-1.0, 1.0, 12).view(1, 1, 12, 1, 1).expand(2, 4, 12, 3, 3)
    base = trend.square().mean()
    deviation = teacher_stage.flow_loss(target + trend, target, 0.0, 1.0) - base
    difference = teacher_stage.flow_loss(target + trend, target, 1.0, 0.0) - base
    torch.testing.assert_close(deviation, (trend - trend.mean(dim=2, keepdim=True)).square().mean())
    assert deviation > 10 * difference
    both = teacher_stage.flow_loss(target + trend, target, 1.0, 1.0)
    torch.testing.assert_close(both, base + deviation + difference)
    with pytest.raises(ValueError, match="flow.frame_deviation_weight must be >= 0"):
        teacher_stage.FlowConfig(frame_deviation_weight=-0.1)


def test_frame_embedding_lr_scale_moves_only_the_embedding_faster(tmp_path: Path, tiny_vae_checkpoint: Path,
                                                                  tiny_long_latents: Path) -> None:
    """The embedding's first non-zero gradient comes at step 1 (at step 0 the zero-initialised output head passes
    none back), and AdamW's first move of a weight is lr * m / (sqrt(v) + eps) from that gradient alone. Two
    steps at ``frame_embedding_lr_scale`` s therefore end with the embedding exactly s times the plain run's and
    every other weight equal: the embedding is zero in both runs' forwards, so all their gradients agree."""
    def run(scale: float) -> dict[str, torch.Tensor]:
        root = tmp_path / f"scale{scale}"
        cfg = tiny_teacher_config(root, tiny_vae_checkpoint, tiny_long_latents,
                                  clip_latent_frames=LONG_CLIP_LATENT_FRAMES, max_steps=2, save_every=2)
        cfg = dataclasses.replace(cfg, frame_embeddings=LONG_CLIP_LATENT_FRAMES, frame_embedding_lr_scale=scale,
                                  optim=dataclasses.replace(cfg.optim, warmup_steps=0))
        teacher_stage.train(cfg, export=False)
        return final_weights(root / "runs" / "teacher")

    plain, scaled = run(1.0), run(7.0)
    frame_keys = [k for k in plain if k.startswith("condition_embedder.frame_embedding.")]
    assert len(frame_keys) == 2 and plain[frame_keys[0]].abs().max() > 0
    for key in plain:
        if key in frame_keys:
            torch.testing.assert_close(scaled[key], 7.0 * plain[key], rtol=1e-5, atol=0)
        else:
            assert torch.equal(scaled[key], plain[key]), key


def test_frame_embedding_lr_scale_is_checked() -> None:
    base = teacher_stage.TeacherTrainConfig(frame_embeddings=4)
    with pytest.raises(ValueError, match="frame_embedding_lr_scale must be > 0"):
        dataclasses.replace(base, frame_embedding_lr_scale=0.0)
    with pytest.raises(ValueError, match="needs frame_embeddings > 0"):
        dataclasses.replace(base, frame_embeddings=0, frame_embedding_lr_scale=10.0)
    model = CausalWanTransformer(dataclasses.replace(get_preset("test").model, frame_embeddings=4))
    groups = teacher_stage.parameter_groups(model, 10.0)
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 10.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(teacher_stage.parameter_groups(model, 1.0)) == 1
