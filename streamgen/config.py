"""Typed, frozen, self-validating configuration and named presets.

Every size in streamgen comes from here. Configs are frozen dataclasses that check
themselves in ``__post_init__``; YAML or CLI overrides go through :func:`override`, which
rejects unknown keys instead of silently creating them. This module must never import
torch: the scheduler and CLI read configs without touching tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Causal video DiT in the Wan2.1 layout (diffusers ``WanTransformer3DModel`` names).

    ``dim = num_heads * head_dim``. Video geometry (pixels, fps) lives in
    :class:`VideoConfig`; the model only knows latent channels and patch size.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    latent_channels: int
    text_dim: int
    text_max_tokens: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    # Frame-position embedding (0 = none, as Wan): a frame's absolute position since the start of the clip or
    # stream, embedded like a timestep and mapped by a learned linear layer onto the frame's time embedding, so
    # every block's modulation knows how far into the clip the frame is, which RoPE (relative only) cannot say.
    # The value is the number of distinct positions: positions past ``frame_embeddings - 1`` share its
    # embedding. The map starts at zero, so a checkpoint trained without it loads into one with it and
    # predicts exactly as before.
    frame_embeddings: int = 0

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def with_layout_of(self, other: ModelConfig) -> ModelConfig:
        """This config with ``other``'s frame-embedding count: the layout a checkpoint carries as its own (it
        changes no shape a preset fixes)."""
        return dataclasses.replace(self, frame_embeddings=other.frame_embeddings)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "ffn_dim", "latent_channels",
                     "text_dim", "text_max_tokens", "freq_dim"):
            _check(getattr(self, name) > 0, f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        _check(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size),
               f"ModelConfig.patch_size must be 3 positive ints, got {self.patch_size}")
        _check(self.patch_size[0] == 1,
               "ModelConfig.patch_size[0] must be 1: frames are the unit of causality and caching")
        # 3-D RoPE splits head_dim into (t, h, w) parts of even size (Wan: h = w = 2 * (d // 6)).
        _check(self.head_dim % 2 == 0 and self.head_dim >= 6,
               f"ModelConfig.head_dim must be even and >= 6 for 3-D RoPE, got {self.head_dim}")
        _check(self.freq_dim % 2 == 0, f"ModelConfig.freq_dim must be even, got {self.freq_dim}")
        _check(self.frame_embeddings >= 0, f"ModelConfig.frame_embeddings must be >= 0, got {self.frame_embeddings}")


@dataclass(frozen=True)
class VAEConfig:
    """Causal video autoencoder: ``temporal_factor`` pixel frames per latent frame."""

    latent_channels: int
    base_channels: int = 32
    spatial_factor: int = 8
    temporal_factor: int = 4
    temporal_kernel: int = 3
    num_res_blocks: int = 1  # residual blocks per encoder/decoder stage
    # Residual blocks after the decoder's last TemporalGrow, at the full frame rate (0 = none, the layout of
    # every VAE trained before 2026-12-07). Without them each pair of pixel frames comes out of one feature
    # frame through a per-pixel linear split and only the RGB head follows, so motion arrives in steps.
    # A decoder-only field: the encoder and the latent space do not depend on it.
    post_grow_blocks: int = 0
    # Residual blocks before the encoder's first TemporalPool, at the full frame rate (0 = none, as every VAE
    # trained before 2026-12-07): the encoder's first stage otherwise pools each pair of frames after one 3x3
    # conv, so motion inside a pair has to survive a per-pixel linear map. An encoder field: it defines a
    # latent space of its own.
    pre_pool_blocks: int = 0

    def with_layout_of(self, other: VAEConfig) -> VAEConfig:
        """This config with ``other``'s pre-pool and post-grow block counts: the layout a checkpoint carries as
        its own (neither changes the latent shape or the video geometry a preset fixes)."""
        return dataclasses.replace(self, post_grow_blocks=other.post_grow_blocks,
                                   pre_pool_blocks=other.pre_pool_blocks)

    def __post_init__(self) -> None:
        _check(self.latent_channels > 0, "VAEConfig.latent_channels must be > 0")
        _check(self.base_channels > 0, "VAEConfig.base_channels must be > 0")
        _check(self.spatial_factor in (1, 2, 4, 8, 16),
               f"VAEConfig.spatial_factor must be a power of two <= 16, got {self.spatial_factor}")
        _check(self.temporal_factor in (1, 2, 4),
               f"VAEConfig.temporal_factor must be 1, 2 or 4, got {self.temporal_factor}")
        _check(self.temporal_kernel >= 1, "VAEConfig.temporal_kernel must be >= 1")
        _check(self.num_res_blocks >= 0, f"VAEConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        _check(self.post_grow_blocks >= 0, f"VAEConfig.post_grow_blocks must be >= 0, got {self.post_grow_blocks}")
        _check(self.post_grow_blocks == 0 or self.temporal_factor > 1,
               "VAEConfig.post_grow_blocks needs temporal_factor > 1 (without it the decoder has no TemporalGrow)")
        _check(self.pre_pool_blocks >= 0, f"VAEConfig.pre_pool_blocks must be >= 0, got {self.pre_pool_blocks}")
        _check(self.pre_pool_blocks == 0 or self.temporal_factor > 1,
               "VAEConfig.pre_pool_blocks needs temporal_factor > 1 (without it the encoder has no TemporalPool)")


@dataclass(frozen=True)
class VideoConfig:
    """Pixel geometry and playback rate of the generated video."""

    height: int
    width: int
    fps: int

    def __post_init__(self) -> None:
        _check(self.height > 0 and self.width > 0, f"VideoConfig size must be > 0, got {self.height}x{self.width}")
        _check(self.fps > 0, f"VideoConfig.fps must be > 0, got {self.fps}")


@dataclass(frozen=True)
class CacheConfig:
    """Rolling KV cache policy, in latent frames.

    A chunk attends to the first ``sink_frames`` frames ever written plus the most recent
    frames, so that the visible context *including the chunk itself* is at most
    ``window_frames`` frames (LongLive: window 12 including 3 sink frames). ``None`` means
    an unbounded window (plain block-causal attention over everything so far).
    """

    window_frames: int | None = None
    sink_frames: int = 0
    block_size_frames: int = 1
    # KV page size in tokens; None = block_size_frames whole frames per page. A page may then hold
    # parts of two frames (streamgen.cache.paged): Wan 1.3B's 1560-token frames use 256-token
    # pages, which the fused paged kernels read in place (docs/serving.md, "KV pages").
    block_size_tokens: int | None = None

    def __post_init__(self) -> None:
        _check(self.sink_frames >= 0, f"CacheConfig.sink_frames must be >= 0, got {self.sink_frames}")
        _check(self.block_size_frames > 0, f"CacheConfig.block_size_frames must be > 0, got {self.block_size_frames}")
        if self.block_size_tokens is not None:
            _check(self.block_size_tokens > 0,
                   f"CacheConfig.block_size_tokens must be > 0 or None, got {self.block_size_tokens}")
            _check(self.block_size_frames == 1, "CacheConfig: give block_size_tokens or block_size_frames > 1, "
                                                f"not both (got {self.block_size_tokens} and {self.block_size_frames})")
        if self.window_frames is not None:
            _check(self.window_frames > self.sink_frames,
                   f"CacheConfig.window_frames ({self.window_frames}) must exceed sink_frames ({self.sink_frames})")

    def page_tokens(self, tokens_per_frame: int) -> int:
        """Tokens per KV page for frames of ``tokens_per_frame`` tokens."""
        if self.block_size_tokens is not None:
            return self.block_size_tokens
        return self.block_size_frames * tokens_per_frame

    @property
    def recent_frames(self) -> int | None:
        """Non-sink frames visible to a chunk (including the chunk's own frames)."""
        return None if self.window_frames is None else self.window_frames - self.sink_frames


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow-matching sampler (Self-Forcing): shifted schedule, x0 prediction, re-noise."""

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    chunk_frames: int = 3
    context_timestep: float = 0.0

    def __post_init__(self) -> None:
        _check(len(self.denoising_steps) > 0, "SamplerConfig.denoising_steps must not be empty")
        _check(all(0 < t <= self.num_train_timesteps for t in self.denoising_steps),
               f"SamplerConfig.denoising_steps must lie in (0, {self.num_train_timesteps}]")
        _check(list(self.denoising_steps) == sorted(self.denoising_steps, reverse=True),
               "SamplerConfig.denoising_steps must be decreasing")
        _check(self.shift > 0, f"SamplerConfig.shift must be > 0, got {self.shift}")
        _check(self.chunk_frames > 0, f"SamplerConfig.chunk_frames must be > 0, got {self.chunk_frames}")
        _check(0 <= self.context_timestep < self.num_train_timesteps,
               "SamplerConfig.context_timestep must lie in [0, num_train_timesteps)")


@dataclass(frozen=True)
class Preset:
    """Everything needed to build and run one model size."""

    name: str
    model: ModelConfig
    vae: VAEConfig
    video: VideoConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        _check(self.model.latent_channels == self.vae.latent_channels,
               f"model.latent_channels ({self.model.latent_channels}) != vae.latent_channels "
               f"({self.vae.latent_channels})")
        down = self.vae.spatial_factor * self.model.patch_size[1]
        _check(self.video.height % down == 0 and self.video.width % (self.vae.spatial_factor
                                                                     * self.model.patch_size[2]) == 0,
               f"video {self.video.height}x{self.video.width} must be divisible by VAE factor x patch ({down})")
        if self.cache.window_frames is not None:
            _check(self.cache.recent_frames >= self.sampler.chunk_frames,  # type: ignore[operator]
                   f"cache window minus sinks ({self.cache.recent_frames}) must hold a whole chunk "
                   f"({self.sampler.chunk_frames} frames)")

    @property
    def latent_height(self) -> int:
        return self.video.height // self.vae.spatial_factor

    @property
    def latent_width(self) -> int:
        return self.video.width // self.vae.spatial_factor

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.model.patch_size
        return (self.latent_height // ph) * (self.latent_width // pw)

    @property
    def chunk_tokens(self) -> int:
        """Tokens of one chunk of one stream: the row count of the chunk's GEMMs."""
        return self.sampler.chunk_frames * self.tokens_per_frame

    def pixel_frames(self, num_latent_frames: int) -> int:
        return num_latent_frames * self.vae.temporal_factor


def _build_presets() -> dict[str, Preset]:
    test = Preset(
        name="test",
        model=ModelConfig(num_layers=2, num_heads=2, head_dim=16, ffn_dim=64, latent_channels=4,
                          text_dim=384, text_max_tokens=16, freq_dim=32),
        vae=VAEConfig(latent_channels=4, base_channels=8),
        video=VideoConfig(height=32, width=32, fps=16),
        cache=CacheConfig(window_frames=None, sink_frames=0),
    )
    # Sized from ARCHITECTURE.md section 10: ~9M parameters, 64 tokens per latent frame at
    # 128x128, a 3-frame chunk forward ~26 ms in bf16 on 2 cores -> far faster than real time.
    default = Preset(
        name="default",
        model=ModelConfig(num_layers=8, num_heads=4, head_dim=64, ffn_dim=1024, latent_channels=16,
                          text_dim=384, text_max_tokens=32),
        vae=VAEConfig(latent_channels=16, base_channels=64),
        video=VideoConfig(height=128, width=128, fps=16),
        cache=CacheConfig(window_frames=12, sink_frames=3),
    )
    # Self-Forcing / Wan2.1-T2V-1.3B: 30 layers, 12 heads x 128, ffn 8960, umT5 text (4096, 512 tokens).
    wan = Preset(
        name="wan-1.3b",
        model=ModelConfig(num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960, latent_channels=16,
                          text_dim=4096, text_max_tokens=512),
        vae=VAEConfig(latent_channels=16, base_channels=96),
        video=VideoConfig(height=480, width=832, fps=16),
        cache=CacheConfig(window_frames=12, sink_frames=3, block_size_tokens=256),  # flash/flex page size
    )
    return {p.name: p for p in (test, default, wan)}


PRESETS: dict[str, Preset] = _build_presets()

# Attention backends by name (``streamgen.attention.AttentionBackendName``, kept equal by a test), here so
# the CLIs list them without importing torch; ``auto`` picks one for the device (``resolve_attention``).
ATTENTION_NAMES: tuple[str, ...] = ("sdpa", "gemm", "flex", "xformers", "flash")
ATTENTION_CHOICES: tuple[str, ...] = ("auto", *ATTENTION_NAMES)


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; unknown names raise ``ValueError`` listing valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def override(cfg: T, changes: Mapping[str, Any]) -> T:
    """Return a copy of dataclass ``cfg`` with ``changes`` applied, recursing into nested configs.

    Unknown keys raise ``ValueError`` naming the key and the valid fields, so a typo in a YAML
    file never becomes a silently ignored setting.
    """
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"override expects a dataclass instance, got {type(cfg).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    updates: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in fields:
            raise ValueError(f"unknown field {key!r} for {type(cfg).__name__}; valid fields: "
                             f"{', '.join(sorted(fields))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            updates[key] = override(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            updates[key] = tuple(value)
        else:
            updates[key] = value
    return dataclasses.replace(cfg, **updates)  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass ``cls`` from a plain dict, recursing into nested configs; unknown keys raise."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for {cls.__name__}; valid fields: "
                         f"{', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    hints = {Preset: {"model": ModelConfig, "vae": VAEConfig, "video": VideoConfig,
                      "cache": CacheConfig, "sampler": SamplerConfig}}
    nested = hints.get(cls, {})  # type: ignore[call-overload]
    for key, value in data.items():
        if key in nested and isinstance(value, Mapping):
            kwargs[key] = from_dict(nested[key], value)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)
