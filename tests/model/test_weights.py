"""Checkpoint save/load, diffusers and Wan-original loading: strict, never partial."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from streamgen.config import get_preset
from streamgen.model import weights
from streamgen.model.transformer import CausalWanTransformer

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) is needed to build reference models")

CFG = get_preset("test").model
MakeModel = Callable[..., CausalWanTransformer]  # the tiny_model fixture (tests/conftest.py)


def _diffusers_model() -> torch.nn.Module:
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=CFG.num_heads, attention_head_dim=CFG.head_dim,
        in_channels=CFG.latent_channels, out_channels=CFG.latent_channels, text_dim=CFG.text_dim,
        freq_dim=CFG.freq_dim, ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _compare(ref: torch.nn.Module, ours: torch.nn.Module) -> float:
    x = torch.randn(1, CFG.latent_channels, 2, 4, 4)
    t = torch.tensor([321.0])
    text = torch.randn(1, 16, CFG.text_dim)
    with torch.no_grad():
        return float((ref(x, t, text, return_dict=False)[0] - ours(x, t, ours.encode_text(text))).abs().max())


def test_from_diffusers_object_and_directory(tmp_path: Path) -> None:
    ref = _diffusers_model()
    assert _compare(ref, weights.from_diffusers(ref, text_max_tokens=16)) <= 1e-4
    ref.save_pretrained(tmp_path / "wan")
    loaded = weights.from_diffusers(tmp_path / "wan", text_max_tokens=16)
    assert loaded.cfg == CFG
    assert _compare(ref, loaded) <= 1e-4


def test_from_diffusers_missing_and_extra_keys(tmp_path: Path) -> None:
    ref = _diffusers_model()
    ref.save_pretrained(tmp_path / "wan")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "wan" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state.pop("blocks.1.attn2.to_v.bias")
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn2.to_v.bias'\]"):
        weights.from_diffusers(tmp_path / "wan")
    state["blocks.1.attn2.to_v.bias"] = torch.zeros(CFG.dim)
    state["blocks.9.attn1.to_q.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.9.attn1.to_q.weight'\]"):
        weights.from_diffusers(tmp_path / "wan")


def test_from_diffusers_rejects_i2v_config() -> None:
    with pytest.raises(ValueError, match="image-conditioned"):
        weights.config_from_diffusers({"image_dim": 1280, "in_channels": 16})


def test_checkpoint_round_trip_and_config_check(tmp_path: Path, tiny_model: MakeModel) -> None:
    model = tiny_model(CFG, seed=None, scale=1.0)
    path = tmp_path / "m.safetensors"
    weights.save_checkpoint(model, path, "transformer", CFG)
    loaded = weights.load_transformer(path, expected=CFG)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    other = dataclasses.replace(CFG, ffn_dim=128)
    with pytest.raises(ValueError, match=r"ffn_dim: file 64 vs expected 128"):
        weights.load_transformer(path, expected=other)
    assert not list(tmp_path.glob(".*tmp")), "atomic save left a temporary file"
    assert path.stat().st_mode & 0o777 == 0o644  # readable by another user (a container's non-root server)


def test_checkpoint_corrupt_or_wrong_kind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        weights.load_transformer(bad)
    with pytest.raises(ValueError, match="does not exist"):
        weights.load_transformer(tmp_path / "nope.safetensors")
    path = tmp_path / "vae.safetensors"
    weights.save_checkpoint(torch.nn.Linear(2, 2), path, "vae", CFG)
    with pytest.raises(ValueError, match="holds a 'vae'"):
        weights.load_transformer(path)


def test_wan_original_key_map_round_trip(tiny_model: MakeModel) -> None:
    model = tiny_model(CFG, seed=None, scale=1.0)
    inverse = [
        (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
        (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
        (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
        (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
        (r"condition_embedder\.time_proj\.", "time_projection.1."),
        (r"attn1\.to_out\.0\.", "self_attn.o."), (r"attn2\.to_out\.0\.", "cross_attn.o."),
        (r"attn1\.to_(q|k|v)\.", r"self_attn.\1."), (r"attn2\.to_(q|k|v)\.", r"cross_attn.\1."),
        (r"attn1\.norm_", "self_attn.norm_"), (r"attn2\.norm_", "cross_attn.norm_"),
        (r"\.norm2\.", ".norm3."), (r"ffn\.net\.0\.proj\.", "ffn.0."), (r"ffn\.net\.2\.", "ffn.2."),
        (r"^(blocks\.\d+)\.scale_shift_table", r"\1.modulation"), (r"^proj_out\.", "head.head."),
        (r"^scale_shift_table$", "head.modulation"),
    ]
    wan_state = {}
    for key, value in model.state_dict().items():
        name = key
        for pattern, repl in inverse:
            name = re.sub(pattern, repl, name)
        wan_state["model." + name] = value
    assert "blocks.0.self_attn.q.weight" in {k.removeprefix("model.") for k in wan_state}
    converted = weights.convert_wan_original(wan_state)
    fresh = CausalWanTransformer(CFG)
    weights.load_state_strict(fresh, converted)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="unrecognised Wan checkpoint key"):
        weights.convert_wan_original({"blocks.0.mystery.weight": torch.zeros(1)})


def test_load_vae_applies_latent_stats_from_metadata(tmp_path: Path) -> None:
    import json

    from streamgen.model.vae import CausalVideoVAE

    vae_cfg = get_preset("test").vae
    c = vae_cfg.latent_channels
    mean, std = [0.1 * i for i in range(c)], [1.0 + 0.5 * i for i in range(c)]
    path = tmp_path / "vae.safetensors"
    weights.save_checkpoint(CausalVideoVAE(vae_cfg), path, kind="vae", config=vae_cfg,
                            extra_metadata={"latent_mean": json.dumps(mean), "latent_std": json.dumps(std)})
    vae = weights.load_vae(path)
    assert vae.latent_mean.tolist() == pytest.approx(mean) and vae.latent_std.tolist() == pytest.approx(std)
    z = torch.randn(1, c, 2, 4, 4)
    expected = (z - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert torch.allclose(vae.to_diffusion(z), expected, atol=1e-6)
    assert torch.allclose(vae.from_diffusion(vae.to_diffusion(z)), z, atol=1e-5)
    assert "latent_mean" not in vae.state_dict()  # stats travel as metadata, not weights

    bad = tmp_path / "bad.safetensors"
    weights.save_checkpoint(CausalVideoVAE(vae_cfg), bad, kind="vae", config=vae_cfg,
                            extra_metadata={"latent_mean": json.dumps(mean), "latent_std": json.dumps([0.0] * c)})
    with pytest.raises(ValueError, match="invalid latent_mean/latent_std"):
        weights.load_vae(bad)
