"""Self-Forcing stage: every mode trains and resumes, options and evaluation run, bad configs and mismatched
checkpoints are refused before any work, a NaN stops the run with the last good checkpoint intact, and a
2-process accelerate run equals the 1-process run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_transformer, read_metadata, save_checkpoint
from trainer import distill_config, distill_step, distill_train, latent_data, self_forcing
from trainer.common import checkpoint as ckpt
from trainer.common.runtime import NonFiniteLossError
from trainer.losses import dmd as dmd_losses
from trainer.rollout import first_evicting_chunk

from .conftest import final_weights, launch_two_processes, write_yaml
from .student_setup import HORIZON, assets, ode_config, sf_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets(tmp_path_factory.getbasetemp() / "student_assets")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_transformer(path, expected=get_preset("test").model).state_dict()


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["sf", "sfpp", "tf", "df"])
def test_each_mode_trains_exports_and_resumes(tmp_path: Path, root: Path, mode: str) -> None:
    cfg = sf_config(tmp_path, root, mode)
    first = distill_train.train(cfg)
    assert first.steps == 4 and first.generator_steps == 2  # generator every 2nd iteration here
    assert all(torch.isfinite(torch.tensor(first.losses + first.generator_losses)))
    init = _weights(root / "teacher.safetensors")
    exported = _weights(Path(cfg.export_path))
    assert _changed(exported, init)
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None
    state = ckpt.load(latest)
    critic = {k.removeprefix("critic."): v for k, v in state.model.items() if k.startswith("critic.")}
    assert _changed(critic, init)  # the critic trained too
    assert set(state.optimizer) == {"generator", "critic", "generator_steps"}
    meta = read_metadata(cfg.export_path)
    assert meta["mode"] == mode and meta["window_frames"] == str(HORIZON)
    assert meta["rollout_frames"] == str(12 if mode == "sfpp" else HORIZON)

    more = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=6))
    resumed = distill_train.train(more, resume=True, export=False)
    assert resumed.steps == 6 and len(resumed.losses) == 2 and resumed.generator_steps == 3
    if mode == "sf":  # the continued run replays exactly what an uninterrupted one does
        straight = distill_train.train(sf_config(tmp_path / "straight", root, mode, run={"max_steps": 6}),
                                       export=False)
        assert straight.losses[4:] == resumed.losses
        assert straight.generator_losses[2:] == resumed.generator_losses


def test_options_and_evaluation_run(tmp_path: Path, root: Path) -> None:
    """GAN head + two-time-scale critic, ODE-pair regression, temporal and preservation losses, eval to TB."""
    from trainer import ode_init

    ode = ode_config(tmp_path, root, run={"max_steps": 1})
    ode_init.train(ode, export=False)
    cfg = sf_config(tmp_path, root, "sf",
                    losses={"gan": 0.1, "regression": 1.0, "regression_pairs": ode.pairs.dir, "temporal": 0.1,
                            "background": 0.1, "identity": 0.1},
                    critic={"steps": 2, "lr_mult": 2.0}, eval={"every": 4, "num_prompts": 2},
                    run={"max_steps": 4, "save_every": 4})
    result = distill_train.train(cfg)
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    (evaluation,) = result.eval_history
    assert evaluation["step"] == 4 and "flag_rate/motion" in evaluation
    state = ckpt.load(ckpt.latest_checkpoint(cfg.run.run_dir))  # type: ignore[arg-type]
    assert any(k.startswith("gan_head.") for k in state.model)
    assert any(p.name.startswith("events") for p in (cfg.run.run_dir / "tb").iterdir())


def _save_like(src: Path, dst: Path, **meta: str) -> Path:
    model = load_transformer(src, expected=get_preset("test").model)
    save_checkpoint(model, dst, kind="transformer", config=model.cfg,
                    extra_metadata={**read_metadata(src), **meta} | {"kind": "transformer"})
    return dst


def test_mismatched_checkpoints_are_refused_before_any_work(tmp_path: Path, root: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    other = dataclasses.replace(get_preset("test").model, text_dim=128)
    wrong_model = tmp_path / "wrong_text_dim.safetensors"
    save_checkpoint(CausalWanTransformer(other), wrong_model, kind="transformer", config=other)
    other_space = _save_like(root / "teacher.safetensors", tmp_path / "other_vae.safetensors",
                             vae_checkpoint=str(tmp_path / "another_vae.safetensors"))
    other_preset = _save_like(root / "teacher.safetensors", tmp_path / "other_preset.safetensors", preset="default")
    cases = [({"models": {"student_init": str(wrong_model)}}, ["student_init does not match preset 'test'",
                                                              "text_dim"]),
             ({"models": {"critic_init": str(other_space)}}, ["different latent spaces"]),
             ({"models": {"critic_init": str(other_preset)}}, ["made for preset 'default'"]),
             ({"rollout": {"window_frames": HORIZON + 3}}, ["exceeds the teacher's horizon"]),
             ({"data": {"num_latent_frames": 3}}, ["holds a latent dataset for", "teacher's latent dataset"]),
             ({"models": {"teacher": str(tmp_path / "missing.safetensors")}}, ["does not exist"])]
    for i, (change, messages) in enumerate(cases):
        cfg = sf_config(tmp_path / f"case{i}", root, "sf", **change)
        assert self_forcing.main(["--config", str(write_yaml(cfg, tmp_path / f"case{i}.yaml"))]) == 2, change
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err
        assert not cfg.run.run_dir.exists()


def test_bad_configs_are_refused_before_any_work(tmp_path: Path, root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = write_yaml(sf_config(tmp_path, root, "sf"), tmp_path / "good.yaml")
    bad = [(["--set", "mode=sfxx"], "mode must be one of"),
           (["--set", "dmd.gen_every=0"], "dmd.gen_every must be >= 1"),
           (["--set", "dmd.min_tt=3"], "unknown field 'min_tt'"),
           (["--set", "mode=sfpp", "--set", "rollout.num_frames=null"], "sfpp needs rollout.num_frames"),
           (["--set", "mode=sfpp", "--set", "rollout.num_frames=4"], "num_frames (4) > window (6)"),
           (["--set", "losses.regression=1.0", "--set", "losses.regression_pairs=/nonexistent"], "ODE pairs"),
           (["--set", "models.bootstrap=true", "--set", "preset=default"], "only for preset 'test'"),
           (["--set", "critic.lr_mult=fast"], "critic.lr_mult")]
    for extra, message in bad:
        assert self_forcing.main(["--config", str(yaml_path), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "runs").exists()
    assert self_forcing.main(["--config", str(yaml_path), "--check"]) == 0
    assert '"window_frames": 6' in capsys.readouterr().out


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        self_forcing.main(["--help"])
    text = capsys.readouterr().out
    for key in ("mode", "models.teacher", "models.critic_init", "rollout.num_frames", "rollout.grad_frames",
                "dmd.cfg_scale", "dmd.gen_every", "critic.lr_mult", "critic.steps", "optim.betas", "losses.gan",
                "losses.regression_kind", "eval.every", "run.num_threads", "forcing.df_max_timestep"):
        assert f"  {key}:" in text, key


def test_nan_stops_with_last_good_checkpoint_intact(tmp_path: Path, root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = sf_config(tmp_path, root, "sf", run={"max_steps": 6, "save_every": 2})
    real = dmd_losses.dmd_loss
    calls = [0]

    def nan_on_second_generator_step(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        loss = real(x, grad)
        return loss * float("nan") if calls[0] == 2 else loss

    monkeypatch.setattr(dmd_losses, "dmd_loss", nan_on_second_generator_step)
    with pytest.raises(NonFiniteLossError, match="generator loss is nan at step 2.*step_00000002"):
        distill_train.train(cfg)
    latest = ckpt.latest_checkpoint(cfg.run.run_dir)
    assert latest is not None and latest.name == "step_00000002"
    state = ckpt.load(latest)
    assert state.step == 2 and all(torch.isfinite(v).all() for v in state.model.values())
    assert not Path(cfg.export_path).exists()


def test_two_processes_equal_one(tmp_path: Path, root: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo, CPU), global batch 2: every random draw is
    keyed on global sample indices or shared keys, so 2 processes reach the 1-process weights up to the order
    of the gradient sums. AdamW with beta1 = 0 turns a rounding-level gradient difference into up to a
    full ``lr``-sized step on near-zero gradients, so the bound is 1e-5 at lr 1e-4 after 3 fp32 iterations."""
    changes = {"run": {"max_steps": 3, "save_every": 3}, "optim": {"lr": 1e-4}}
    one = sf_config(tmp_path / "one", root, "sfpp", **changes)
    distill_train.train(one, export=False)
    two = sf_config(tmp_path / "two", root, "sfpp", **changes)
    launch_two_processes("self_forcing", two, tmp_path / "two.yaml", timeout_s=180)
    a, b = final_weights(one.run.run_dir), final_weights(two.run.run_dir)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)


def test_fsdp_equals_one_process_through_a_resume(tmp_path: Path, root: Path) -> None:
    """``run.parallel: fsdp`` on 2 CPU processes shards the student and the critic (FSDP2 over gloo; the GAN
    head and the EMA stay whole, so the critic's clipping mixes sharded and whole gradients); 2 iterations,
    checkpoint, resume, 2 more reach the 1-process weights, EMA included (bound as in the DDP test above)."""
    changes = {"run": {"max_steps": 4, "save_every": 2}, "optim": {"lr": 1e-4}, "losses": {"gan": 0.1}}
    one = sf_config(tmp_path / "one", root, "sf", **changes)
    distill_train.train(one, export=False)
    fsdp = sf_config(tmp_path / "fsdp", root, "sf", **{**changes, "run": {"max_steps": 2, "save_every": 2,
                                                                          "parallel": "fsdp"}})
    assert "FSDP2 (sharded DiT)" in launch_two_processes("self_forcing", fsdp, tmp_path / "fsdp.yaml", 180)
    fsdp = dataclasses.replace(fsdp, run=dataclasses.replace(fsdp.run, max_steps=4))
    assert "(step 2)" in launch_two_processes("self_forcing", fsdp, tmp_path / "fsdp.yaml", 180, resume=True)
    a = ckpt.load(ckpt.latest_checkpoint(one.run.run_dir))  # type: ignore[arg-type]
    b = ckpt.load(ckpt.latest_checkpoint(fsdp.run.run_dir))  # type: ignore[arg-type]
    assert a.step == b.step == 4 and b.optimizer["generator_steps"] == a.optimizer["generator_steps"] == 2
    assert any(k.startswith("gan_head.") for k in b.model)
    for what in ("model", "ema"):
        want, got = getattr(a, what), getattr(b, what)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{what} {key}")


def test_first_evicting_chunk_is_where_the_rolling_cache_first_hides_a_frame() -> None:
    preset = get_preset("default")
    chunk = preset.sampler.chunk_frames
    cache = ContiguousKVCache(1, 1, preset.cache, backend=None)  # type: ignore[arg-type]  # attention unused
    first_hidden = None
    for start in range(0, 10 * chunk, chunk):
        if first_hidden is None and cache.visible_frame_ids(start + chunk) != list(range(start)):
            first_hidden = start
        view = cache.view(start, chunk)
        view.new_keys[0] = view.new_values[0] = torch.zeros(1, chunk, 1, 1)
        cache.commit(view)
    assert first_hidden == first_evicting_chunk(preset.cache, chunk) == 12  # window 12 incl. 3 sinks, chunk 3
    assert first_evicting_chunk(get_preset("test").cache, chunk) is None  # unbounded cache: never evicts


@pytest.mark.parametrize("mode", ["sf", "sfpp"])
def test_rollout_lengths_and_windows_come_out_as_configured(tmp_path: Path, root: Path, mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """sf rolls out the teacher's whole horizon; sfpp 10x it, each window drawn from [window_min_start, N - T]."""
    changes = {"rollout": {"num_frames": 10 * HORIZON, "window_min_start": 12}} if mode == "sfpp" else {}
    cfg = sf_config(tmp_path, root, mode, **changes)
    preset = get_preset(cfg.preset)
    chunk = preset.sampler.chunk_frames
    geom = distill_config.resolve_geometry(cfg, HORIZON, chunk)
    calls: list[tuple[int, tuple[int, int]]] = []

    def recording_rollout(model: object, context: object, preset: object, length: int, gens: list[object],
                          **kwargs: object) -> SimpleNamespace:
        calls.append((length, kwargs["grad_span"]))  # type: ignore[arg-type]
        return SimpleNamespace(latents=torch.zeros(len(gens), 4, length, 2, 2))

    monkeypatch.setattr(distill_step, "rollout", recording_rollout)
    data = latent_data.load(Path(cfg.data.latents_dir), cfg.data.spec(preset, HORIZON))
    step = distill_step.DistillStep(cfg, preset, geom, distill_train.load_models(cfg, preset),
                                    distill_step.Batches(data, cfg.run.seed))
    text = torch.zeros(2, preset.model.text_max_tokens, preset.model.text_dim)
    for s in range(40):
        out = step.generate(s, 0, [0, 1], text, grad=False)
        assert out.shape[2] == HORIZON  # the scored window is the teacher's horizon
    if mode == "sf":
        assert geom.num_frames == HORIZON and set(calls) == {(HORIZON, (0, HORIZON))}  # whole horizon, 2 chunks
        return
    assert geom.num_frames == 10 * HORIZON
    starts = [span[0] for _, span in calls]
    assert all(length == start + HORIZON and span == (start, start + HORIZON)
               for (length, span), start in zip(calls, starts, strict=True))
    allowed = set(range(12, 10 * HORIZON - HORIZON + 1, chunk))
    assert set(starts) <= allowed and len(set(starts)) >= len(allowed) // 2  # uniform over the allowed starts
    for bad, message in ((13, "multiple of the chunk"), (10 * HORIZON - HORIZON + chunk, "leaves no window")):
        with pytest.raises(ValueError, match=message):
            distill_config.resolve_geometry(sf_config(tmp_path, root, "sfpp", rollout={
                "num_frames": 10 * HORIZON, "window_min_start": bad}), HORIZON, chunk)
    with pytest.raises(ValueError, match="window_min_start is for mode sfpp"):
        distill_config.resolve_geometry(sf_config(tmp_path, root, "sf", rollout={"window_min_start": 3}),
                                      HORIZON, chunk)


def test_report_after_a_resume_holds_the_whole_runs_evaluations(tmp_path: Path, root: Path) -> None:
    """The evaluation history rides in the checkpoint, so report.json lists step 2's evaluation (before the
    resume) beside step 4's, not only what the resumed call evaluated."""
    changes = {"eval": {"every": 2, "num_prompts": 1}, "run": {"max_steps": 2, "save_every": 2}}
    first = distill_train.train(sf_config(tmp_path, root, "sf", **changes), export=False)
    assert [e["step"] for e in first.eval_history] == [2]
    cfg = sf_config(tmp_path, root, "sf", **{**changes, "run": {"max_steps": 4, "save_every": 2}})
    resumed = distill_train.train(cfg, resume=True)
    assert [e["step"] for e in resumed.eval_history] == [2, 4]
    report = json.loads((cfg.run.run_dir / "report.json").read_text())
    assert [e["step"] for e in report["eval"]] == [2, 4]
    assert report["eval"][0] == first.eval_history[0]
