"""Shared tiny-config fixtures. Tests run on CPU in fp32 unless they say otherwise."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from streamgen.config import ModelConfig, Preset, get_preset
from streamgen.engine.engine import Engine, EngineConfig
from streamgen.model.text import HashTokenEncoder, TextEncoder
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE


def seeded_tiny_model(model_cfg: ModelConfig | None = None, *, seed: int | None = 0,
                      scale: float = 0.1) -> CausalWanTransformer:
    """The test preset's transformer (or ``model_cfg``'s) with seeded random weights, every parameter
    perturbed by ``scale * N(0, 1)``: the zero-initialised head would otherwise make every output pure
    noise and every comparison trivially pass. ``seed=None`` draws from the global generator as it
    stands (``_deterministic`` seeds it with 0 at each test's start)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = CausalWanTransformer(model_cfg or get_preset("test").model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def make_tiny_engine(preset: Preset | None = None, model: CausalWanTransformer | None = None,
                     device: torch.device | str = "cpu", **config: Any) -> Engine:
    """An fp32 engine on ``device`` over :func:`seeded_tiny_model` (seed 0), the random-init VAE and
    the hash text encoder, so two engines built alike produce identical frames; ``config`` overrides
    :class:`EngineConfig` fields (a 4 MiB KV pool unless given)."""
    preset = preset or get_preset("test")
    model = model if model is not None else seeded_tiny_model(preset.model)
    vae = CausalVideoVAE(preset.vae)  # after the model: its init draws from the same global generator
    text = TextEncoder(preset.model.text_max_tokens, token_encoder=HashTokenEncoder())
    engine_cfg = EngineConfig(**{"kv_memory_bytes": 2**22, **config})
    return Engine(preset, model, vae, text, engine_cfg, dtype=torch.float32, device=device)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def _cuda_skip_reason() -> str | None:
    """Why ``gpu`` tests cannot run here, or ``None`` where PyTorch sees a CUDA device."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return f"needs a CUDA device: torch {torch.__version__} ({build}) sees none"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, saying why, where there is no CUDA device (run them with ``-m gpu``)."""
    reason = _cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# cpu always; cuda:0 where available, marked ``gpu`` so `pytest -m gpu` selects the CUDA half.
_DEVICE_PARAMS = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICE_PARAMS)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a device-parametrised test runs on: ``cpu``, plus ``cuda:0`` where CUDA is available."""
    return torch.device("cuda", 0) if request.param == "cuda" else torch.device("cpu")


@pytest.fixture
def test_preset() -> Preset:
    return get_preset("test")


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., CausalWanTransformer]:
    """:func:`seeded_tiny_model`, the one "seeded tiny model with a perturbed head" of the suite."""
    return seeded_tiny_model


@pytest.fixture(scope="session")
def tiny_engine() -> Callable[..., Engine]:
    """:func:`make_tiny_engine`: an engine over the seeded tiny model."""
    return make_tiny_engine


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    For tests on tiny tensors, where a second OpenMP thread only adds spin-wait noise, and for the
    serving tests, whose engine thread runs beside the test's own work on a 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
