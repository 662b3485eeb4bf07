"""Shared tiny-config fixtures. Tests run on CPU in fp32 unless they say otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from streamgen.config import Preset, get_preset


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def test_preset() -> Preset:
    return get_preset("test")


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
