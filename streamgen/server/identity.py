"""A served model's identity: one short hash of everything that decides which frames a request gets.

Replicas behind one load balancer must serve the same model, or a client's retry (or a reconnect)
lands on a replica that answers the same seed and prompt with other frames. ``GetModelInfo.model_id``
carries this hash so that a deployment script or a client can refuse a mixed pool; the descriptive
``ModelInfo.weights`` string (file names) cannot, since two files of one name may differ.

The hash covers the preset (architecture, sampler, video geometry), the serving dtype, the
transformer's and the VAE's parameters and buffers (bytes, names and shapes), and the prompt
encoder's kind. It does not cover serving limits (sessions, memory, pacing), which may differ
between replicas without changing a single frame. This module reads tensors only to hash them.
"""

from __future__ import annotations

import hashlib
import json

import torch

from streamgen.config import Preset, to_dict

MODEL_ID_HEX_CHARS = 16  # 64 bits: collisions between a handful of deployed versions are not a concern


def _hash_value(digest: hashlib._Hash, name: str, value: object) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        if t.is_quantized:  # INT8 weights (--quantize int8): their integers and scales decide the frames
            digest.update(f"{name}:scale={t.q_scale()},zero={t.q_zero_point()};".encode())
            t = t.int_repr()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bf16 has no numpy dtype; bytes do
    elif isinstance(value, tuple | list):  # packed INT8 linear parameters: (weight, bias)
        for i, item in enumerate(value):
            _hash_value(digest, f"{name}.{i}", item)
    else:
        digest.update(f"{name}={value!r};".encode())


def _hash_module(digest: hashlib._Hash, module: torch.nn.Module) -> None:
    for name, value in sorted(module.state_dict().items()):
        _hash_value(digest, name, value)


def model_id(preset: Preset, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder_kind: str) -> str:
    """``sha256:<16 hex>`` of the preset, weights and prompt encoder (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(to_dict(preset), sort_keys=True, default=str).encode())
    digest.update(f"text={text_encoder_kind};".encode())
    with torch.no_grad():
        _hash_module(digest, transformer)
        _hash_module(digest, vae)
    return f"sha256:{digest.hexdigest()[:MODEL_ID_HEX_CHARS]}"
