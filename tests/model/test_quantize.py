"""streamgen.model.quantize: INT8 linear layers in the DiT blocks track the float32 model; bad combinations
are errors naming what to use."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from streamgen.config import Preset
from streamgen.model.quantize import check_quantize, quantize_transformer
from streamgen.model.transformer import CausalWanTransformer

MakeModel = Callable[..., CausalWanTransformer]  # the tiny_model fixture (tests/conftest.py)


def test_int8_blocks_track_the_float_model(test_preset: Preset, tiny_model: MakeModel) -> None:
    model = tiny_model(test_preset.model, seed=None, scale=0.05)
    quantized = quantize_transformer(copy.deepcopy(model), "int8")
    block_linears = [m for m in quantized.blocks.modules() if type(m) is nn.Linear]
    assert block_linears == []  # every block linear converted
    assert type(quantized.proj_out) is nn.Linear and type(quantized.patch_embedding) is nn.Conv3d
    m = test_preset.model
    emb = torch.randn(1, m.text_max_tokens, m.text_dim)
    x = torch.randn(1, m.latent_channels, 3, test_preset.latent_height, test_preset.latent_width)
    t = torch.tensor([[900.0, 900.0, 900.0]])
    with torch.no_grad():
        ref = model(x, t, model.encode_text(emb))
        out = quantized(x, t, quantized.encode_text(emb))
    rel = ((out - ref).norm() / ref.norm()).item()
    # Per-tensor INT8 weights and per-call activation scales: ~1 % relative error per forward at this size.
    assert 0 < rel < 0.05, rel


def test_none_is_the_identity(test_preset: Preset, tiny_model: MakeModel) -> None:
    model = tiny_model(test_preset.model, seed=None, scale=0.05)
    assert quantize_transformer(model, "none") is model
    assert any(type(m) is nn.Linear for m in model.blocks.modules())


@pytest.mark.parametrize(("mode", "device", "dtype", "message"), [
    ("int4", "cpu", torch.float32, "choose one of none, int8"),
    ("int8", "cpu", torch.bfloat16, "use --dtype float32"),
    ("int8", "cuda", torch.float32, "CPU only"),
])
def test_bad_combinations_name_what_to_use(mode: str, device: str, dtype: torch.dtype, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_quantize(mode, device, dtype)
    check_quantize("none", device, dtype)  # always allowed
