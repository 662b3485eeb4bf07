"""``streamgen convert``: a diffusers Wan2.1 T2V directory or a Self-Forcing / CausVid training
checkpoint -> a streamgen model directory (see :mod:`streamgen.model_dir`).

Sources:

* **diffusers** (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``model_index.json``):
  the transformer is renamed 1:1 (``weights.from_diffusers``) and written as
  ``transformer.safetensors``; VAE, text encoder and tokenizer are copied (hard links where the
  file system allows, so a 11 GB UMT5 costs no space).
* **training checkpoint** (``torch.load(weights_only=True)`` of a dict with ``generator`` and/or
  ``generator_ema``, Wan-original names prefixed ``model.``, e.g. Self-Forcing's
  ``self_forcing_dmd.pt``): renamed by ``weights.convert_wan_original``; the model config, VAE and
  text encoder come from a diffusers Wan2.1 directory given as ``base`` (the checkpoint holds no
  config; the base's own transformer weights are not read).

Every source key is used exactly once; a missing, unexpected or mis-shaped key is an error that
names it. The directory is assembled under a temporary name beside ``out`` and renamed into place
only when complete, so a failed conversion never leaves a half-written model directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamgen.config import Preset, get_preset
from streamgen.model_dir import TRANSFORMER_FILE, read_model_dir, write_model_json

DIFFUSERS_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer")
CHECKPOINT_KEYS = {"ema": "generator_ema", "raw": "generator"}


def sha256_files(paths: list[Path]) -> str:
    """SHA-256 of the files' bytes in the given order (one file: its ordinary checksum)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_diffusers_dir(src: Path, parts: tuple[str, ...] = DIFFUSERS_PARTS) -> None:
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory (expected a diffusers Wan2.1 T2V directory)")
    for part in parts:
        if not (src / part).exists():
            raise ValueError(f"{src / part}: missing (a diffusers Wan2.1 T2V directory has "
                             f"{', '.join(DIFFUSERS_PARTS)})")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _transformer_files(directory: Path) -> list[Path]:
    single = directory / "diffusion_pytorch_model.safetensors"
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [directory / s for s in shards]
    raise ValueError(f"{single}: missing (no diffusers transformer weights in {directory})")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_text_encoder(src: Path, text_dim: int) -> int:
    """The UMT5 encoder's width (must equal the transformer's ``text_dim``); safetensors headers checked."""
    from safetensors import SafetensorError, safe_open

    from streamgen.model.umt5 import read_text_encoder_config

    d_model = int(read_text_encoder_config(src / "text_encoder")["d_model"])
    if d_model != text_dim:
        raise ValueError(f"{src / 'text_encoder' / 'config.json'}: text encoder width d_model={d_model} but the "
                         f"transformer expects text_dim {text_dim}")
    files = sorted((src / "text_encoder").glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src / 'text_encoder'}: no *.safetensors weights")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return d_model


def _preset_for(base: Preset, model_cfg: Any, vae_cfg: Any, name: str) -> Preset:
    if model_cfg == base.model and vae_cfg == base.vae:
        return base
    return dataclasses.replace(base, name=name, model=model_cfg, vae=vae_cfg)


def _source_dtype(state: Mapping[str, Any]) -> Any:
    """The dtype to store: the source's own floating dtype when it has one, else float32."""
    import torch

    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _stored_dtype(files: list[Path]) -> Any:
    """The floating dtype the diffusers files store (read from their headers), else float32."""
    import torch
    from safetensors import SafetensorError, safe_open

    names: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                names.update(f.get_slice(k).get_dtype() for k in f.keys())  # noqa: SIM118 (not iterable)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    floats = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    found = {floats[n] for n in names if n in floats}
    return found.pop() if len(found) == 1 else torch.float32


def _assemble(out: Path, build: Any) -> Path:
    """Run ``build(tmp_dir)`` in a temporary directory beside ``out``, then rename it to ``out``."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    read_model_dir(out)  # what we wrote must read back
    return out


def _write_parts(tmp: Path, base_dir: Path, model: Any, dtype: Any, preset: Preset, text_dim: int,
                 source: dict[str, Any]) -> None:
    from streamgen.model.weights import save_checkpoint

    save_checkpoint(model, tmp / TRANSFORMER_FILE, "transformer", preset.model, dtype=dtype)
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(base_dir / part, tmp / part, copy_function=_link_or_copy)
    write_model_json(tmp, preset, transformer=TRANSFORMER_FILE, vae_kind="wan", vae="vae", text_kind="umt5",
                     text_dim=text_dim, text_encoder="text_encoder", tokenizer="tokenizer", source=source)


def _base_parts(base_dir: Path, preset_name: str, out: Path) -> tuple[Preset, Any, Any, int]:
    """Preset, model config, VAE config and text width from a diffusers directory (weights not loaded,
    except the VAE's, which is checked strictly here)."""
    from streamgen.model.wan_vae import load_wan_vae
    from streamgen.model.weights import config_from_diffusers

    base = get_preset(preset_name)
    check_diffusers_dir(base_dir)
    _read_json(base_dir / "model_index.json")
    model_cfg = config_from_diffusers(_read_json(base_dir / "transformer" / "config.json"), base.model.text_max_tokens)
    vae_cfg = load_wan_vae(base_dir / "vae").cfg
    text_dim = _check_text_encoder(base_dir, model_cfg.text_dim)
    try:
        preset = _preset_for(base, model_cfg, vae_cfg, out.name)
    except ValueError as exc:
        raise ValueError(f"{base_dir}: does not fit preset {preset_name!r}: {exc}") from None
    return preset, model_cfg, vae_cfg, text_dim


def convert_diffusers(src: str | os.PathLike[str], out: str | os.PathLike[str], *, preset: str = "wan-1.3b") -> Path:
    """A diffusers Wan2.1 T2V directory -> model directory ``out``; ``preset`` gives video, cache and sampler."""
    from streamgen.model.weights import from_diffusers

    src, out = Path(src), Path(out)
    full_preset, model_cfg, _, text_dim = _base_parts(src, preset, out)
    files = _transformer_files(src / "transformer")
    try:
        model = from_diffusers(src / "transformer", text_max_tokens=model_cfg.text_max_tokens)
    except ValueError as exc:
        raise ValueError(f"{src / 'transformer'}: {exc}") from None
    dtype = _stored_dtype(files)
    source = {"kind": "diffusers", "path": str(src.resolve()), "sha256": sha256_files(files),
              "sha256_of": [str(p.relative_to(src)) for p in files]}
    return _assemble(out, lambda tmp: _write_parts(tmp, src, model, dtype, full_preset, text_dim, source))


def _load_error_cause(exc: BaseException) -> str:
    """What ``torch.load`` found wrong, without its advice to retry with ``weights_only=False``."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # the weights-only unpickler met something that is not tensors/containers
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].split())
        return f"the pickle holds more than tensors and plain containers: {detail or 'unsupported content'}"
    return text.splitlines()[0] if text else type(exc).__name__


def load_training_checkpoint(path: Path, weights: str) -> dict[str, Any]:
    """The chosen generator's state dict from a Self-Forcing / CausVid ``.pt`` (``weights_only`` load)."""
    import pickle

    import torch

    if weights not in CHECKPOINT_KEYS:
        raise ValueError(f"--weights must be one of {', '.join(CHECKPOINT_KEYS)}, got {weights!r}")
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    errors = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError)
    try:
        # torch warns about pickle protocols the weights-only unpickler may not know; the load either
        # succeeds or fails with its own error below, so the warning only adds noise before it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:  # memory-mapped: a multi-GB checkpoint is not read twice into memory
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                data = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except errors as exc:
        raise ValueError(f"{path}: not a loadable state-dict checkpoint ({_load_error_cause(exc)}); checkpoints "
                         "are read with torch.load(weights_only=True), which runs no code from a pickle") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: holds a {type(data).__name__}, expected a dict with "
                         f"{' and/or '.join(CHECKPOINT_KEYS.values())}")
    key = CHECKPOINT_KEYS[weights]
    if key not in data:
        have = sorted(str(k) for k in data)[:8]
        raise ValueError(f"{path}: has no {key!r} (for --weights {weights}); top-level keys: {have}")
    state = data[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: {key!r} is not a state dict of tensors")
    return dict(state)


def convert_training_checkpoint(checkpoint: str | os.PathLike[str], base: str | os.PathLike[str],
                                out: str | os.PathLike[str], *, weights: str = "ema",
                                preset: str = "wan-1.3b") -> Path:
    """A Self-Forcing / CausVid ``.pt`` + a diffusers Wan2.1 directory (config, VAE, text) -> ``out``."""
    from streamgen.model.transformer import CausalWanTransformer
    from streamgen.model.weights import convert_wan_original, load_state_strict

    checkpoint, base_dir, out = Path(checkpoint), Path(base), Path(out)
    full_preset, model_cfg, _, text_dim = _base_parts(base_dir, preset, out)
    state = load_training_checkpoint(checkpoint, weights)
    try:
        renamed = convert_wan_original(state)
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    model = CausalWanTransformer(model_cfg)
    load_state_strict(model, {k: v.float() for k, v in renamed.items()}, what=f"{checkpoint} ({weights})")
    source = {"kind": "self-forcing", "path": str(checkpoint.resolve()), "sha256": sha256_files([checkpoint]),
              "weights": weights, "base": str(base_dir.resolve())}
    dtype = _source_dtype(renamed)
    return _assemble(out, lambda tmp: _write_parts(tmp, base_dir, model, dtype, full_preset, text_dim, source))


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
            weights: str = "ema", preset: str = "wan-1.3b") -> Path:
    """Dispatch on the source: a directory is a diffusers Wan directory, a file a training checkpoint."""
    src = Path(src)
    if src.is_dir():
        if base is not None:
            raise ValueError("--base is for training checkpoints; a diffusers directory holds its own parts")
        return convert_diffusers(src, out, preset=preset)
    if not src.exists():
        raise ValueError(f"{src}: missing")
    if base is None:
        raise ValueError(f"{src}: a training checkpoint holds no config, VAE or text encoder; give --base, a "
                         "diffusers Wan2.1 T2V directory (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    return convert_training_checkpoint(src, base, out, weights=weights, preset=preset)
