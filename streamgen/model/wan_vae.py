"""Wan2.1's causal video VAE (diffusers ``AutoencoderKLWan``) behind our streaming-decoder interface.

:class:`WanVideoVAE` offers what :class:`~streamgen.model.vae.CausalVideoVAE` offers the engine
(``init_decoder_state`` / ``decode_chunk`` / ``to_diffusion`` / ``from_diffusion`` /
``encode_image`` / ``latent_frames_for``), so a stream's pixels come out chunk by chunk as its
latents do.

Streaming: diffusers' ``_decode`` already runs the decoder one latent frame at a time, carrying
a list of causal feature caches (``_feat_map``: per ``WanCausalConv3d``, ``None`` before the
first frame, the marker ``"Rep"`` after it for the temporal upsamplers, then the last input
frames) on the module and clearing it at the start and end of every call. We keep that list
per stream instead, in a :class:`WanDecoderState`, and call the same ``decoder`` per frame with
it, so decoding N chunks runs exactly the ops of one whole-video decode. The list's tensors are
never modified in place by the decoder (entries are replaced by fresh clones), so a state stays
valid after the call that consumed it: states are values, like ``StreamState``. Unlike ours,
states of streams at different points do not stack into one batch (``batched_decode`` is False).

Frame counts differ from our VAE: the first latent frame of a stream decodes to one pixel
frame, every later one to four (Wan's 1 + 4k layout), hence :meth:`WanVideoVAE.latent_frames_for`.

Latent normalisation is Wan's: the diffusion model works on ``(z - latents_mean) / latents_std``
with the per-channel values of the VAE's config, as ``WanPipeline`` does.

diffusers is imported only when a Wan VAE is built (``pip install 'streamgen[wan]'``).
This module does no file I/O except :func:`load_wan_vae`; it knows nothing of sessions.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamgen.config import VAEConfig

__all__ = ["WanDecoderState", "WanVideoVAE", "load_wan_vae", "vae_config_from_wan"]

INSTALL_HINT = "the Wan VAE needs diffusers: pip install 'streamgen[wan]'"


@dataclass(frozen=True)
class WanDecoderState:
    """Decoder memory of ``batch_size`` streams at the same point: diffusers' per-causal-conv cache
    list (``None`` = fresh streams that have decoded nothing yet)."""

    batch_size: int
    feat_map: tuple[Any, ...] | None = None


def vae_config_from_wan(config: dict[str, Any]) -> VAEConfig:
    """Our :class:`VAEConfig` (the sizes the preset checks) for an ``AutoencoderKLWan`` config."""
    if config.get("patch_size") is not None or config.get("is_residual"):
        raise ValueError("the Wan2.2 VAE (patch_size / is_residual) is not supported; need Wan2.1's")
    temporal = 2 ** sum(bool(t) for t in config.get("temperal_downsample", [False, True, True]))
    spatial = 2 ** (len(config.get("dim_mult", [1, 2, 4, 4])) - 1)
    return VAEConfig(latent_channels=int(config.get("z_dim", 16)), base_channels=int(config.get("base_dim", 96)),
                     spatial_factor=spatial, temporal_factor=temporal)


class WanVideoVAE(nn.Module):
    """An ``AutoencoderKLWan`` with a per-stream streaming decoder and Wan's latent normalisation."""

    # Streams at different points cannot share a decode call (the first chunk yields fewer frames and
    # the caches change structure after the first frame): the engine decodes them one by one.
    batched_decode = False

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        config = dict(vae.config)  # type: ignore[arg-type]
        self.cfg = vae_config_from_wan(config)
        self.vae = vae
        mean, std = config["latents_mean"], config["latents_std"]
        c = self.cfg.latent_channels
        if len(mean) != c or len(std) != c or any(not s > 0 for s in std):
            raise ValueError(f"Wan VAE config needs {c} latents_mean and {c} positive latents_std values")
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latent_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self._num_convs = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.post_quant_conv.weight.dtype

    # ------------------------------------------------------------------ normalisation and sizes

    def to_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, n, h, w]`` -> the diffusion model's normalised space."""
        mean, std = self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)
        return ((latents.float() - mean) / std).to(latents.dtype)

    def from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents ``[B, C, n, h, w]`` -> VAE latents (``WanPipeline``: ``z * std + mean``)."""
        mean, std = self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)
        return (z.float() * std + mean).to(z.dtype)

    def latent_frames_for(self, num_pixel_frames: int) -> int:
        """Latent frames whose decode holds ``num_pixel_frames`` frames (1 + 4k layout)."""
        if num_pixel_frames <= 0:
            raise ValueError(f"num_pixel_frames must be > 0, got {num_pixel_frames}")
        return 1 + math.ceil((num_pixel_frames - 1) / self.cfg.temporal_factor)

    # ------------------------------------------------------------------ decoder

    def init_decoder_state(self, batch_size: int, latent_height: int | None = None, latent_width: int | None = None,
                           *, device: torch.device | None = None, dtype: torch.dtype | None = None
                           ) -> WanDecoderState:
        """A fresh stream (the frame size and dtype are taken from its first chunk)."""
        return WanDecoderState(batch_size)

    def _decode_stream(self, latents: torch.Tensor, state: WanDecoderState) -> tuple[torch.Tensor, WanDecoderState]:
        if state.batch_size != latents.shape[0]:
            raise ValueError(f"decoder state holds {state.batch_size} streams, the chunk has {latents.shape[0]}")
        feat: list[Any] = list(state.feat_map) if state.feat_map is not None else [None] * self._num_convs
        if len(feat) != self._num_convs:
            raise ValueError(f"decoder state has {len(feat)} caches, this VAE needs {self._num_convs}")
        x = self.vae.post_quant_conv(latents.to(self.dtype))  # 1x1x1 conv: no temporal memory
        frames = []
        first = state.feat_map is None
        for i in range(x.shape[2]):
            # feat_idx is the decoder's running cursor into ``feat``, reset per frame as in diffusers' _decode.
            out = self.vae.decoder(x[:, :, i:i + 1], feat_cache=feat, feat_idx=[0], first_chunk=first and i == 0)
            frames.append(out)
        video = torch.clamp(torch.cat(frames, dim=2), -1.0, 1.0)  # [B, 3, N, H, W], as diffusers' decode
        return video, WanDecoderState(state.batch_size, tuple(feat))

    def decode_chunk(self, latents: torch.Tensor, state: WanDecoderState) -> tuple[torch.Tensor, WanDecoderState]:
        """Decode the next ``n`` latent frames ``[B, C, n, h, w]`` of ``B`` streams at the same point (VAE
        space, see :meth:`from_diffusion`) -> video ``[B, 3, N, H, W]`` in [-1, 1] and the state after
        them. ``N = 1 + 4 (n - 1)`` for a stream's first chunk, ``4 n`` afterwards."""
        if latents.dim() != 5 or latents.shape[1] != self.cfg.latent_channels or latents.shape[2] == 0:
            raise ValueError(f"latents must be [B, {self.cfg.latent_channels}, n>0, h, w], "
                             f"got {tuple(latents.shape)}")
        return self._decode_stream(latents, state)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole-video decode (diffusers' own ``decode``, clamped to [-1, 1])."""
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------ encoder

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Still images ``[B, 3, H, W]`` in [-1, 1] -> one latent frame ``[B, C, 1, h, w]`` (the
        posterior's mode), the first latent frame of a Wan video that starts with that image."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
        posterior = self.vae.encode(image.unsqueeze(2).to(self.dtype)).latent_dist
        return posterior.mode()


def load_wan_vae(vae_dir: str | Path) -> WanVideoVAE:
    """Load ``vae/`` of a diffusers Wan directory; a missing diffusers, file or key is a ``ValueError``."""
    vae_dir = Path(vae_dir)
    config_path = vae_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing (the Wan VAE's config)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: not readable JSON ({exc})") from None
    if config.get("_class_name") not in (None, "AutoencoderKLWan"):
        raise ValueError(f"{config_path}: holds a {config.get('_class_name')}, expected AutoencoderKLWan")
    vae_config_from_wan(config)
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    from safetensors import SafetensorError

    from streamgen.model.weights import load_state_strict, read_safetensors

    weights_path = vae_dir / "diffusion_pytorch_model.safetensors"
    state = read_safetensors(weights_path)
    # Keys this diffusers version does not take (a newer config's additions) would make the constructor
    # fail; the weights are checked strictly below, so dropping them cannot hide a mismatch.
    accepted = inspect.signature(AutoencoderKLWan.__init__).parameters
    init = {k: v for k, v in config.items() if k in accepted and k != "self"}
    try:
        with torch.device("meta"):
            vae = AutoencoderKLWan(**init)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: not a valid AutoencoderKLWan config: {exc}") from None
    vae = vae.to_empty(device="cpu")
    try:
        load_state_strict(vae, {k: v.float() for k, v in state.items()}, what=str(weights_path))
    except SafetensorError as exc:
        raise ValueError(f"{weights_path}: {exc}") from None
    return WanVideoVAE(vae.eval())
