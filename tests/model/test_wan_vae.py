"""Wan VAE adapter: streaming decode of N chunks == diffusers' whole decode; Wan's latent normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers (wan extra) provides AutoencoderKLWan")
from streamgen.model.wan_vae import WanVideoVAE, load_wan_vae  # noqa: E402
from tests.model import wan_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vae() -> WanVideoVAE:
    return WanVideoVAE(wan_tiny.make_vae())


@pytest.mark.parametrize("splits", [[1, 2, 3, 4, 7], [3, 6, 7]])
def test_streaming_decode_equals_whole_decode(vae: WanVideoVAE, splits: list[int]) -> None:
    z = torch.randn(2, 4, 7, 4, 4)
    with torch.no_grad():
        whole = vae.vae.decode(z, return_dict=False)[0]  # diffusers' own decode
        state, parts, start = vae.init_decoder_state(2), [], 0
        for end in splits:
            video, state = vae.decode_chunk(z[:, :, start:end], state)
            parts.append(video)
            start = end
    streamed = torch.cat(parts, dim=2)
    assert whole.shape == streamed.shape == (2, 3, 1 + 4 * 6, 32, 32)
    # The same ops in the same order: equal up to nothing (tolerance stated for other BLAS builds).
    assert (whole - streamed).abs().max() <= 1e-6
    assert whole.std() > 0.01


def test_states_are_values(vae: WanVideoVAE) -> None:
    """A state stays valid after the call that consumed it: decoding from it twice gives the same frames."""
    z = torch.randn(1, 4, 6, 4, 4)
    with torch.no_grad():
        _, state = vae.decode_chunk(z[:, :, :3], vae.init_decoder_state(1))
        once, _ = vae.decode_chunk(z[:, :, 3:], state)
        twice, _ = vae.decode_chunk(z[:, :, 3:], state)
    assert torch.equal(once, twice) and once.shape[2] == 12 and not vae.batched_decode


def test_normalisation_and_frame_layout(vae: WanVideoVAE) -> None:
    z = torch.randn(1, 4, 2, 4, 4)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.8, 1.2, 2.0]).view(1, 4, 1, 1, 1)
    assert torch.allclose(vae.from_diffusion(z), z * std + mean)  # WanPipeline: z / (1 / std) + mean
    assert torch.allclose(vae.to_diffusion(vae.from_diffusion(z)), z, atol=1e-6)
    assert [vae.latent_frames_for(n) for n in (1, 2, 5, 6, 81)] == [1, 2, 2, 3, 21]
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert vae.encode_image(image).shape == (2, 4, 1, 4, 4)


def test_load_wan_vae_is_strict(tmp_path: Path) -> None:
    wan_tiny.make_vae().save_pretrained(str(tmp_path / "vae"))
    loaded = load_wan_vae(tmp_path / "vae")
    assert loaded.cfg.latent_channels == 4 and loaded.cfg.temporal_factor == 4 and loaded.cfg.spatial_factor == 8
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state.pop("decoder.conv_out.bias")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \['decoder.conv_out.bias'\]"):
        load_wan_vae(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "is_residual": True}))
    with pytest.raises(ValueError, match="Wan2.2 VAE"):
        load_wan_vae(tmp_path / "vae")
    with pytest.raises(ValueError, match="config.json: missing"):
        load_wan_vae(tmp_path / "nothing")
