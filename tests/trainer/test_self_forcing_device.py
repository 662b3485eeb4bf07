"""Self-Forcing on ``run.device``: two steps (every option, evaluation, a resume) leave every weight and
optimizer state of student, EMA and critic on the device with finite losses, the export is the EMA's CPU
copy; no host tensor enters an iteration that runs elsewhere (checked on the ``meta`` device, so without a
GPU); and a GPU ``run.device`` is no longer refused at parse or start time."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from streamgen.config import get_preset
from trainer import distill_config, distill_step, distill_train, latent_data, ode_init, self_forcing

from .conftest import write_yaml
from .student_setup import HORIZON, assets, ode_config, sf_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets(tmp_path_factory.getbasetemp() / "student_assets")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory, root: Path) -> str:
    """Teacher ODE pairs for the regression option (made on the CPU: they are data, read from the host)."""
    ode = ode_config(tmp_path_factory.mktemp("sf_device_pairs"), root, run={"max_steps": 1, "device": "cpu"})
    ode_init.train(ode, export=False)
    return ode.pairs.dir


def _off_device(named: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> list[str]:
    return [name for name, tensor in named if tensor.device != device]


def _optimizer_off_device(optimizer: torch.optim.Optimizer, device: torch.device) -> list[str]:
    """Optimizer state tensors not on ``device``, leaving out AdamW's ``step`` count: PyTorch keeps it as a
    host scalar (unless fused or capturable) so that counting steps never waits for the device."""
    return [f"{i}.{key}" for i, state in enumerate(optimizer.state.values()) for key, value in state.items()
            if key != "step" and isinstance(value, torch.Tensor) and value.device != device]


def _train_recording_step(cfg: Any, monkeypatch: pytest.MonkeyPatch,
                          **kwargs: Any) -> tuple[distill_train.SelfForcingResult, distill_train.DistillTrainStep]:
    """``distill_train.train(cfg)``, keeping the :class:`DistillTrainStep` it built (models and optimizers)."""
    built: list[distill_train.DistillTrainStep] = []

    class Recording(distill_train.DistillTrainStep):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            built.append(self)

    monkeypatch.setattr(distill_train, "DistillTrainStep", Recording)
    result = distill_train.train(cfg, **kwargs)
    (step,) = built
    return result, step


def _assert_on_device(step: distill_train.DistillTrainStep, device: torch.device) -> None:
    m = step.m
    modules = {"student": m.student, "ema": m.ema, "critic": m.critic, "teacher": m.teacher, "gan_head": m.gan_head}
    for name, module in modules.items():
        assert module is not None, name
        tensors = [*module.named_parameters(), *module.named_buffers()]
        assert not _off_device(tensors, device), (name, _off_device(tensors, device))
    for name, optimizer, params in (("generator", step.g_opt, step.g_params), ("critic", step.c_opt, step.c_params)):
        assert len(optimizer.state) == len(params), name  # it stepped: every parameter has state
        assert not _optimizer_off_device(optimizer, device), (name, _optimizer_off_device(optimizer, device))


@pytest.mark.parametrize("mode", ["sf", "sfpp", "df"])
def test_two_steps_train_on_the_device(tmp_path: Path, root: Path, pairs_dir: str, device: torch.device, mode: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollout (own chunks, the rolling window, noised ground truth), DMD, critic, every optional loss and an
    evaluation of the EMA student on ``device``; then a resume puts the restored state back there."""
    losses: dict[str, Any] = {"gan": 0.1, "temporal": 0.1, "background": 0.1, "identity": 0.1}
    if mode == "sf":
        losses |= {"regression": 1.0, "regression_pairs": pairs_dir}
    cfg = sf_config(tmp_path, root, mode, losses=losses, critic={"steps": 2}, eval={"every": 2, "num_prompts": 1},
                    run={"device": str(device), "max_steps": 2, "save_every": 2})
    result, step = _train_recording_step(cfg, monkeypatch)
    assert result.steps == 2 and result.generator_steps == 1
    assert all(torch.isfinite(torch.tensor(result.losses + result.generator_losses)))
    assert [e["step"] for e in result.eval_history] == [2]
    _assert_on_device(step, device)
    exported = load_file(cfg.export_path)  # fp32 here: the EMA student's weights, copied to the CPU
    ema = step.m.ema.state_dict()
    assert set(exported) == set(ema) and all(torch.equal(exported[k], ema[k].cpu()) for k in ema)

    more = sf_config(tmp_path, root, mode, losses=losses, critic={"steps": 2},
                     run={"device": str(device), "max_steps": 3, "save_every": 3})
    resumed, step = _train_recording_step(more, monkeypatch, resume=True, export=False)
    assert resumed.steps == 3 and all(torch.isfinite(torch.tensor(resumed.losses)))
    _assert_on_device(step, device)


@pytest.mark.parametrize("mode", ["sf", "sfpp", "tf", "df"])
def test_no_host_tensor_enters_an_iteration_on_another_device(tmp_path: Path, root: Path, pairs_dir: str, mode: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An iteration's pieces with models and batches on PyTorch's ``meta`` device (shapes without data, so it
    runs on any machine), where an op that mixes in a CPU tensor raises: the rollout (own chunks, the rolling
    window, clean or noised ground truth), the generator loss with every option, the critic loss with the GAN
    head, and both backwards. Noise and timesteps drawn on the CPU must have been moved."""
    real_autocast = torch.autocast  # autocast knows no meta device; fp32 here, so it is off anyway
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: real_autocast(
        "cpu" if device_type == "meta" else device_type, **kw))
    meta = torch.device("meta")
    cfg = sf_config(tmp_path, root, mode, losses={"gan": 0.1, "temporal": 0.1, "background": 0.1, "identity": 0.1,
                                                  "regression": 1.0, "regression_pairs": pairs_dir})
    preset = get_preset(cfg.preset)
    geom = distill_config.resolve_geometry(cfg, HORIZON, preset.sampler.chunk_frames)
    models = distill_train.load_models(cfg, preset, meta)
    data = latent_data.load(Path(cfg.data.latents_dir), cfg.data.spec(preset, HORIZON))
    step = distill_step.DistillStep(cfg, preset, geom, models, distill_step.Batches(data, cfg.run.seed, meta))
    ids = [0, 1]
    text = step.batches.text(ids)
    window = step.generate(0, 0, ids, text, grad=True)
    g_loss, g_parts = step.generator_loss(0, ids, window, text)
    g_loss.backward()
    c_loss, c_parts = step.critic_loss(0, 1, ids, step.generate(0, 1, ids, text, grad=False), text)
    c_loss.backward()
    assert set(g_parts) == {"dmd", "gan_g", "regression", "temporal", "background", "identity"}
    assert set(c_parts) == {"critic", "gan_d"}
    outputs = [window, g_loss, c_loss, *g_parts.values(), *c_parts.values()]
    assert all(t.device == meta for t in outputs)
    for name, module in (("student", models.student), ("critic", models.critic), ("gan_head", models.gan_head)):
        assert module is not None
        grads = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
        assert grads and not _off_device(grads, meta), name


class _Started(Exception):
    """Raised by the stand-in for ``make_runtime``: the stage got past its start-time checks."""


@pytest.mark.parametrize("device_arg", ["auto", "cuda", "cuda:0"])
def test_a_gpu_device_is_no_longer_refused(tmp_path: Path, root: Path, device_arg: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA reported present, ``--device auto|cuda|cuda:0`` passes parsing, the input checks and the
    start of ``train`` (where a GPU used to be refused with exit 2) and reaches the runtime's construction,
    which is replaced here so that nothing is allocated on a device this machine may not have."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked: list[str] = []

    def started(run: Any, precision: str = "fp32") -> None:
        asked.append(run.device)
        raise _Started

    monkeypatch.setattr(distill_train, "make_runtime", started)
    yaml_path = write_yaml(sf_config(tmp_path, root, "sf"), tmp_path / "sf.yaml")
    with pytest.raises(_Started):
        self_forcing.main(["--config", str(yaml_path), "--device", device_arg])
    assert asked == [device_arg]
