"""The offline Pipeline maps a uint64 seed to the generator as the engine does (generator_seed), so a
seed above 2**32 gives the same video offline as served, and not the video of its low 32 bits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from streamgen.engine.request import generator_seed
from streamgen.model.text import HashTokenEncoder, TextEncoder
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE
from streamgen.pipeline import Pipeline
from tests.server.harness import PRESET

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_large_seeds_map_like_the_engine(tiny_model: Callable[..., CausalWanTransformer]) -> None:
    model = tiny_model(PRESET.model)  # a perturbed head: with the zero-initialised one every seed looks alike
    text = TextEncoder(PRESET.model.text_max_tokens, token_encoder=HashTokenEncoder())
    pipe = Pipeline(PRESET, model, CausalVideoVAE(PRESET.vae), text)
    seed = 2**40 + 3
    large, mapped, low = (pipe("a red mug", num_frames=12, seed=s) for s in (seed, generator_seed(seed), 3))
    assert np.array_equal(large, mapped) and not np.array_equal(large, low)
