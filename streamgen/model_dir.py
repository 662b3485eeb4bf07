"""Streamgen model directories: one ``model.json`` that says what to load, and the loader.

A model directory holds (or references, by a path relative to the directory or absolute)::

    model.json                 format, preset (model/vae/video/cache/sampler), parts, source
    transformer.safetensors    our transformer checkpoint (``weights.save_checkpoint`` format)
    vae/ | *.safetensors       Wan2.1's VAE (diffusers ``vae/``) or our own VAE checkpoint
    text_encoder/, tokenizer/  UMT5 (diffusers layout), or nothing for the packaged MiniLM

``model.json``::

    {"format": "streamgen-model/1",
     "preset": {"name": ..., "model": {...}, "vae": {...}, "video": {...}, "cache": {...}, "sampler": {...}},
     "transformer": "transformer.safetensors",
     "vae": {"kind": "wan" | "streamgen", "path": "vae"},
     "text_encoder": {"kind": "umt5", "path": "text_encoder", "tokenizer": "tokenizer", "dim": 4096}
                   | {"kind": "minilm", "dim": 384},
     "source": {"kind": "diffusers" | "self-forcing" | "streamgen", "path": ..., "sha256": ..., "weights": ...}}

Reading checks everything that can be checked without loading weights (every part present, the
text encoder's width equals the transformer's ``text_dim``); loading is strict (every key used
once, shapes and configs equal) and all-or-nothing: any problem is one ``ValueError`` naming the
file and what is wrong, and nothing falls back to random weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamgen.config import Preset, from_dict, to_dict

FORMAT = "streamgen-model/1"
MODEL_JSON = "model.json"
TRANSFORMER_FILE = "transformer.safetensors"
VAE_KINDS = ("wan", "streamgen")
TEXT_KINDS = ("umt5", "minilm")
MINILM_DIM = 384  # streamgen.model.text.MINILM_DIM, repeated so reading model.json needs no torch


@dataclass(frozen=True)
class ModelDir:
    """A parsed ``model.json`` with its paths resolved (nothing loaded)."""

    root: Path
    preset: Preset
    transformer: Path
    vae_kind: str
    vae: Path
    text_kind: str
    text_dim: int
    text_encoder: Path | None
    tokenizer: Path | None
    source: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What the directory holds, for ``streamgen info`` and logs."""
        return {"root": str(self.root), "preset": self.preset.name, "transformer": str(self.transformer),
                "vae": {"kind": self.vae_kind, "path": str(self.vae)},
                "text_encoder": {"kind": self.text_kind, "dim": self.text_dim,
                                 "path": None if self.text_encoder is None else str(self.text_encoder),
                                 "tokenizer": None if self.tokenizer is None else str(self.tokenizer)},
                "source": self.source}


def _resolve(root: Path, rel: object, what: str, *, is_dir: bool) -> Path:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{root / MODEL_JSON}: {what} path must be a non-empty string, got {rel!r}")
    path = (root / rel) if not os.path.isabs(rel) else Path(rel)
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise ValueError(f"{path}: missing ({what} of model directory {root})")
    return path


def read_model_dir(root: str | os.PathLike[str]) -> ModelDir:
    """Parse and check ``root/model.json``; every referenced part must exist."""
    root = Path(root)
    meta_path = root / MODEL_JSON
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (expected a streamgen model directory)")
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing (not a streamgen model directory; make one with `streamgen convert`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    unknown = set(meta) - {"format", "preset", "transformer", "vae", "text_encoder", "source"}
    if unknown:
        raise ValueError(f"{meta_path}: unknown field(s) {sorted(unknown)}")
    try:
        preset = from_dict(Preset, meta["preset"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: invalid preset: {exc}") from None
    transformer = _resolve(root, meta.get("transformer"), "transformer", is_dir=False)
    vae_spec = meta.get("vae") or {}
    vae_kind = vae_spec.get("kind")
    if vae_kind not in VAE_KINDS:
        raise ValueError(f"{meta_path}: vae kind {vae_kind!r}; valid kinds: {', '.join(VAE_KINDS)}")
    vae = _resolve(root, vae_spec.get("path"), f"{vae_kind} VAE", is_dir=vae_kind == "wan")
    text_spec = meta.get("text_encoder") or {}
    text_kind = text_spec.get("kind")
    if text_kind not in TEXT_KINDS:
        raise ValueError(f"{meta_path}: text encoder kind {text_kind!r}; valid kinds: {', '.join(TEXT_KINDS)}")
    text_encoder = tokenizer = None
    if text_kind == "umt5":
        text_encoder = _resolve(root, text_spec.get("path"), "UMT5 text encoder", is_dir=True)
        tokenizer = _resolve(root, text_spec.get("tokenizer"), "UMT5 tokenizer", is_dir=True)
        from streamgen.model.umt5 import read_text_encoder_config

        text_dim = int(read_text_encoder_config(text_encoder)["d_model"])
    else:
        text_dim = MINILM_DIM
    if text_dim != preset.model.text_dim:
        raise ValueError(f"{meta_path}: text encoder {text_kind} has width {text_dim} but the transformer "
                         f"(preset {preset.name}) expects text_dim {preset.model.text_dim}")
    source = meta.get("source") or {}
    return ModelDir(root, preset, transformer, vae_kind, vae, text_kind, text_dim, text_encoder, tokenizer,
                    dict(source))


def write_model_json(root: Path, preset: Preset, *, transformer: str, vae_kind: str, vae: str, text_kind: str,
                     text_dim: int, source: dict[str, Any], text_encoder: str | None = None,
                     tokenizer: str | None = None) -> Path:
    """Write ``root/model.json`` atomically (paths relative to ``root`` or absolute)."""
    text: dict[str, Any] = {"kind": text_kind, "dim": text_dim}
    if text_kind == "umt5":
        text.update(path=text_encoder, tokenizer=tokenizer)
    meta = {"format": FORMAT, "preset": to_dict(preset), "transformer": transformer,
            "vae": {"kind": vae_kind, "path": vae}, "text_encoder": text, "source": source}
    path = root / MODEL_JSON
    fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_JSON}.", suffix=".tmp", dir=root)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


@dataclass
class Components:
    """A loaded model directory: what the engine, the offline generator and the Pipeline run."""

    preset: Preset
    transformer: Any  # CausalWanTransformer
    vae: Any          # CausalVideoVAE | WanVideoVAE
    text: Any         # TextEncoder
    description: str


def load_text_encoder(md: ModelDir, *, device: Any = "cpu", text_dtype: Any = None, token_encoder: Any = None) -> Any:
    """The directory's prompt encoder as a :class:`~streamgen.model.text.TextEncoder`; UMT5 loads now."""
    import torch

    from streamgen.model.text import TextEncoder

    if token_encoder is None and md.text_kind == "umt5":
        from streamgen.model.umt5 import UMT5TokenEncoder

        assert md.text_encoder is not None and md.tokenizer is not None
        token_encoder = UMT5TokenEncoder(md.text_encoder, md.tokenizer, device=device,
                                         dtype=text_dtype or torch.float32)
        token_encoder.load()
    if token_encoder is not None and token_encoder.dim != md.preset.model.text_dim:
        raise ValueError(f"text encoder has width {token_encoder.dim} but the transformer expects text_dim "
                         f"{md.preset.model.text_dim}")
    return TextEncoder(md.preset.model.text_max_tokens, device=device, token_encoder=token_encoder)


def load_vae(md: ModelDir) -> Any:
    if md.vae_kind == "wan":
        from streamgen.model.wan_vae import load_wan_vae

        vae = load_wan_vae(md.vae)
    else:
        from streamgen.model.weights import load_vae as load_streamgen_vae

        vae = load_streamgen_vae(md.vae, expected=md.preset.vae)  # its pre-pool/post-grow blocks are its own
    if vae.cfg != md.preset.vae.with_layout_of(vae.cfg):
        raise ValueError(f"{md.vae}: VAE config {to_dict(vae.cfg)} differs from model.json's {to_dict(md.preset.vae)}")
    return vae.eval()


def load_model_dir(root: str | os.PathLike[str] | ModelDir, *, device: Any = "cpu", dtype: Any = None,
                   attention: str = "sdpa", text_dtype: Any = None, token_encoder: Any = None) -> Components:
    """Load every part of a model directory (strict; nothing is returned unless everything loaded).

    ``dtype`` is the transformer's (default float32); the VAE loads in float32 (the engine casts
    it); ``token_encoder`` replaces the directory's text encoder (tests, load benchmarks).
    """
    import torch

    from streamgen.model.weights import load_transformer

    md = root if isinstance(root, ModelDir) else read_model_dir(root)
    transformer = load_transformer(md.transformer, expected=md.preset.model, attention_backend=attention,
                                   dtype=dtype or torch.float32).eval().to(device)
    vae = load_vae(md).to(device)
    text = load_text_encoder(md, device=device, text_dtype=text_dtype, token_encoder=token_encoder)
    sha = str(md.source.get("sha256", ""))[:12]  # tells apart two directories of the same name
    description = (f"model={md.root.name} preset={md.preset.name} vae={md.vae_kind} text={md.text_kind}"
                   + (f" source_sha256={sha}" if sha else ""))
    return Components(md.preset, transformer, vae, text, description)
