"""Shared tiny-config fixtures. Tests run on CPU in fp32 unless they say otherwise."""

from __future__ import annotations

import pytest
import torch

from streamgen.config import Preset, get_preset


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def test_preset() -> Preset:
    return get_preset("test")
