"""streamgen.model.compile: compiled blocks give the eager model's chunks (rolling cache included)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from streamgen.config import Preset
from streamgen.generate import generate_latents
from streamgen.model.compile import compile_blocks, compile_options
from streamgen.model.transformer import CausalWanTransformer


@pytest.mark.slow  # Inductor compiles C++ kernels: ~1 min on 2 cores
def test_compiled_blocks_equal_eager_over_a_stream(test_preset: Preset, tmp_path: Path,
                                                   tiny_model: Callable[..., CausalWanTransformer]) -> None:
    model = tiny_model(test_preset.model, seed=None, scale=0.05)
    compiled = compile_blocks(copy.deepcopy(model), cache_dir=tmp_path / "inductor")
    emb = torch.randn(1, test_preset.model.text_max_tokens, test_preset.model.text_dim)
    num_latent = 4 * test_preset.sampler.chunk_frames  # past the rolling window's first evictions
    with torch.no_grad():
        runs = [torch.cat(list(generate_latents(m, m.encode_text(emb), test_preset, num_latent,
                                                torch.Generator().manual_seed(0))), dim=2)
                for m in (model, compiled)]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)
    assert any((tmp_path / "inductor").iterdir())  # kernels cached on disk for the next start


def test_compile_refuses_a_model_without_blocks() -> None:
    with pytest.raises(TypeError, match="CausalWanTransformer"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compile_options_autotune_gemms_on_cuda_and_stay_dynamic_on_cpu() -> None:
    assert compile_options(torch.device("cpu")) == {"dynamic": True}
    assert compile_options(torch.device("cuda", 0)) == {"mode": "max-autotune-no-cudagraphs", "dynamic": None}


@pytest.mark.gpu
def test_compiled_blocks_equal_eager_on_cuda(test_preset: Preset, tmp_path: Path,
                                             tiny_model: Callable[..., CausalWanTransformer]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: --compile on a GPU autotunes Triton kernels (max-autotune-no-cudagraphs)")
    model = tiny_model(test_preset.model, seed=None, scale=0.05).to("cuda")
    compiled = compile_blocks(copy.deepcopy(model), cache_dir=tmp_path / "inductor")
    emb = torch.randn(1, test_preset.model.text_max_tokens, test_preset.model.text_dim, device="cuda")
    num_latent = 4 * test_preset.sampler.chunk_frames
    with torch.no_grad():
        runs = [torch.cat(list(generate_latents(m, m.encode_text(emb), test_preset, num_latent,
                                                torch.Generator().manual_seed(0))), dim=2)
                for m in (model, compiled)]
    # TF32 / autotuned GEMM orders differ from eager cuBLAS in the last bits.
    torch.testing.assert_close(runs[1], runs[0], rtol=2e-3, atol=2e-3)
