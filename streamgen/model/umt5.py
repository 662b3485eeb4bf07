"""Wan's prompt encoder: ``transformers.UMT5EncoderModel`` token states, padded to a fixed length.

Loaded from a directory in the diffusers Wan layout: ``text_encoder/`` (``config.json`` +
safetensors weights) and ``tokenizer/`` (``tokenizer.json`` / ``tokenizer_config.json``). It is a
:class:`~streamgen.model.text.TokenEncoder`, so :class:`~streamgen.model.text.TextEncoder` caches
and zero-pads it exactly as it does MiniLM.

Why the tokenizer pads to ``max_tokens`` with an attention mask instead of encoding the bare
prompt: Wan (``WanTextEncoder`` / Self-Forcing's ``utils/wan_wrapper.py``) tokenizes with
``padding="max_length"`` to 512 and masks the padding, then sets the padding rows to 0. The masked
padding changes the kept rows only by float rounding, but matching Wan's call keeps our context
bit-comparable with theirs. The rows past the prompt's length are dropped here and become exact
zeros in ``TextEncoder`` (the zero-padding contract of the transformer).

This module never imports the transformer, engine or server, and loads nothing at import.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

UMT5_MODEL_TYPES = ("umt5", "t5")


def read_text_encoder_config(text_encoder_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a UMT5 encoder directory, checked to be a (u)mT5 config."""
    path = Path(text_encoder_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing (the UMT5 text encoder's config)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if config.get("model_type") not in UMT5_MODEL_TYPES or not isinstance(config.get("d_model"), int):
        raise ValueError(f"{path}: not a UMT5 encoder config (model_type {config.get('model_type')!r})")
    return config


def _broken_weights_file(directory: Path) -> Path | None:
    """The first ``*.safetensors`` file in ``directory`` whose header or size is unreadable, if any (so a
    failed load names the file, not only its directory)."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()  # a safe_open handle is not iterable
                for name in names:
                    f.get_slice(name)
        except Exception:  # safetensors raises its own error types for a damaged file
            return path
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class UMT5TokenEncoder:
    """UMT5 token states of one prompt, loaded on first use (or by :meth:`load`).

    Args:
        text_encoder_dir: ``text_encoder/`` of a diffusers Wan directory.
        tokenizer_dir: ``tokenizer/`` beside it.
        device, dtype: where and in what precision the encoder runs (float32 or bfloat16); the
            states come back as float32 either way.

    Thread-safe like :class:`~streamgen.model.text.MiniLMTokenEncoder`: the fast tokenizer refuses
    concurrent use, so encoding is serialised.
    """

    def __init__(self, text_encoder_dir: str | Path, tokenizer_dir: str | Path, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"UMT5 runs in float32 or bfloat16, got {dtype}")
        self.text_encoder_dir = Path(text_encoder_dir)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self._dim = int(read_text_encoder_config(self.text_encoder_dir)["d_model"])
        if not self.tokenizer_dir.is_dir():
            raise ValueError(f"{self.tokenizer_dir}: missing (the UMT5 tokenizer directory)")
        self._model: Any = None  # transformers.UMT5EncoderModel once loaded
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load tokenizer and weights now; a missing or corrupt file is a ``ValueError`` naming it."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            from safetensors import SafetensorError
            from transformers import AutoTokenizer, UMT5EncoderModel
            from transformers.utils import logging as hf_logging

            # transformers draws a progress bar per load on stderr, where the server writes its
            # structured log lines; a bar there is noise to every log reader.
            hf_logging.disable_progress_bar()

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{self.tokenizer_dir}: cannot load the tokenizer: {_first_line(exc)}") from None
            try:
                model, info = UMT5EncoderModel.from_pretrained(str(self.text_encoder_dir), dtype=self.dtype,
                                                               local_files_only=True, output_loading_info=True)
            except (OSError, ValueError, RuntimeError, SafetensorError, KeyError) as exc:
                raise ValueError(f"{_broken_weights_file(self.text_encoder_dir) or self.text_encoder_dir}: cannot "
                                 f"load the UMT5 encoder: {_first_line(exc)}") from None
            # transformers only reports missing / unexpected keys and initialises the missing ones at
            # random: a silently half-random encoder, which we refuse like every other strict load.
            missing, extra = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
            if missing or extra:
                raise ValueError(f"{self.text_encoder_dir}: UMT5 weights do not match its config: missing keys "
                                 f"{missing[:8]} ({len(missing)}), unexpected keys {extra[:8]} ({len(extra)})")
            self._tokenizer = tokenizer
            self._model = model.to(self.device).eval()

    @torch.no_grad()
    def encode_one(self, prompt: str, max_tokens: int) -> torch.Tensor:
        """Token states ``[L, dim]`` float32 of the first ``L <= max_tokens`` tokens (EOS included)."""
        self.load()
        with self._lock:
            tokens = self._tokenizer([prompt], padding="max_length", max_length=max_tokens, truncation=True,
                                     add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            ids = tokens.input_ids.to(self.device)  # [1, max_tokens]
            mask = tokens.attention_mask.to(self.device)  # [1, max_tokens]
            states = self._model(input_ids=ids, attention_mask=mask).last_hidden_state  # [1, max_tokens, dim]
        num_tokens = max(1, int(mask.sum()))
        return states[0, :num_tokens].float().clone()
