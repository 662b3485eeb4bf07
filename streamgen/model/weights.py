"""Weights in and out: our safetensors checkpoints, diffusers' and Wan's original formats.

Every load is strict: a missing key, a left-over key, a wrong shape or a config that does
not match the one recorded in the file raises ``ValueError`` naming the problem. There is
no partial load. Files are written atomically (temporary file + rename), so a crash never
leaves a half-written checkpoint under the final name.

Wan's original checkpoint names map to ours (= diffusers' ``WanTransformer3DModel``) as:

================================  =====================================
Wan original                      streamgen / diffusers
================================  =====================================
``patch_embedding.*``             ``patch_embedding.*``
``text_embedding.0`` / ``.2``     ``condition_embedder.text_embedder.linear_1`` / ``linear_2``
``time_embedding.0`` / ``.2``     ``condition_embedder.time_embedder.linear_1`` / ``linear_2``
``time_projection.1``             ``condition_embedder.time_proj``
``blocks.N.self_attn.{q,k,v,o}``  ``blocks.N.attn1.{to_q,to_k,to_v,to_out.0}``
``blocks.N.self_attn.norm_{q,k}`` ``blocks.N.attn1.norm_{q,k}``
``blocks.N.cross_attn.*``         ``blocks.N.attn2.*`` (same sub-names as self_attn)
``blocks.N.norm3``                ``blocks.N.norm2`` (the cross-attention LayerNorm)
``blocks.N.ffn.0`` / ``.2``       ``blocks.N.ffn.net.0.proj`` / ``blocks.N.ffn.net.2``
``blocks.N.modulation``           ``blocks.N.scale_shift_table``
``head.head``                     ``proj_out``
``head.modulation``               ``scale_shift_table``
================================  =====================================
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from streamgen.config import ModelConfig, VAEConfig, from_dict, to_dict

FORMAT_VERSION = "1"

_WAN_RULES: list[tuple[str, str]] = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^blocks\.(\d+)\.self_attn\.q\.", r"blocks.\1.attn1.to_q."),
    (r"^blocks\.(\d+)\.self_attn\.k\.", r"blocks.\1.attn1.to_k."),
    (r"^blocks\.(\d+)\.self_attn\.v\.", r"blocks.\1.attn1.to_v."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.norm_(q|k)\.", r"blocks.\1.attn1.norm_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.q\.", r"blocks.\1.attn2.to_q."),
    (r"^blocks\.(\d+)\.cross_attn\.k\.", r"blocks.\1.attn2.to_k."),
    (r"^blocks\.(\d+)\.cross_attn\.v\.", r"blocks.\1.attn2.to_v."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_(q|k)\.", r"blocks.\1.attn2.norm_\2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^patch_embedding\.", "patch_embedding."),
]


def wan_original_key(key: str) -> str:
    """Map one key of Wan's original checkpoint to our name; unknown keys raise ``ValueError``."""
    for pattern, repl in _WAN_RULES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    raise ValueError(f"unrecognised Wan checkpoint key {key!r}")


def convert_wan_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan original state dict (optionally ``model.``-prefixed) to our key names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = wan_original_key(key.removeprefix("model."))
        if name in out:
            raise ValueError(f"two Wan keys map to {name!r}")
        out[name] = value
    return out


def load_state_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module``; any missing/extra key or shape mismatch raises ``ValueError``."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} does not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''} ({len(extra)})")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{what}: {key} has shape {tuple(tensor.shape)}, model expects "
                             f"{tuple(expected[key].shape)}")
    module.load_state_dict({key: laid_out_like(tensor, expected[key]) for key, tensor in state_dict.items()},
                           strict=True)


def laid_out_like(whole: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor as the module holds it: this process's shard where the module's parameter is sharded
    (an FSDP2 DTensor; every process holds ``whole``, so no communication), else ``whole``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return whole
    return distribute_tensor(whole.to(device=target.device_mesh.device_type, dtype=target.dtype),
                             target.device_mesh, target.placements, src_data_rank=None)


def publish_atomically(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename a finished temp file over ``path``, readable by everyone (``0644``).

    ``tempfile.mkstemp`` creates files as ``0600``; a checkpoint written that way could not be read
    by another user, e.g. the non-root ``streamgen`` user of the Docker images serving a mounted
    ``checkpoints/`` volume. ``0644`` is what a plain ``open()`` gives under the usual umask.
    """
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                            metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        publish_atomically(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(module: nn.Module, path: str | os.PathLike[str], kind: str, config: Any,
                    dtype: torch.dtype | None = None, extra_metadata: Mapping[str, str] | None = None) -> None:
    """Save ``module``'s weights with its config recorded in the safetensors metadata."""
    state = module.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"format": f"streamgen/{FORMAT_VERSION}", "kind": kind, "config": json.dumps(to_dict(config))}
    metadata.update(extra_metadata or {})
    atomic_save_safetensors(state, path, metadata)


def read_checkpoint(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a streamgen checkpoint: ``(state_dict, config_dict)``; wrong kind or corrupt file raises."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {exc}") from exc
    if not metadata.get("format", "").startswith("streamgen/"):
        raise ValueError(f"checkpoint {path} is not a streamgen checkpoint (metadata {sorted(metadata)})")
    if metadata.get("kind") != kind:
        raise ValueError(f"checkpoint {path} holds a {metadata.get('kind')!r}, expected a {kind!r}")
    return state, json.loads(metadata["config"])


def _check_config(path: str | os.PathLike[str], found: Any, expected: Any | None) -> None:
    if expected is None or found == expected:
        return
    diffs = {k: (getattr(found, k), getattr(expected, k)) for k in to_dict(found)
             if getattr(found, k) != getattr(expected, k)}
    raise ValueError(f"checkpoint {path} config does not match the requested model: "
                     + ", ".join(f"{k}: file {a!r} vs expected {b!r}" for k, (a, b) in diffs.items()))


def load_transformer(path: str | os.PathLike[str], expected: ModelConfig | None = None,
                     attention_backend: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build a :class:`CausalWanTransformer` from a checkpoint, checking its config against ``expected``."""
    from streamgen.model.transformer import CausalWanTransformer

    state, cfg_dict = read_checkpoint(path, "transformer")
    cfg = from_dict(ModelConfig, cfg_dict)
    # The frame-embedding count is the checkpoint's own layout (ModelConfig.with_layout_of): any count serves
    # a preset.
    _check_config(path, cfg, None if expected is None else expected.with_layout_of(cfg))
    model = CausalWanTransformer(cfg, attention_backend)
    load_state_strict(model, {k: v.float() for k, v in state.items()}, what=f"checkpoint {path}")
    return model.to(dtype)


def load_vae(path: str | os.PathLike[str], expected: VAEConfig | None = None) -> nn.Module:
    """Build a :class:`CausalVideoVAE` from a checkpoint, checking its config against ``expected``."""
    from streamgen.model.vae import CausalVideoVAE

    state, cfg_dict = read_checkpoint(path, "vae")
    cfg = from_dict(VAEConfig, cfg_dict)
    # The pre-pool / post-grow block counts are the checkpoint's own layout (a model is tied to the VAE file it
    # was trained with, not to its layout): any count serves a preset.
    _check_config(path, cfg, None if expected is None else expected.with_layout_of(cfg))
    vae = CausalVideoVAE(cfg)
    load_state_strict(vae, {k: v.float() for k, v in state.items()}, what=f"checkpoint {path}")
    metadata = read_metadata(path)
    if "latent_mean" in metadata and "latent_std" in metadata:
        try:
            vae.set_latent_stats(json.loads(metadata["latent_mean"]), json.loads(metadata["latent_std"]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint {path} has invalid latent_mean/latent_std metadata: {exc}") from exc
    return vae


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or foreign file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of a checkpoint (``{}`` when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {exc}") from exc


def config_from_diffusers(config: Mapping[str, Any], text_max_tokens: int = 512) -> ModelConfig:
    """Our :class:`ModelConfig` for a diffusers ``WanTransformer3DModel`` config dict."""
    if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None:
        raise ValueError("image-conditioned Wan (I2V, image_dim / added_kv_proj_dim) is not supported")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"unsupported qk_norm {config.get('qk_norm')!r}; need 'rms_norm_across_heads'")
    out_channels = config.get("out_channels") or config["in_channels"]
    if out_channels != config["in_channels"]:
        raise ValueError(f"in_channels {config['in_channels']} != out_channels {out_channels} is not supported")
    return ModelConfig(
        num_layers=config["num_layers"], num_heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"], ffn_dim=config["ffn_dim"], latent_channels=config["in_channels"],
        text_dim=config["text_dim"], text_max_tokens=text_max_tokens, patch_size=tuple(config["patch_size"]),
        freq_dim=config["freq_dim"], eps=config["eps"], cross_attn_norm=config["cross_attn_norm"],
    )


def _read_diffusers_dir(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} has no config.json; not a diffusers save_pretrained directory")
    config = json.loads(config_path.read_text())
    single = directory / "diffusion_pytorch_model.safetensors"
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    state: dict[str, torch.Tensor] = {}
    if single.is_file():
        state = read_safetensors(single)
    elif index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_safetensors(directory / shard))
    else:
        raise ValueError(f"{directory} has no diffusion_pytorch_model.safetensors (or sharded index)")
    return config, state


def from_diffusers(model_or_dir: Any, text_max_tokens: int = 512, attention_backend: str = "sdpa") -> nn.Module:
    """Load a diffusers ``WanTransformer3DModel`` (object or ``save_pretrained`` directory) into ours.

    Names map 1:1; every key must be used exactly once (``norm_added_q``, which diffusers
    itself ignores on load, is the only key dropped).
    """
    from streamgen.model.transformer import CausalWanTransformer

    if isinstance(model_or_dir, (str, os.PathLike)):
        config, state = _read_diffusers_dir(Path(model_or_dir))
    else:
        config, state = dict(model_or_dir.config), model_or_dir.state_dict()
    cfg = config_from_diffusers(config, text_max_tokens)
    state = {k: v for k, v in state.items() if ".norm_added_q." not in k}
    model = CausalWanTransformer(cfg, attention_backend)
    load_state_strict(model, {k: v.float() for k, v in state.items()}, what="diffusers WanTransformer3DModel")
    return model
