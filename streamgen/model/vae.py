"""Causal video autoencoder (TAEHV-style) with a streaming encoder and decoder.

Maps video ``[B, 3, N, H, W]`` in [-1, 1] to latents ``[B, C, N / tf, H / sf, W / sf]``
(``tf`` = ``temporal_factor`` pixel frames per latent frame, ``sf`` = ``spatial_factor``)
and back. Spatial work is 2-D convs over frames folded into the batch; temporal work is
causal: ``k``-tap temporal convs that see only the current and earlier frames, plus
frame pooling/growing inside one latent frame's group of ``tf`` pixel frames. Hence
pixel frames ``tf*i .. tf*i + tf - 1`` decode from latent frames ``<= i`` only, and
decoding chunk by chunk with a carried :class:`StreamState` equals decoding the whole
video (the whole-video path *is* one chunk with a fresh state).

Design choices (and why):

* **Light, TAEHV-like, not Wan's VAE.** Decoding must never be the bottleneck of a
  real-time stream on a CPU. Widths halve per 2x upsampling towards full resolution
  (:func:`level_widths`), so every 3x3 conv costs about the same; upsampling is sub-pixel
  (ESPCN) and the decoder's RGB head works from half resolution, so no decoder conv runs
  on full-resolution frames. The temporal conv is factorised: ``(k, 1, 1)`` in time, 3x3
  in space. Default preset: 1.4 M parameters, 4.0 GFLOP to decode 3 latent frames.
* **Work after the last time grow** (``VAEConfig.post_grow_blocks``, default 0). A
  :class:`TemporalGrow` splits each feature frame into two frames by a per-pixel linear map; in the
  default layout only the RGB head follows the last one, so each pair of pixel frames comes from one
  feature frame and motion arrives in steps at the latent rate (docs/quality.md, "How the clips move").
  Post-grow blocks are residual blocks at the full frame rate between that grow and the head. They are
  decoder-only: the encoder, the latent space and the state layout of a 0-block VAE are unchanged, and a
  new block starts as the identity, so it can be added to a trained VAE and fine-tuned (trainer.vae).
* **Work before the first time pool** (``VAEConfig.pre_pool_blocks``, default 0): the mirror image on
  the encoder side, residual blocks at the full frame rate before its first :class:`TemporalPool`. It
  changes the encoder, so a VAE with it has a latent space of its own.
* **Streaming.** ``decode_chunk`` takes any number of latent frames; ``encode_chunk`` any
  multiple of ``tf`` pixel frames (pooling never straddles a latent frame's group).
* **Zero left-padding at the start of a stream.** A fresh state is all zeros, so states
  of sessions that started at different times have the same shapes and can be batched
  (:meth:`StreamState.concat` / :meth:`StreamState.split`).
* **Deterministic encoder.** ``encode`` returns one latent per input (no KL head); the
  trainer regularises and normalises latents itself.
* **Still images** are encoded as a static clip of ``tf`` identical frames at the start of
  a stream (:meth:`CausalVideoVAE.encode_image`), i.e. exactly like the first latent frame
  of a video that does not move, so the generator sees a familiar first frame.

This module is pure math: tensors in, tensors out. It must never do I/O, read files,
choose devices or dtypes behind the caller's back, or know about sessions and scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.config import VAEConfig

__all__ = ["CausalVideoVAE", "StreamState", "level_widths"]


def level_widths(cfg: VAEConfig) -> tuple[int, ...]:
    """Channel width at each resolution level; index 0 is full resolution, the last is latent resolution.

    The latent level is ``2 * base_channels`` wide and every 2x step up in resolution halves
    the width (never below 1). A 3x3 conv then costs the same number of FLOPs per pixel
    frame at every level, and the full-resolution convs, which run on the most pixels and
    the most frames, are the narrowest. Default preset (base 64, sf 8): ``(16, 32, 64, 128)``.
    """
    num_levels = int(math.log2(cfg.spatial_factor))
    return tuple(max(1, (2 * cfg.base_channels) >> (num_levels - level)) for level in range(num_levels + 1))


@dataclass(frozen=True)
class StreamState:
    """Memory of ``batch_size`` streams: the last ``k - 1`` input frames of every causal temporal conv.

    ``past_frames[i]`` is ``[B, k - 1, H_i, W_i, C_i]`` for the i-th causal temporal conv in
    module order (channels last, like the activations). ``None`` means a fresh stream whose
    frame size is not known yet: its all-zero tensors are made from the first chunk.
    Frozen: ``encode_chunk`` / ``decode_chunk`` return a new state.
    """

    batch_size: int
    past_frames: tuple[torch.Tensor, ...] | None = None

    @staticmethod
    def concat(states: list[StreamState]) -> StreamState:
        """Stack several streams along the batch dimension (same model and frame size), e.g. to
        decode sessions that started at different times in one batch."""
        if not states:
            raise ValueError("StreamState.concat needs at least one state")
        frames = [s.past_frames for s in states if s.past_frames is not None]
        if len(frames) != len(states):
            raise ValueError("StreamState.concat needs sized states: give the frame size to init_*_state")
        per_layer = zip(*frames, strict=True)  # per layer: a tuple of [B_i, ...] tensors
        return StreamState(sum(s.batch_size for s in states), tuple(torch.cat(parts, dim=0) for parts in per_layer))

    def split(self, sizes: list[int]) -> list[StreamState]:
        """Inverse of :meth:`concat`: split the batch into states of ``sizes`` rows each."""
        if sum(sizes) != self.batch_size or any(n <= 0 for n in sizes):
            raise ValueError(f"split sizes {sizes} must be positive and add up to batch size {self.batch_size}")
        if self.past_frames is None:
            return [StreamState(n) for n in sizes]
        per_layer = [p.split(sizes, dim=0) for p in self.past_frames]
        return [StreamState(n, tuple(parts[i] for parts in per_layer)) for i, n in enumerate(sizes)]


def _to_frames(video: torch.Tensor) -> torch.Tensor:
    """``[B, C, N, H, W]`` -> ``[B * N, C, H, W]`` in channels-last memory (fast CPU convs)."""
    b, c, n, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w)  # [B*N, C, H, W]
    return frames.contiguous(memory_format=torch.channels_last)


def _from_frames(frames: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[B * N, C, H, W]`` -> contiguous ``[B, C, N, H, W]``."""
    bn, c, h, w = frames.shape
    return frames.reshape(batch_size, bn // batch_size, c, h, w).permute(0, 2, 1, 3, 4).contiguous()  # [B, C, N, H, W]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


class CausalTemporalConv(nn.Module):
    """``k``-tap causal conv along time, 1x1 in space: ``y[t] = b + sum_j W_j x[t - k + 1 + j]``.

    Frames before the stream start are zeros; ``past`` holds the last ``k - 1`` input frames as
    ``[B, k - 1, H, W, C]`` (channels-last order, like the activations). Implemented as one
    linear map over the ``k`` frames stacked along channels (block ``j`` = frame ``t - k + 1 + j``).
    All 1x1 maps here are ``nn.Linear`` on the channels-last view, one GEMM without a copy: on CPU a
    1x1 ``Conv2d`` takes a slow im2col path and ``Conv3d`` (fp32) another.
    ``level`` is the resolution level it runs at (``H_pixels / 2**level``), used to size states.
    """

    def __init__(self, channels: int, kernel_size: int, level: int) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.level = level
        self.linear = nn.Linear(kernel_size * channels, channels)

    def state_shape(self, batch_size: int, pixel_height: int, pixel_width: int) -> tuple[int, ...]:
        return (batch_size, self.kernel_size - 1, pixel_height >> self.level, pixel_width >> self.level,
                self.channels)

    def forward(self, x: torch.Tensor, past: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        bn, c, h, w = x.shape
        n, k = bn // batch_size, self.kernel_size
        frames = x.permute(0, 2, 3, 1).reshape(batch_size, n, h, w, c)  # [B, N, H, W, C] (a view if channels-last)
        padded = torch.cat([past.to(x.dtype), frames], dim=1)  # [B, k - 1 + N, H, W, C]
        stacked = torch.cat([padded[:, j:j + n] for j in range(k)], dim=-1) if k > 1 else frames  # [B, N, H, W, k*C]
        y = self.linear(stacked).reshape(bn, h, w, c)  # [B*N, H, W, C]
        return y.permute(0, 3, 1, 2), padded[:, n:].clone()  # [B*N, C, H, W] channels-last; past [B, k-1, H, W, C]


class ResBlock(nn.Module):
    """``x + conv(relu(conv(relu(temporal(x)))))``: causal time mixing, then two 3x3 spatial convs."""

    def __init__(self, channels: int, temporal_kernel: int, level: int) -> None:
        super().__init__()
        self.temporal = CausalTemporalConv(channels, temporal_kernel, level)
        self.conv1 = _conv3x3(channels, channels)
        self.conv2 = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, past: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, new_past = self.temporal(x, past, batch_size)
        h = self.conv2(F.relu(self.conv1(F.relu(h))))
        return x + h, new_past


class TemporalPool(nn.Module):
    """Halve the frame rate causally: concat each pair of frames along channels, linear map back to C.

    Output frame ``i`` depends on input frames ``2i`` and ``2i + 1`` only (one latent group).
    """

    factor = 2

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(self.factor * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c, h, w = x.shape
        f = self.factor
        x = x.permute(0, 2, 3, 1).reshape(bn // f, f, h, w, c)  # [B*N/f, f, H, W, C]
        x = x.permute(0, 2, 3, 1, 4).reshape(bn // f, h, w, f * c)  # [B*N/f, H, W, f*C]
        return self.linear(x).permute(0, 3, 1, 2)  # [B*N/f, C, H, W] channels-last


class TemporalGrow(nn.Module):
    """Double the frame rate: a linear map to ``2C`` channels, split into two consecutive frames.

    Both output frames depend on their input frame only, so causality is preserved.
    """

    factor = 2

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, self.factor * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c, h, w = x.shape
        f = self.factor
        y = self.linear(x.permute(0, 2, 3, 1))  # [B*N, H, W, f*C]
        y = y.reshape(bn, h, w, f, c).permute(0, 3, 1, 2, 4).reshape(bn * f, h, w, c)  # [B*N*f, H, W, C]
        return y.permute(0, 3, 1, 2)  # [B*N*f, C, H, W] channels-last


class UpConv(nn.Module):
    """3x3 conv, then 2x sub-pixel upsampling if ``up`` (ESPCN): ``[M, C_in, H, W] -> [M, C_out, 2H, 2W]``.

    The same FLOPs as nearest upsampling followed by a conv at the high resolution, but the conv
    reads the 4x smaller low-resolution tensor and no upsampled copy is ever made.
    """

    def __init__(self, c_in: int, c_out: int, up: bool) -> None:
        super().__init__()
        self.factor = 2 if up else 1
        self.conv = _conv3x3(c_in, c_out * self.factor**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), self.factor)  # [M, C_out, H * factor, W * factor]


class EncoderStage(nn.Module):
    """Residual blocks at the input frame rate (``pre_blocks``, the first stage only:
    :attr:`VAEConfig.pre_pool_blocks`), optional time pooling, optional stride-2 downsampling conv, then
    residual blocks."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, level_in: int, level_out: int, pool_time: bool,
                 down: bool, first: bool) -> None:
        super().__init__()
        # Registered first: the encoder's temporal convs (and so its stream state) are listed in this order.
        num_pre = cfg.pre_pool_blocks if first else 0
        self.pre_blocks = nn.ModuleList(ResBlock(c_in, cfg.temporal_kernel, level_in) for _ in range(num_pre))
        self.pool = TemporalPool(c_in) if pool_time else None
        self.conv = _conv3x3(c_in, c_out, stride=2 if down else 1)
        self.blocks = nn.ModuleList(ResBlock(c_out, cfg.temporal_kernel, level_out) for _ in range(cfg.num_res_blocks))


class DecoderStage(nn.Module):
    """Residual blocks, optional time growing, residual blocks at the grown frame rate (``post_blocks``, the
    last stage only: :attr:`VAEConfig.post_grow_blocks`), then (except in the last stage) an :class:`UpConv`."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, level_in: int, grow_time: bool, up: bool,
                 last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in, cfg.temporal_kernel, level_in) for _ in range(cfg.num_res_blocks))
        self.grow = TemporalGrow(c_in) if grow_time else None
        # Registered after ``blocks``: the decoder's temporal convs (and so its stream state) are listed in this order.
        num_post = cfg.post_grow_blocks if last else 0
        self.post_blocks = nn.ModuleList(ResBlock(c_in, cfg.temporal_kernel, level_in) for _ in range(num_post))
        self.up = None if last else UpConv(c_in, c_out, up)


class CausalVideoVAE(nn.Module):
    """Causal video autoencoder; see the module docstring for the layout and guarantees.

    Stages: ``S = max(log2 sf, log2 tf)``. The encoder halves time in its first ``log2 tf``
    stages and space in its first ``log2 sf``; the decoder mirrors it (space doubles in
    its last ``log2 sf`` stages, time in its last ``log2 tf``), as in TAEHV. The decoder's
    last upsampling is its RGB head, a sub-pixel conv from half resolution: no conv ever
    runs on the full-resolution, full-frame-rate tensor, which would cost more than the
    rest of the decoder together.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.widths = level_widths(cfg)
        num_space = int(math.log2(cfg.spatial_factor))
        num_time = int(math.log2(cfg.temporal_factor))
        num_stages = max(num_space, num_time)

        self.enc_in = _conv3x3(3, self.widths[0])
        enc_stages = []
        level = 0
        for i in range(num_stages):
            down = i < num_space
            enc_stages.append(EncoderStage(cfg, self.widths[level], self.widths[level + down], level, level + down,
                                           pool_time=i < num_time, down=down, first=i == 0))
            level += down
        self.enc_stages = nn.ModuleList(enc_stages)
        self.enc_out = _conv3x3(self.widths[-1], cfg.latent_channels)

        self.dec_in = _conv3x3(cfg.latent_channels, self.widths[-1])
        dec_stages = []
        level = num_space
        for i in range(num_stages):
            up = i >= num_stages - num_space
            dec_stages.append(DecoderStage(cfg, self.widths[level], self.widths[level - up], level,
                                           grow_time=i >= num_stages - num_time, up=up, last=i == num_stages - 1))
            level -= up
        self.dec_stages = nn.ModuleList(dec_stages)
        head_level = min(num_space, 1)  # the last stage's level: 1, or 0 without spatial downsampling
        self.dec_out = UpConv(self.widths[head_level], 3, up=num_space > 0)

        self._enc_temporal = [m for m in self.enc_stages.modules() if isinstance(m, CausalTemporalConv)]
        self._dec_temporal = [m for m in self.dec_stages.modules() if isinstance(m, CausalTemporalConv)]
        # The diffusion models work on per-channel normalised latents ``(z - mean) / std``; the stats
        # are measured by the VAE trainer and stored in the checkpoint's metadata (set by
        # ``weights.load_vae``). Non-persistent: the state dict holds only learned weights.
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels), persistent=False)
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels), persistent=False)
        self._init_weights()

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's weights (what defines the latent space); the rest of the parameters are the decoder's."""
        return [p for m in (self.enc_in, self.enc_stages, self.enc_out) for p in m.parameters()]

    def set_latent_stats(self, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]) -> None:
        """Set the per-channel diffusion-space normalisation (one value per latent channel, std > 0)."""
        c = self.cfg.latent_channels
        if len(mean) != c or len(std) != c:
            raise ValueError(f"latent stats need {c} values each, got {len(mean)} mean / {len(std)} std")
        if any(not s > 0 for s in std):
            raise ValueError(f"latent std must be > 0, got {list(std)}")
        self.latent_mean.copy_(torch.tensor(mean, dtype=torch.float32))
        self.latent_std.copy_(torch.tensor(std, dtype=torch.float32))

    # Streams at any point decode together: their states stack along the batch (StreamState.concat).
    batched_decode = True

    def latent_frames_for(self, num_pixel_frames: int) -> int:
        """Latent frames whose decode holds ``num_pixel_frames`` frames (``temporal_factor`` each)."""
        if num_pixel_frames <= 0:
            raise ValueError(f"num_pixel_frames must be > 0, got {num_pixel_frames}")
        return math.ceil(num_pixel_frames / self.cfg.temporal_factor)

    def to_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, n, h, w]`` -> the diffusion models' normalised space."""
        mean, std = self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)
        return ((latents.float() - mean) / std).to(latents.dtype)

    def from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents ``[B, C, n, h, w]`` -> VAE latents for :meth:`decode`."""
        mean, std = self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)
        return (z.float() * std + mean).to(z.dtype)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, ResBlock):
                # Residual branches end in a zero conv: every block starts as the identity, so the
                # stack trains stably from step one (Fixup / DiT adaLN-zero idea).
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, CausalTemporalConv):
                # Temporal convs start as "copy the current frame" (the last channel block): no mixing
                # across time until the data asks for it, and the zero padding of a stream start is inert.
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
                with torch.no_grad():
                    m.linear.weight[:, -m.channels:].copy_(torch.eye(m.channels))
            elif isinstance(m, TemporalPool):
                # Frame pooling starts as the mean of the pooled frames (channel block j = frame j).
                nn.init.zeros_(m.linear.bias)
                with torch.no_grad():
                    m.linear.weight.copy_(torch.eye(m.linear.out_features).repeat(1, m.factor) / m.factor)
            elif isinstance(m, TemporalGrow):
                # Frame growing starts as a copy into every sub-frame: a static clip round-trips from step one.
                nn.init.zeros_(m.linear.bias)
                with torch.no_grad():
                    m.linear.weight.copy_(torch.eye(m.linear.in_features).repeat(m.factor, 1))
            elif isinstance(m, UpConv) and m.factor > 1:
                # Sub-pixel convs start with the same filter for all factor**2 sub-pixels of an output
                # channel (ICNR, Aitken et al. 2017): nearest-neighbour upsampling, no checkerboard.
                with torch.no_grad():
                    r2 = m.factor**2
                    m.conv.weight.copy_(m.conv.weight[::r2].repeat_interleave(r2, dim=0))
                    m.conv.bias.copy_(m.conv.bias[::r2].repeat_interleave(r2, dim=0))
        # All other layers keep PyTorch's default (Kaiming-uniform) initialisation.

    # ------------------------------------------------------------------ shapes and states

    def _check_video(self, video: torch.Tensor, what: str) -> None:
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        if video.dim() != 5:
            raise ValueError(f"{what} must be [B, 3, N, H, W], got shape {tuple(video.shape)}")
        _, c, n, h, w = video.shape
        if c != 3:
            raise ValueError(f"{what} must have 3 (RGB) channels, got {c} (shape {tuple(video.shape)})")
        if n == 0 or n % tf != 0:
            raise ValueError(f"{what} frame count N={n} must be a positive multiple of temporal_factor={tf}")
        if h == 0 or w == 0 or h % sf != 0 or w % sf != 0:
            raise ValueError(f"{what} size {h}x{w} must be positive and divisible by spatial_factor={sf}")
        if not video.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor in [-1, 1], got {video.dtype}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, n, h, w], got shape {tuple(latents.shape)}")
        _, c, n, h, w = latents.shape
        if c != self.cfg.latent_channels:
            raise ValueError(f"latents must have latent_channels={self.cfg.latent_channels} channels, got {c}")
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"latents must be non-empty, got shape {tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor, got {latents.dtype}")

    @staticmethod
    def _past_frames(state: StreamState, layers: list[CausalTemporalConv], x: torch.Tensor, height: int,
                     width: int, what: str) -> tuple[torch.Tensor, ...]:
        """The state's tensors for a chunk ``x`` of ``[B, ., ., height, width]`` pixel frames, checked (or
        made: zeros like ``x`` for a fresh, unsized state)."""
        b = x.shape[0]
        if state.batch_size != b:
            raise ValueError(f"{what} state holds {state.batch_size} streams, the chunk has batch size {b}")
        if state.past_frames is None:
            return tuple(torch.zeros(m.state_shape(b, height, width), device=x.device, dtype=x.dtype) for m in layers)
        if len(state.past_frames) != len(layers):
            raise ValueError(f"{what} state has {len(state.past_frames)} tensors, this model needs {len(layers)}")
        for past, m in zip(state.past_frames, layers, strict=True):
            want = m.state_shape(b, height, width)
            if tuple(past.shape) != want:
                raise ValueError(f"{what} state tensor has shape {tuple(past.shape)}, expected {want}: "
                                 f"the frame size differs from the state's stream")
        return state.past_frames

    def init_encoder_state(self, batch_size: int, height: int | None = None, width: int | None = None, *,
                           device: torch.device | None = None, dtype: torch.dtype | None = None) -> StreamState:
        """Fresh state of ``batch_size`` streams; with ``height x width`` (pixels) its zero tensors are made now."""
        if height is None or width is None:
            return StreamState(batch_size)
        return StreamState(batch_size, tuple(torch.zeros(m.state_shape(batch_size, height, width), device=device,
                                                         dtype=dtype) for m in self._enc_temporal))

    def init_decoder_state(self, batch_size: int, latent_height: int | None = None, latent_width: int | None = None,
                           *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> StreamState:
        """Fresh state of ``batch_size`` streams; with the latent frame size its zero tensors are made now
        (needed only to :meth:`StreamState.concat` it with running streams)."""
        if latent_height is None or latent_width is None:
            return StreamState(batch_size)
        sf = self.cfg.spatial_factor
        return StreamState(batch_size, tuple(torch.zeros(m.state_shape(batch_size, latent_height * sf,
                                                                       latent_width * sf), device=device, dtype=dtype)
                                             for m in self._dec_temporal))

    # ------------------------------------------------------------------ encoder

    def encode_chunk(self, video: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, StreamState]:
        """Encode the next ``N`` pixel frames of a stream (``N`` a multiple of ``temporal_factor``).

        Args:
            video: ``[B, 3, N, H, W]`` in [-1, 1].
            state: from :meth:`init_encoder_state` or the previous call.

        Returns:
            latents ``[B, C, N / tf, H / sf, W / sf]`` and the state after these frames.
        """
        self._check_video(video, "video")
        b, _, _, h, w = video.shape
        past = iter(self._past_frames(state, self._enc_temporal, video, h, w, "encoder"))
        new_past: list[torch.Tensor] = []
        x = F.relu(self.enc_in(_to_frames(video)))  # [B*N, w0, H, W]
        for stage in self.enc_stages:
            for block in stage.pre_blocks:  # temporal and spatial work on the frames the pool will merge
                x, p = block(x, next(past), b)
                new_past.append(p)
            if stage.pool is not None:
                x = stage.pool(x)  # [B*N/2, C, H, W]
            x = F.relu(stage.conv(x))
            for block in stage.blocks:
                x, p = block(x, next(past), b)
                new_past.append(p)
        latents = self.enc_out(x)  # [B*n, C_lat, h, w]
        return _from_frames(latents, b), StreamState(b, tuple(new_past))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, N, H, W]`` in [-1, 1] -> latents ``[B, C, N / tf, H / sf, W / sf]`` (a fresh stream)."""
        self._check_video(video, "video")
        return self.encode_chunk(video, self.init_encoder_state(video.shape[0]))[0]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Encode still images ``[B, 3, H, W]`` in [-1, 1] to one latent frame each, ``[B, C, 1, h, w]``.

        The image is repeated ``temporal_factor`` times and encoded as the first latent frame
        of a fresh stream: a still product photo becomes the first latent frame of a static clip.
        """
        if image.dim() != 4:
            raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
        if image.shape[1] != 3:
            raise ValueError(f"image must be RGB with 3 channels, got {image.shape[1]} (convert grey/RGBA first)")
        video = image.unsqueeze(2).expand(-1, -1, self.cfg.temporal_factor, -1, -1)  # [B, 3, tf, H, W]
        return self.encode(video)

    # ------------------------------------------------------------------ decoder

    def decode_chunk(self, latents: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, StreamState]:
        """Decode the next ``n`` latent frames of a stream.

        Args:
            latents: ``[B, C, n, h, w]``; any ``n >= 1``, any split of a stream.
            state: from :meth:`init_decoder_state` or the previous call.

        Returns:
            video ``[B, 3, n * tf, h * sf, w * sf]`` (nominally [-1, 1], not clamped) and the
            state after these frames.
        """
        self._check_latents(latents)
        b, _, _, h, w = latents.shape
        sf = self.cfg.spatial_factor
        past = iter(self._past_frames(state, self._dec_temporal, latents, h * sf, w * sf, "decoder"))
        new_past: list[torch.Tensor] = []
        # Soft clamp to [-3, 3] (TAEHV): out-of-range latents from a sampler cannot blow up the decoder.
        x = _to_frames(3.0 * torch.tanh(latents / 3.0))  # [B*n, C_lat, h, w]
        x = F.relu(self.dec_in(x))  # [B*n, w_L, h, w]
        for stage in self.dec_stages:
            for block in stage.blocks:
                x, p = block(x, next(past), b)
                new_past.append(p)
            if stage.grow is not None:
                x = stage.grow(x)  # [B*N*2, C, H, W]
            for block in stage.post_blocks:  # temporal and spatial work between the frames the grow split
                x, p = block(x, next(past), b)
                new_past.append(p)
            if stage.up is not None:
                x = F.relu(stage.up(x))  # [B*N, C', 2H, 2W] (or [B*N, C', H, W])
        video = self.dec_out(x)  # [B*N, 3, H, W]
        return _from_frames(video, b), StreamState(b, tuple(new_past))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, n, h, w]`` -> video ``[B, 3, n * tf, h * sf, w * sf]`` (a fresh stream)."""
        self._check_latents(latents)
        return self.decode_chunk(latents, self.init_decoder_state(latents.shape[0]))[0]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(video))`` for training."""
        return self.decode(self.encode(video))
