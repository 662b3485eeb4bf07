"""The causal video VAE: shapes, streaming == whole-video, exact causality, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from streamgen.config import Preset, VAEConfig, get_preset
from streamgen.model.vae import CausalVideoVAE, StreamState, level_widths

# Streaming runs the same ops on fewer frames; only the conv algorithm's summation order may differ.
STREAM_ATOL = 1e-5


def _randomise(vae: CausalVideoVAE, seed: int = 0) -> CausalVideoVAE:
    """Replace the special init (identity blocks, copy/mean temporal layers) by random weights, so
    every temporal tap and every piece of streaming state actually influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vae.eval()


@pytest.fixture(params=[(0, 0), (0, 1), (1, 1)], ids=["base_layout", "post_grow_block", "pre_pool_and_post_grow"])
def vae(test_preset: Preset, request: pytest.FixtureRequest) -> CausalVideoVAE:
    """Every layout (pre-pool encoder blocks, post-grow decoder blocks): the streaming, causality and batching
    guarantees hold for each."""
    pre, post = request.param
    return _randomise(CausalVideoVAE(dataclasses.replace(test_preset.vae, pre_pool_blocks=pre, post_grow_blocks=post)))


def _latents(preset: Preset, batch_size: int, num_frames: int) -> torch.Tensor:
    return torch.randn(batch_size, preset.vae.latent_channels, num_frames, preset.latent_height, preset.latent_width)


def _video(preset: Preset, batch_size: int, num_frames: int) -> torch.Tensor:
    return torch.rand(batch_size, 3, num_frames, preset.video.height, preset.video.width) * 2 - 1


def _decode_in_chunks(vae: CausalVideoVAE, latents: torch.Tensor, sizes: list[int], sized: bool = True) -> torch.Tensor:
    b, _, _, h, w = latents.shape
    state = vae.init_decoder_state(b, h, w) if sized else vae.init_decoder_state(b)
    outs = []
    for chunk in latents.split(sizes, dim=2):
        out, state = vae.decode_chunk(chunk, state)
        outs.append(out)
    return torch.cat(outs, dim=2)


def test_level_widths_from_config() -> None:
    assert level_widths(get_preset("default").vae) == (16, 32, 64, 128)
    assert level_widths(get_preset("test").vae) == (2, 4, 8, 16)
    assert level_widths(VAEConfig(latent_channels=4, base_channels=8, spatial_factor=1)) == (16,)


def test_shapes(vae: CausalVideoVAE, test_preset: Preset) -> None:
    cfg = test_preset.vae
    video = _video(test_preset, 2, 8)
    with torch.no_grad():
        latents = vae.encode(video)
        assert latents.shape == (2, cfg.latent_channels, 2, test_preset.latent_height, test_preset.latent_width)
        assert vae.decode(latents).shape == video.shape
        assert vae(video).shape == video.shape
        image = video[:, :, 0]
        assert vae.encode_image(image).shape == (2, cfg.latent_channels, 1, *latents.shape[-2:])


@pytest.mark.parametrize("spatial_factor,temporal_factor", [(4, 2), (2, 4), (1, 1)])
def test_other_factors_round_trip_shapes(spatial_factor: int, temporal_factor: int) -> None:
    cfg = VAEConfig(latent_channels=3, base_channels=4, spatial_factor=spatial_factor,
                    temporal_factor=temporal_factor, temporal_kernel=2, num_res_blocks=2)
    vae = _randomise(CausalVideoVAE(cfg))
    video = torch.rand(1, 3, 2 * temporal_factor, 8, 8)
    with torch.no_grad():
        latents = vae.encode(video)
        assert latents.shape == (1, 3, 2, 8 // spatial_factor, 8 // spatial_factor)
        assert vae.decode(latents).shape == video.shape
        assert torch.allclose(_decode_in_chunks(vae, latents, [1, 1]), vae.decode(latents), atol=STREAM_ATOL)


@pytest.mark.parametrize("sizes,sized", [([1, 1, 1, 1, 1], True), ([2, 3], True), ([3, 1, 1], False),
                                         ([1, 4], False), ([5], True)])
def test_streaming_decode_equals_whole_decode(vae: CausalVideoVAE, test_preset: Preset, sizes: list[int],
                                              sized: bool, device: torch.device) -> None:
    vae = vae.to(device)
    latents = _latents(test_preset, 2, 5).to(device)
    with torch.no_grad():
        whole = vae.decode(latents)
        streamed = _decode_in_chunks(vae, latents, sizes, sized)
    assert whole.abs().mean() > 1e-2  # the randomised decoder produces a non-trivial signal
    torch.testing.assert_close(streamed, whole, atol=STREAM_ATOL, rtol=0)


def test_streaming_state_matters(vae: CausalVideoVAE, test_preset: Preset) -> None:
    latents = _latents(test_preset, 1, 3)
    with torch.no_grad():
        whole = vae.decode(latents)
        fresh = vae.decode(latents[:, :, 2:])  # the last frame without its past
    assert (whole[:, :, 8:] - fresh).abs().max() > 1e-3


def test_streaming_encode_equals_whole_encode(vae: CausalVideoVAE, test_preset: Preset) -> None:
    video = _video(test_preset, 2, 16)
    with torch.no_grad():
        whole = vae.encode(video)
        state = vae.init_encoder_state(2, test_preset.video.height, test_preset.video.width)
        parts = []
        for chunk in video.split([4, 8, 4], dim=2):
            latents, state = vae.encode_chunk(chunk, state)
            parts.append(latents)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=STREAM_ATOL, rtol=0)


def test_decoder_is_causal_exactly(vae: CausalVideoVAE, test_preset: Preset) -> None:
    tf = test_preset.vae.temporal_factor
    latents = _latents(test_preset, 1, 4)
    changed = latents.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = vae.decode(latents), vae.decode(changed)
    assert torch.equal(a[:, :, : 2 * tf], b[:, :, : 2 * tf])
    assert not torch.equal(a[:, :, 2 * tf:], b[:, :, 2 * tf:])


def test_encoder_is_causal_exactly(vae: CausalVideoVAE, test_preset: Preset) -> None:
    video = _video(test_preset, 1, 12)
    changed = video.clone()
    changed[:, :, 9] = -changed[:, :, 9]  # a pixel frame of latent frame 2
    with torch.no_grad():
        a, b = vae.encode(video), vae.encode(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.equal(a[:, :, 2], b[:, :, 2])


def test_batched_states_concat_and_split(vae: CausalVideoVAE, test_preset: Preset) -> None:
    h, w = test_preset.latent_height, test_preset.latent_width
    first, second = _latents(test_preset, 1, 3), _latents(test_preset, 2, 3)
    with torch.no_grad():
        _, s1 = vae.decode_chunk(first[:, :, :2], vae.init_decoder_state(1, h, w))
        s2 = vae.init_decoder_state(2, h, w)  # a stream that starts now
        out, state = vae.decode_chunk(torch.cat([first[:, :, 2:], second[:, :, :1]]), StreamState.concat([s1, s2]))
        assert [s.batch_size for s in state.split([1, 2])] == [1, 2]
        with pytest.raises(ValueError, match="sized states"):
            StreamState.concat([s1, vae.init_decoder_state(1)])
        torch.testing.assert_close(out[:1], vae.decode(first)[:, :, 8:], atol=STREAM_ATOL, rtol=0)
        torch.testing.assert_close(out[1:], vae.decode(second[:, :, :1]), atol=STREAM_ATOL, rtol=0)


def test_encode_image_is_a_static_first_latent_frame(vae: CausalVideoVAE, test_preset: Preset) -> None:
    image = _video(test_preset, 2, 1)[:, :, 0]
    video = image[:, :, None].repeat(1, 1, test_preset.vae.temporal_factor, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_image(image), vae.encode(video), atol=0, rtol=0)


@pytest.mark.parametrize("blocks", [0, 2])
def test_fresh_init_decodes_each_latent_frame_to_identical_frames(test_preset: Preset, blocks: int) -> None:
    vae = CausalVideoVAE(dataclasses.replace(test_preset.vae, pre_pool_blocks=blocks, post_grow_blocks=blocks)).eval()
    tf = test_preset.vae.temporal_factor
    with torch.no_grad():
        video = vae.decode(_latents(test_preset, 1, 2))  # [1, 3, 2 * tf, H, W]
    for i in range(2):
        group = video[:, :, i * tf:(i + 1) * tf]
        assert torch.allclose(group, group[:, :, :1].expand_as(group), atol=1e-6)


def test_gradients_reach_every_parameter(test_preset: Preset) -> None:
    vae = _randomise(CausalVideoVAE(test_preset.vae)).train()
    vae(_video(test_preset, 1, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())


def test_bad_shapes_raise(vae: CausalVideoVAE, test_preset: Preset) -> None:
    h, w = test_preset.video.height, test_preset.video.width
    lh, lw = test_preset.latent_height, test_preset.latent_width
    bad_videos = {
        "multiple of temporal_factor": torch.zeros(1, 3, 6, h, w),
        r"3 \(RGB\) channels": torch.zeros(1, 4, 8, h, w),
        "divisible by spatial_factor": torch.zeros(1, 3, 8, h - 4, w),
        r"\[B, 3, N, H, W\]": torch.zeros(3, 8, h, w),
        "floating-point": torch.zeros(1, 3, 8, h, w, dtype=torch.uint8),
    }
    for match, video in bad_videos.items():
        with pytest.raises(ValueError, match=match):
            vae.encode(video)
    with pytest.raises(ValueError, match="latent_channels"):
        vae.decode(torch.zeros(1, test_preset.vae.latent_channels + 1, 2, lh, lw))
    with pytest.raises(ValueError, match=r"\[B, C, n, h, w\]"):
        vae.decode(torch.zeros(1, test_preset.vae.latent_channels, lh, lw))
    with pytest.raises(ValueError, match="RGB"):
        vae.encode_image(torch.zeros(1, 4, h, w))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode_image(torch.zeros(1, 3, 1, h, w))
    with pytest.raises(ValueError, match="spatial_factor"):
        vae.encode_image(torch.zeros(1, 3, h + 1, w))
    with pytest.raises(ValueError, match="state holds 1 streams"):
        vae.decode_chunk(torch.zeros(2, test_preset.vae.latent_channels, 1, lh, lw), vae.init_decoder_state(1))
    with pytest.raises(ValueError, match="frame size differs"):
        vae.decode_chunk(torch.zeros(1, test_preset.vae.latent_channels, 1, lh, lw),
                         vae.init_decoder_state(1, lh * 2, lw))


def test_config_rejects_negative_res_blocks() -> None:
    with pytest.raises(ValueError, match="num_res_blocks"):
        dataclasses.replace(get_preset("test").vae, num_res_blocks=-1)
    with pytest.raises(ValueError, match="post_grow_blocks must be >= 0"):
        dataclasses.replace(get_preset("test").vae, post_grow_blocks=-1)
    with pytest.raises(ValueError, match="needs temporal_factor > 1"):
        dataclasses.replace(get_preset("test").vae, temporal_factor=1, post_grow_blocks=1)
    with pytest.raises(ValueError, match="pre_pool_blocks must be >= 0"):
        dataclasses.replace(get_preset("test").vae, pre_pool_blocks=-1)
    with pytest.raises(ValueError, match="encoder has no TemporalPool"):
        dataclasses.replace(get_preset("test").vae, temporal_factor=1, pre_pool_blocks=1)
    # A checkpoint's layout counts are its own; every other field stays the preset's.
    base = get_preset("test").vae
    grown = dataclasses.replace(base, post_grow_blocks=2, pre_pool_blocks=1, base_channels=16)
    assert base.with_layout_of(grown) == dataclasses.replace(base, post_grow_blocks=2, pre_pool_blocks=1)


def test_post_grow_blocks_run_at_the_full_frame_rate(test_preset: Preset) -> None:
    """The post-grow block sits between the two frames the last grow splits: with a temporal conv that adds the
    previous pixel frame, the second frame of a pair changes while the old layout keeps pairs tied to one
    feature frame (a per-pixel linear split)."""
    cfg = dataclasses.replace(test_preset.vae, post_grow_blocks=1)
    vae = _randomise(CausalVideoVAE(cfg))
    (block,) = vae.dec_stages[-1].post_blocks
    assert vae._dec_temporal[-1] is block.temporal
    assert len(vae._dec_temporal) == len(CausalVideoVAE(test_preset.vae)._dec_temporal) + 1
    latents = _latents(test_preset, 1, 2)
    with torch.no_grad():
        before = vae.decode(latents)
        c = block.temporal.channels
        block.temporal.linear.weight[:, -2 * c:-c] += torch.eye(c)  # + the previous pixel frame's features
        after = vae.decode(latents)
    assert torch.equal(after[:, :, 0], before[:, :, 0])  # frame 0 has no previous frame (zero padding)
    assert not torch.allclose(after[:, :, 1], before[:, :, 1], atol=1e-4)


def test_pre_pool_blocks_see_each_frame_before_the_pool(test_preset: Preset) -> None:
    """The pre-pool block runs on full-rate frames: its temporal conv's previous-frame tap changes the latent of
    the first latent frame (frames 1-3 have a previous frame inside the group). Its stream state is covered by
    the streaming tests, which run on this layout too."""
    vae = _randomise(CausalVideoVAE(dataclasses.replace(test_preset.vae, pre_pool_blocks=1)))
    (block,) = vae.enc_stages[0].pre_blocks
    assert vae._enc_temporal[0] is block.temporal
    video = _video(test_preset, 1, 8)
    with torch.no_grad():
        before = vae.encode(video)
        c = block.temporal.channels
        block.temporal.linear.weight[:, -2 * c:-c] += torch.eye(c)
        after = vae.encode(video)
    assert not torch.allclose(after[:, :, 0], before[:, :, 0], atol=1e-4)
