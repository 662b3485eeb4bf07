"""Causal video diffusion transformer in the Wan2.1 layout.

Parameter names equal those of diffusers' ``WanTransformer3DModel`` (``blocks.0.attn1.to_q``,
``blocks.0.scale_shift_table``, ``condition_embedder.time_proj`` ...), so real Wan-family
weights load 1:1 (see :mod:`streamgen.model.weights`). Two things differ from diffusers:

* every latent frame carries its own timestep (``timesteps: [B, F]``), which chunked
  autoregressive generation needs (a clean context chunk beside a noisy one);
* self-attention takes a typed cache (:class:`~streamgen.model.cache_api.SelfAttentionCache`)
  or a mask, so the same weights run full-bidirectional (teacher), masked block-causal
  (offline reference / training) or chunk by chunk against a rolling KV cache (serving).

This module is pure math. It never imports the engine, server or a cache implementation,
and knows nothing of noise schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from streamgen.attention import AttentionBackend, get_backend
from streamgen.config import ModelConfig
from streamgen.model.cache_api import SelfAttentionCache
from streamgen.model.rope import apply_rope, rope_freqs


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N] -> [N, dim]`` as ``[cos, sin]`` (diffusers ``flip_sin_to_cos=True``,
    ``downscale_freq_shift=0``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (DiT eq. in section 3.2)."""
    return x * (1 + scale) + shift


def layer_norm_fp32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in float32 whatever the model dtype (Wan's ``FP32LayerNorm``)."""
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


@dataclass
class TextContext:
    """Per-prompt cross-attention keys/values, computed once and reused for every chunk.

    ``keys[i], values[i]``: ``[B, L_text, H, D]`` for block ``i``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def select(self, index: torch.Tensor | list[int]) -> TextContext:
        """Rows ``index`` of the batch (for batching sessions with different prompts)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return TextContext([k[idx] for k in self.keys], [v[idx] for v in self.values])

    @staticmethod
    def cat(contexts: list[TextContext]) -> TextContext:
        n = len(contexts[0].keys)
        return TextContext([torch.cat([c.keys[i] for c in contexts]) for i in range(n)],
                           [torch.cat([c.values[i] for c in contexts]) for i in range(n)])


# GELU's tanh form 0.5 * x * (1 + tanh(u)), u = sqrt(2 / pi) * (x + 0.044715 * x^3), equals x * sigmoid(2u).
_GELU_LINEAR = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_CUBIC = _GELU_LINEAR * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` (Wan's GELU).

    On a CPU in float32 outside autograd it is computed as ``x * sigmoid(2u)`` in place on one fresh
    buffer: the same function (within twice PyTorch's own float32 error, ``tests/model/test_gelu.py``), and
    on an AVX2 CPU about 3-4x faster than PyTorch's tanh-GELU kernel, which was ~7 % of a default-preset
    chunk there (docs/speed.md). Everywhere else (CUDA's fused kernel, bf16, training) it is ``F.gelu``.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
        return F.gelu(x, approximate="tanh")
    y = x * x
    return y.mul_(_GELU_CUBIC).add_(_GELU_LINEAR).mul_(x).sigmoid_().mul_(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = TextProjection(cfg.text_dim, cfg.dim)
        # ModelConfig.frame_embeddings: absolute frame position -> sinusoidal features (as a timestep's) -> a
        # linear map (zero at init) -> added to the time embedding. A linear map of fixed features rather than a
        # table of free vectors: each weight is shared by every position, so every position's gradient moves it,
        # and neighbouring positions stay alike.
        self.frame_embedding = nn.Linear(cfg.freq_dim, cfg.dim) if cfg.frame_embeddings else None
        self.num_frame_positions = cfg.frame_embeddings

    def time(self, timesteps: torch.Tensor, dtype: torch.dtype,
             positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``timesteps: [B, F]`` (and absolute frame ``positions: [B, F]``, read only with frame embeddings)
        -> ``temb: [B, F, dim]``, ``proj: [B, F, 6, dim]``."""
        batch, num_frames = timesteps.shape
        freq = timestep_embedding(timesteps.flatten(), self.freq_dim)
        freq = freq.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(freq)  # [B*F, dim]
        if self.frame_embedding is not None:
            if positions is None or positions.shape != timesteps.shape:
                raise ValueError("a model with frame embeddings needs every frame's absolute position [B, F]")
            index = positions.clamp(0, self.num_frame_positions - 1).flatten().to(torch.float32)
            features = timestep_embedding(index, self.freq_dim).to(self.frame_embedding.weight.dtype)
            temb = temb + self.frame_embedding(features).to(temb.dtype)
        temb = temb.to(dtype)
        proj = self.time_proj(F.silu(temb))  # [B*F, 6*dim]
        return temb.view(batch, num_frames, -1), proj.view(batch, num_frames, 6, -1)


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """GELU(tanh) MLP; ``net.0.proj`` / ``net.2`` match diffusers' key names."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Attention(nn.Module):
    """Projections of one attention layer (RMSNorm over all heads on q and k, as Wan)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(dim, eps=cfg.eps)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        # float32 RMSNorm: more accurate than bf16 and, on CPU, about twice as fast.
        return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps).type_as(x)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms(self.to_q(x), self.norm_q).unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._rms(self.to_k(x), self.norm_k).unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]
        v = self.to_v(x).unflatten(-1, (self.num_heads, -1))
        return k, v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](x.flatten(2))  # [B, L, H, D] -> [B, L, dim]


@torch.compiler.disable
def cache_attention(cache: SelfAttentionCache, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """Self-attention through a cache, always run eagerly: a cache reads and writes its own state (block
    tables, window bookkeeping) in Python, so ``torch.compile`` of the blocks (``--compile``) breaks its
    graph here instead of tracing into it and re-compiling whenever the cache's state changes."""
    return cache.attend(layer_idx, q, k, v)


@dataclass
class _ForwardState:
    """What every block needs besides hidden states, built once per forward."""

    rope: torch.Tensor  # complex [B, L, 1, D/2]
    mask: torch.Tensor | None
    kv_cache: SelfAttentionCache | None
    num_frames: int


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.attn2 = Attention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, cfg.dim))

    def text_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's cross-attention K/V of the embedded prompt ``ctx: [B, L_text, dim]`` (a method of the
        block, so a sharded block, trainer.common.sharding, gathers its weights for it as for ``forward``)."""
        return self.attn2.project_kv(ctx)

    def forward(self, x: torch.Tensor, temb_proj: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor],
                state: _ForwardState) -> torch.Tensor:
        """``x: [B, L, dim]`` frame-major tokens; ``temb_proj: [B, F, 6, dim]`` per-frame modulation."""
        batch, length, dim = x.shape
        per_frame = (self.scale_shift_table[None] + temb_proj.float()).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = per_frame.unbind(2)  # each [B, F, 1, dim]

        def framewise(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, state.num_frames, length // state.num_frames, dim)  # [B, F, T, dim]

        # 1. Self-attention (RoPE'd q/k; through the cache when streaming).
        h = modulate(framewise(layer_norm_fp32(x, self.norm1)), shift1, scale1).view_as(x).type_as(x)
        q = apply_rope(self.attn1.project_q(h), state.rope)
        k, v = self.attn1.project_kv(h)
        k = apply_rope(k, state.rope)
        if state.kv_cache is not None:
            attn = cache_attention(state.kv_cache, self.layer_idx, q, k, v)
        else:
            attn = self.backend.attention(q, k, v, state.mask)
        attn = self.attn1.out(attn)
        x = (framewise(x.float()) + framewise(attn) * gate1).view_as(x).type_as(x)

        # 2. Cross-attention to the prompt's precomputed keys/values.
        h = layer_norm_fp32(x, self.norm2).type_as(x) if isinstance(self.norm2, nn.LayerNorm) else x
        attn = self.backend.attention(self.attn2.project_q(h), text[0], text[1], None)
        x = x + self.attn2.out(attn)

        # 3. Feed-forward.
        h = modulate(framewise(layer_norm_fp32(x, self.norm3)), shift2, scale2).view_as(x).type_as(x)
        x = (framewise(x.float()) + framewise(self.ffn(h).float()) * gate2).view_as(x).type_as(x)
        return x


class CausalWanTransformer(nn.Module):
    """Wan2.1 DiT with per-frame timesteps and cache-aware self-attention.

    Shapes: latents ``[B, C, F, H, W]``; tokens are frame-major ``(f, h, w)`` with
    ``T = (H / p_h) * (W / p_w)`` tokens per frame.
    """

    def __init__(self, cfg: ModelConfig, attention_backend: str | AttentionBackend = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        backend = get_backend(attention_backend) if isinstance(attention_backend, str) else attention_backend
        self.backend = backend
        self.patch_embedding = nn.Conv3d(cfg.latent_channels, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i, backend) for i in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(cfg.dim, cfg.latent_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, cfg.dim))
        # Training only: recompute each block's activations in backward instead of keeping them
        # (see set_gradient_checkpointing). Not a config field: it changes memory, never the math.
        self.gradient_checkpointing = False
        self.initialize_weights()

    def set_gradient_checkpointing(self, enabled: bool = True) -> CausalWanTransformer:
        """Keep only each block's input in a grad-enabled forward and recompute the block in backward.

        Same loss and gradients (up to float reassociation), roughly one extra forward of compute,
        and activation memory of one block instead of ``num_layers``. Forwards through a KV cache
        never checkpoint: a block writes the cache, and a recomputation would write it twice.
        """
        self.gradient_checkpointing = enabled
        return self

    def initialize_weights(self) -> None:
        """All initialisation in one place (Wan / DiT recipe)."""
        # Linear layers: Xavier uniform, zero bias (Wan's init_weights).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding: Xavier over the flattened kernel, like a linear layer.
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        # Embedding MLPs: small normal, as Wan does for text/time embeddings.
        for lin in (self.condition_embedder.text_embedder.linear_1, self.condition_embedder.text_embedder.linear_2,
                    self.condition_embedder.time_embedder.linear_1, self.condition_embedder.time_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        # Modulation tables: randn / sqrt(dim), as Wan (diffusers uses the same scale).
        dim = self.cfg.dim
        for block in self.blocks:
            nn.init.normal_(block.scale_shift_table, std=dim**-0.5)
        nn.init.normal_(self.scale_shift_table, std=dim**-0.5)
        # Frame embeddings: zero, so the model starts as one without them (and a checkpoint without them
        # loads into it unchanged).
        if self.condition_embedder.frame_embedding is not None:
            nn.init.zeros_(self.condition_embedder.frame_embedding.weight)
            nn.init.zeros_(self.condition_embedder.frame_embedding.bias)
        # Output head: zero, so an untrained model predicts zero velocity (DiT's adaLN-zero spirit).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # ------------------------------------------------------------------ text
    def encode_text(self, text_embeddings: torch.Tensor) -> TextContext:
        """``[B, L_text, text_dim]`` prompt token embeddings -> per-layer cross-attention K/V."""
        if text_embeddings.ndim != 3 or text_embeddings.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text embeddings must be [B, L, {self.cfg.text_dim}], got "
                             f"{tuple(text_embeddings.shape)}")
        dtype = self.proj_out.weight.dtype
        ctx = self.condition_embedder.text_embedder(text_embeddings.to(dtype))  # [B, L, dim]
        keys, values = [], []
        for block in self.blocks:
            k, v = block.text_kv(ctx)
            keys.append(k)
            values.append(v)
        return TextContext(keys, values)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: TextContext) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"latents must be [B, {cfg.latent_channels}, F, H, W], got {tuple(x.shape)}")
        _, ph, pw = cfg.patch_size
        if x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {x.shape[3]}x{x.shape[4]} not divisible by patch {ph}x{pw}")
        batch, num_frames = x.shape[0], x.shape[2]
        if timesteps.ndim == 1:
            if timesteps.shape[0] != batch:
                raise ValueError(f"timesteps [B] must have B={batch}, got {tuple(timesteps.shape)}")
            timesteps = timesteps[:, None].expand(batch, num_frames)
        if timesteps.shape != (batch, num_frames):
            raise ValueError(f"timesteps must be [B] or [B, F] = [{batch}, {num_frames}], got "
                             f"{tuple(timesteps.shape)}")
        if context.batch_size != batch:
            raise ValueError(f"text context batch {context.batch_size} != latent batch {batch}")
        return timesteps

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: TextContext,
        *,
        frame_offsets: int | torch.Tensor = 0,
        kv_cache: SelfAttentionCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict flow-matching velocity.

        Args:
            x: ``[B, C, F, H, W]`` noisy latents.
            timesteps: ``[B]`` or ``[B, F]`` in ``[0, 1000]`` (per-frame noise levels).
            context: from :meth:`encode_text`.
            frame_offsets: absolute index of ``x``'s first frame (int or ``[B]``), or explicit
                absolute positions of every frame ``[B, F]``; used for RoPE and, where the config has
                them, the frame embeddings.
            kv_cache: past keys/values (chunked streaming); ``None`` attends within ``x`` only.
            attn_mask: bool ``[F*T, F*T]`` (True = may attend) when ``kv_cache`` is ``None``;
                ``None`` = full bidirectional attention (the teacher).
        Returns:
            ``[B, C, F, H, W]`` velocity ``v = noise - x0``.
        """
        timesteps = self._check_inputs(x, timesteps, context)
        if kv_cache is not None and attn_mask is not None:
            raise ValueError("pass either kv_cache or attn_mask, not both")
        cfg = self.cfg
        batch, _, num_frames, height, width = x.shape
        _, ph, pw = cfg.patch_size
        grid_h, grid_w = height // ph, width // pw
        dtype = self.proj_out.weight.dtype

        offsets = torch.as_tensor(frame_offsets, dtype=torch.long, device=x.device)
        if offsets.ndim == 2:  # explicit (possibly non-contiguous) positions, e.g. re-caching sinks + window
            if offsets.shape != (batch, num_frames):
                raise ValueError(f"frame positions must be [B, F] = [{batch}, {num_frames}], "
                                 f"got {tuple(offsets.shape)}")
            positions = offsets
        else:
            positions = offsets.expand(batch)[:, None] + torch.arange(num_frames, device=x.device)[None, :]  # [B, F]
        rope = rope_freqs(positions, grid_h, grid_w, cfg.head_dim, cfg.rope_theta)
        if attn_mask is not None and attn_mask.shape != (num_frames * grid_h * grid_w,) * 2:
            raise ValueError(f"attn_mask must be [{num_frames * grid_h * grid_w}] x 2, got {tuple(attn_mask.shape)}")
        state = _ForwardState(rope=rope, mask=attn_mask, kv_cache=kv_cache, num_frames=num_frames)

        h = self.patch_embedding(x.to(dtype))  # [B, dim, F, gh, gw]
        h = h.flatten(2).transpose(1, 2).contiguous()  # [B, F*gh*gw, dim]
        temb, temb_proj = self.condition_embedder.time(timesteps, dtype, positions)  # [B, F, dim], [B, F, 6, dim]
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.blocks):
            text = (context.keys[i], context.values[i])
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(block, h, temb_proj, text, state, use_reentrant=False)
            else:
                h = block(h, temb_proj, text, state)

        shift, scale = (self.scale_shift_table[None] + temb[:, :, None].float()).unsqueeze(3).unbind(2)
        tokens = h.shape[1] // num_frames
        out = modulate(layer_norm_fp32(h, self.norm_out).view(batch, num_frames, tokens, -1), shift, scale)
        out = self.proj_out(out.view(batch, num_frames * tokens, -1).type_as(h))  # [B, L, C*pt*ph*pw]
        out = out.reshape(batch, num_frames, grid_h, grid_w, 1, ph, pw, cfg.latent_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, 1, gh, ph, gw, pw]
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, H, W]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
