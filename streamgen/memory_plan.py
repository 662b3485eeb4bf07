"""How many streams fit: weight bytes, KV bytes per stream, activations per chunk (``streamgen info``).

Parameter counts come from building each model on the ``meta`` device (no memory, no weights
read); cache sizes use the same formulas as the paged KV pool (:class:`~streamgen.cache.block_pool.KVPageSpec`)
and the rolling-window policy (:func:`~streamgen.cache.window.worst_case_resident_frames`).

What a stream costs on the device:

* **KV**: its worst-case resident frames (sinks + recent window + the chunk being generated,
  what admission reserves) x tokens per frame x layers x 2 (K, V) x model width x bytes.
* **text context**: the prompt's cross-attention K/V, computed once and kept per stream:
  layers x 2 x ``text_max_tokens`` x width x bytes.
* **activations**: the engine batches every running stream's chunk into one forward, so each
  stream adds its chunk's working set. This is an *estimate* for a no-grad forward with a
  fused attention kernel (no score matrix): at the peak of one block, the chunk's hidden state,
  its modulated copy, q, k, v and the attention output (6 N d), the gathered cached K/V of its
  window (2 M d) and the FFN's two ``ffn_dim``-wide tensors (2 N f), with N the chunk's tokens
  and M the window's. The VAE decoder's activations are not counted.

Fixed costs: the transformer, the prompt encoder and the VAE weights, in the serving dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from streamgen.cache.paged import pages_for_frames
from streamgen.cache.window import worst_case_resident_frames
from streamgen.config import Preset

# google/umt5-xxl's encoder, which Wan2.1 and Self-Forcing use (the preset's text_dim 4096).
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "feed_forward_proj": "gated-gelu"}


@dataclass(frozen=True)
class MemoryPlan:
    dtype: str
    transformer_bytes: int
    text_encoder_bytes: int
    vae_bytes: int
    tokens_per_frame: int
    kv_bytes_per_frame: int
    window_frames: int | None          # the preset's rolling window (sinks included); None = unbounded
    reserved_frames: int | None        # worst case a stream holds (window + chunk in flight)
    kv_page_tokens: int                # tokens per KV page (CacheConfig.page_tokens)
    kv_bytes_per_stream: int | None    # the pages its reserved frames can touch, as the pool reserves
    text_context_bytes_per_stream: int
    activation_bytes_per_chunk: int    # estimate, see the module docstring
    kv_memory_bytes: int | None = None
    streams_in_kv_memory: int | None = None
    device_memory_bytes: int | None = None
    streams_on_device: int | None = None

    @property
    def fixed_bytes(self) -> int:
        return self.transformer_bytes + self.text_encoder_bytes + self.vae_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fixed_bytes"] = self.fixed_bytes
        return out


def _count(build: Any) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def transformer_params(preset: Preset) -> int:
    from streamgen.model.transformer import CausalWanTransformer

    return _count(lambda: CausalWanTransformer(preset.model))


def text_encoder_params(kind: str, text_encoder_dir: Path | None = None) -> int:
    """Parameters of the prompt encoder: UMT5 from its config (default: UMT5-XXL), or MiniLM-L6."""
    if kind == "umt5":
        from transformers import UMT5Config, UMT5EncoderModel

        if text_encoder_dir is not None:
            config = json.loads((text_encoder_dir / "config.json").read_text())
            cfg = UMT5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
        else:
            cfg = UMT5Config(**UMT5_XXL)
        return _count(lambda: UMT5EncoderModel(cfg))
    if kind == "minilm":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536)
        return _count(lambda: BertModel(cfg))
    raise ValueError(f"unknown text encoder kind {kind!r}; valid: umt5, minilm")


def vae_params(kind: str, preset: Preset, vae_dir: Path | None = None) -> int:
    if kind == "wan":
        try:
            from diffusers import AutoencoderKLWan
        except ImportError:
            from streamgen.model.wan_vae import INSTALL_HINT

            raise ValueError(f"the memory plan of a Wan model counts its VAE: {INSTALL_HINT}") from None

        config: dict[str, Any] = {}
        if vae_dir is not None:
            config = {k: v for k, v in json.loads((vae_dir / "config.json").read_text()).items()
                      if not k.startswith("_")}
        return _count(lambda: AutoencoderKLWan(**config))
    from streamgen.model.vae import CausalVideoVAE

    return _count(lambda: CausalVideoVAE(preset.vae))


def plan(preset: Preset, *, dtype: torch.dtype = torch.bfloat16, text_kind: str | None = None,
         vae_kind: str | None = None, text_encoder_dir: Path | None = None, vae_dir: Path | None = None,
         kv_memory_bytes: int | None = None, device_memory_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of ``preset`` served in ``dtype`` (weights in ``dtype`` too).

    ``text_kind`` / ``vae_kind`` default to what the preset implies: UMT5 and the Wan VAE for a
    4096-wide text input, MiniLM and our VAE otherwise.
    """
    m = preset.model
    itemsize = torch.empty((), dtype=dtype).element_size()
    text_kind = text_kind or ("umt5" if m.text_dim == 4096 else "minilm")
    vae_kind = vae_kind or ("wan" if text_kind == "umt5" else "streamgen")
    tpf = preset.tokens_per_frame
    kv_per_frame = tpf * 2 * m.num_layers * m.dim * itemsize
    chunk = preset.sampler.chunk_frames
    reserved = None if preset.cache.window_frames is None else worst_case_resident_frames(preset.cache, chunk)
    page = preset.cache.page_tokens(tpf)
    kv_per_stream = (None if reserved is None
                     else pages_for_frames(preset.cache, tpf, page, reserved) * page * (kv_per_frame // tpf))
    text_ctx = m.num_layers * 2 * m.text_max_tokens * m.dim * itemsize
    n_tokens = chunk * tpf
    m_tokens = (reserved if reserved is not None else chunk) * tpf
    activation = ((6 * n_tokens + 2 * m_tokens) * m.dim + 2 * n_tokens * m.ffn_dim) * itemsize
    p = MemoryPlan(
        dtype=str(dtype).removeprefix("torch."),
        transformer_bytes=transformer_params(preset) * itemsize,
        text_encoder_bytes=text_encoder_params(text_kind, text_encoder_dir) * itemsize,
        vae_bytes=vae_params(vae_kind, preset, vae_dir) * itemsize,
        tokens_per_frame=tpf, kv_bytes_per_frame=kv_per_frame, window_frames=preset.cache.window_frames,
        reserved_frames=reserved, kv_page_tokens=page, kv_bytes_per_stream=kv_per_stream,
        text_context_bytes_per_stream=text_ctx,
        activation_bytes_per_chunk=activation)
    updates: dict[str, Any] = {}
    if kv_memory_bytes is not None and kv_per_stream:
        updates.update(kv_memory_bytes=kv_memory_bytes, streams_in_kv_memory=kv_memory_bytes // kv_per_stream)
    if device_memory_bytes is not None and kv_per_stream:
        per_stream = kv_per_stream + text_ctx + activation
        updates.update(device_memory_bytes=device_memory_bytes,
                       streams_on_device=max(0, (device_memory_bytes - p.fixed_bytes) // per_stream))
    return MemoryPlan(**{**asdict(p), **updates})
