"""The causal DiT: parity with diffusers, streaming == masked offline forward, bad input."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from streamgen.attention import get_backend
from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import CacheConfig, ModelConfig, get_preset
from streamgen.model.masks import block_causal_mask, frame_visibility
from streamgen.model.transformer import CausalWanTransformer

MakeModel = Callable[..., CausalWanTransformer]  # the tiny_model fixture (tests/conftest.py)

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) is needed for the parity test")

CONFIGS = {
    "test": get_preset("test").model,
    "wide": ModelConfig(num_layers=3, num_heads=3, head_dim=24, ffn_dim=96, latent_channels=6, text_dim=40,
                        text_max_tokens=7, freq_dim=64, cross_attn_norm=True),
    "no_cross_norm": ModelConfig(num_layers=2, num_heads=4, head_dim=12, ffn_dim=40, latent_channels=3,
                                 text_dim=20, text_max_tokens=5, freq_dim=16, cross_attn_norm=False),
}


def _random_diffusers(cfg: ModelConfig) -> torch.nn.Module:
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps,
    ).eval()
    with torch.no_grad():  # diffusers zero-inits nothing we rely on, but perturb so no term is trivially zero
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_uniform_timestep(name: str) -> None:
    cfg = CONFIGS[name]
    ref = _random_diffusers(cfg)
    ours = CausalWanTransformer(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, cfg.latent_channels, 3, 4, 6)
    t = torch.tensor([999.0, 125.5])
    text = torch.randn(2, cfg.text_max_tokens, cfg.text_dim)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, ours.encode_text(text))
    assert expected.abs().mean() > 0.1
    assert (expected - got).abs().max() <= 1e-4


def test_per_frame_timesteps_match_diffusers_per_token() -> None:
    cfg = CONFIGS["test"]
    ref = _random_diffusers(cfg)
    ours = CausalWanTransformer(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, cfg.latent_channels, 4, 4, 4)
    t = torch.tensor([[1000.0, 600.0, 30.0, 0.0]])
    text = torch.randn(1, cfg.text_max_tokens, cfg.text_dim)
    with torch.no_grad():  # diffusers' Wan2.2 path takes one timestep per token
        expected = ref(x, t.repeat_interleave(4, dim=1), text, return_dict=False)[0]
        got = ours(x, t, ours.encode_text(text))
    assert (expected - got).abs().max() <= 1e-4


def _chunked_vs_masked(tiny_model: MakeModel, cfg: ModelConfig, num_frames: int, chunk: int,
                       policy: CacheConfig) -> float:
    model = tiny_model(cfg, seed=1)
    batch, h, w = 2, 4, 4
    tokens_per_frame = (h // 2) * (w // 2)
    x = torch.randn(batch, cfg.latent_channels, num_frames, h, w)
    t = torch.rand(batch, num_frames) * 1000
    ctx = model.encode_text(torch.randn(batch, cfg.text_max_tokens, cfg.text_dim))
    mask = block_causal_mask(num_frames, tokens_per_frame, chunk, policy.window_frames, policy.sink_frames)
    cache = ContiguousKVCache(cfg.num_layers, tokens_per_frame, policy, get_backend("sdpa"))
    outs = []
    with torch.no_grad():
        reference = model(x, t, ctx, attn_mask=mask)
        for start in range(0, num_frames, chunk):
            n = min(chunk, num_frames - start)
            view = cache.view(start, n)
            outs.append(model(x[:, :, start:start + n], t[:, start:start + n], ctx, frame_offsets=start,
                              kv_cache=view))
            cache.commit(view)
    if policy.window_frames is not None:
        assert cache.num_cached_frames <= policy.window_frames
    return float((torch.cat(outs, dim=2) - reference).abs().max())


@pytest.mark.parametrize("num_frames,chunk", [(3, 3), (6, 3), (12, 3), (7, 3), (8, 2)])
def test_chunked_cache_equals_block_causal_mask(tiny_model: MakeModel, num_frames: int, chunk: int) -> None:
    assert _chunked_vs_masked(tiny_model, CONFIGS["test"], num_frames, chunk, CacheConfig()) <= 1e-4


@pytest.mark.parametrize("window,sink,chunk,num_frames", [(6, 0, 3, 30), (6, 3, 3, 60), (7, 2, 2, 41), (4, 1, 3, 25)])
def test_rolling_window_with_sinks_equals_window_mask(tiny_model: MakeModel, window: int, sink: int, chunk: int,
                                                     num_frames: int) -> None:
    policy = CacheConfig(window_frames=window, sink_frames=sink)
    assert _chunked_vs_masked(tiny_model, CONFIGS["test"], num_frames, chunk, policy) <= 1e-4


def test_window_mask_really_limits_attention(tiny_model: MakeModel) -> None:
    """Guard against a vacuous window: exact visibility, and a different output than no window."""
    vis = frame_visibility(12, 3, window_frames=6, sink_frames=3)
    assert vis[11].tolist() == [True] * 3 + [False] * 6 + [True] * 3
    assert vis[4].tolist() == [True] * 6 + [False] * 6
    cfg = CONFIGS["test"]
    model = tiny_model(cfg, seed=None)
    x = torch.randn(1, cfg.latent_channels, 12, 4, 4)
    ctx = model.encode_text(torch.randn(1, cfg.text_max_tokens, cfg.text_dim))
    with torch.no_grad():
        full = model(x, torch.full((1,), 500.0), ctx, attn_mask=block_causal_mask(12, 4, 3))
        windowed = model(x, torch.full((1,), 500.0), ctx, attn_mask=block_causal_mask(12, 4, 3, 6, 3))
    assert torch.equal(full[:, :, :6], windowed[:, :, :6])
    assert (full[:, :, 9:] - windowed[:, :, 9:]).abs().max() > 1e-3


def test_block_causal_is_causal(tiny_model: MakeModel) -> None:
    """Changing a later chunk never changes earlier chunks' outputs; it does change its own."""
    cfg = CONFIGS["test"]
    model = tiny_model(cfg, seed=None)
    x = torch.randn(1, cfg.latent_channels, 6, 4, 4)
    ctx = model.encode_text(torch.randn(1, cfg.text_max_tokens, cfg.text_dim))
    mask = block_causal_mask(6, 4, 3)
    y = x.clone()
    y[:, :, 4] += 1.0
    with torch.no_grad():
        a = model(x, torch.full((1,), 500.0), ctx, attn_mask=mask)
        b = model(y, torch.full((1,), 500.0), ctx, attn_mask=mask)
    assert torch.equal(a[:, :, :3], b[:, :, :3])
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-3


def test_rope_has_no_maximum_position(tiny_model: MakeModel) -> None:
    """Absolute frame positions far beyond any table still work and change the output."""
    cfg = CONFIGS["test"]
    model = tiny_model(cfg, seed=None)
    x = torch.randn(1, cfg.latent_channels, 3, 4, 4)
    ctx = model.encode_text(torch.randn(1, cfg.text_max_tokens, cfg.text_dim))
    policy = CacheConfig()
    outs = []
    for offset in (0, 1_000_000):
        cache = ContiguousKVCache(cfg.num_layers, 4, policy, get_backend("sdpa"))
        cache.next_frame = offset
        with torch.no_grad():
            outs.append(model(x, torch.full((1,), 400.0), ctx, frame_offsets=offset,
                              kv_cache=cache.view(offset, 3)))
    assert torch.isfinite(outs[1]).all()
    # Within one chunk attention depends only on relative positions: RoPE is a relative encoding.
    assert (outs[0] - outs[1]).abs().max() <= 1e-3


@pytest.mark.parametrize(
    "shape,timesteps,match",
    [
        ((1, 5, 3, 4, 4), (1,), "latents must be"),
        ((1, 4, 3, 4), (1,), "latents must be"),
        ((1, 4, 3, 3, 4), (1,), "not divisible by patch"),
        ((2, 4, 3, 4, 4), (3,), "timesteps"),
        ((1, 4, 3, 4, 4), (1, 2), "timesteps"),
    ],
)
def test_bad_shapes_raise(shape: tuple[int, ...], timesteps: tuple[int, ...], match: str) -> None:
    cfg = CONFIGS["test"]
    model = CausalWanTransformer(cfg)
    ctx = model.encode_text(torch.randn(shape[0], cfg.text_max_tokens, cfg.text_dim))
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape), torch.zeros(timesteps), ctx)


def test_bad_text_shape_raises() -> None:
    model = CausalWanTransformer(CONFIGS["test"])
    with pytest.raises(ValueError, match="text embeddings"):
        model.encode_text(torch.randn(1, 4, 7))


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="sdpa"):
        CausalWanTransformer(CONFIGS["test"], attention_backend="nope")


def test_config_is_frozen_and_validated() -> None:
    cfg = CONFIGS["test"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(cfg, head_dim=7)
