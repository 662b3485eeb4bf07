"""Load a model from a model source and build an engine: the one place that loads weights to serve.

``streamgen serve`` (through :mod:`streamgen.server.app`) calls :func:`build_engine`; ``streamgen
generate`` calls :func:`load_model` for its pipeline; the server layer itself never imports the
model. A :class:`ModelSource` is those commands' model flags, validated on creation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from streamgen.attention import resolve_attention
from streamgen.config import ATTENTION_CHOICES
from streamgen.engine.engine import Engine, EngineConfig
from streamgen.precision import DTYPE_NAMES, resolve_dtype

log = logging.getLogger(__name__)

# report(name, **fields): a choice made while building (dtype and why, speed-ups), for the caller's log.
Report = Callable[..., None]


def _log_report(name: str, **fields: object) -> None:
    log.info("%s %s", name, " ".join(f"{k}={v}" for k, v in fields.items()))


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and where they run (the ``serve`` / ``generate`` model flags)."""

    preset: str
    transformer: Path | None = None
    vae: Path | None = None
    random_init: bool = False
    dtype: str = "auto"  # streamgen.precision.DTYPE_NAMES
    attention: str = "auto"  # streamgen.attention.ATTENTION_CHOICES; auto is resolved for the device at load
    text_encoder: str | None = None  # None: the model directory's, else minilm; "hash": tests and benchmarks only
    threads: int = 0
    model_dir: Path | None = None  # a streamgen model directory: replaces preset, checkpoints and encoder
    quantize: str = "none"  # streamgen.model.quantize.QUANTIZE_MODES
    compile: bool = False  # torch.compile the transformer blocks
    linear: str = "auto"  # streamgen.model.prepack.LINEAR_KERNELS: auto | onednn | aten
    device: str = "auto"  # streamgen.device: auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        from streamgen.device import parse_device

        parse_device(self.device)  # the syntax now; whether this machine has it, when loading
        if self.model_dir is not None:
            if self.transformer is not None or self.vae is not None or self.random_init:
                raise ValueError("a model directory takes no --transformer / --vae / --random-init")
        elif not self.random_init and (self.transformer is None or self.vae is None):
            raise ValueError("give --transformer and --vae checkpoints, or --random-init for random weights")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be none or int8, got {self.quantize!r}")
        if self.linear not in ("auto", "onednn", "aten"):
            raise ValueError(f"linear must be auto, onednn or aten, got {self.linear!r}")
        if self.text_encoder not in (None, "minilm", "hash"):
            raise ValueError(f"text encoder must be minilm or hash, got {self.text_encoder!r}")


@dataclass(frozen=True)
class LoadedModel:
    """Everything an engine or a pipeline runs, loaded, cast and prepared."""

    preset: Any            # streamgen.config.Preset
    transformer: Any       # CausalWanTransformer (quantized / compiled as asked)
    vae: Any
    text: Any              # streamgen.model.text.TextEncoder
    dtype: Any             # torch.dtype
    device: Any            # torch.device: where transformer and VAE are (the text encoder runs there too)
    weights: str           # a description of the weights, for ModelInfo.weights and logs


def load_model(source: ModelSource, report: Report | None = None, *, init_seed: int = 0) -> LoadedModel:
    """Load (or randomly initialise, seeded with ``init_seed``) the model, warm the prompt encoder.

    ``report(name, **fields)`` is told the choices made on the way (dtype and why, speed-ups);
    default: log them. A preset whose text width the prompt encoder cannot give is an error before
    any weights load.
    """
    report = report or _log_report
    import torch

    from streamgen.config import get_preset
    from streamgen.device import device_info, resolve_device
    from streamgen.model.text import MINILM_DIM, HashTokenEncoder, TextEncoder
    from streamgen.model.transformer import CausalWanTransformer
    from streamgen.model.vae import CausalVideoVAE
    from streamgen.model.weights import load_transformer, load_vae

    device = resolve_device(source.device)  # CUDA asked for without CUDA: ValueError, before any load
    report("device", device=device_info(device).describe())
    choice = _dtype(source, device, report)
    attention, why = resolve_attention(source.attention, device)
    report("attention", backend=attention, reason=why)
    source = replace(source, attention=attention)
    if source.threads > 0:
        torch.set_num_threads(source.threads)
    if source.model_dir is not None:
        return _load_model_dir(source, device, choice, report)
    preset = get_preset(source.preset)
    if preset.model.text_dim != MINILM_DIM:  # e.g. wan-1.3b (UMT5, 4096); checked before any weights load
        raise ValueError(f"the {source.text_encoder or 'minilm'} prompt encoder gives {MINILM_DIM}-d embeddings but "
                         f"preset {preset.name} expects text_dim {preset.model.text_dim}; use a model directory "
                         "(--model, from `streamgen convert`) that holds its text encoder")
    if source.random_init:
        torch.manual_seed(init_seed)
        model: Any = CausalWanTransformer(preset.model, source.attention)
        vae: Any = CausalVideoVAE(preset.vae)
        weights = f"random-init (seed {init_seed})"
    else:
        assert source.transformer is not None and source.vae is not None
        model = load_transformer(source.transformer, expected=preset.model, attention_backend=source.attention)
        vae = load_vae(source.vae, expected=preset.vae)
        weights = f"transformer={source.transformer.name} vae={source.vae.name}"
    token_encoder = HashTokenEncoder() if source.text_encoder == "hash" else None
    if token_encoder is not None:
        weights += " text=hash (not a language model)"
    text = TextEncoder(preset.model.text_max_tokens, token_encoder=token_encoder, device=device)
    text.encode(["warm-up"])  # load MiniLM now, not on the first client's clock
    model = _prepare(model.eval().to(device=device, dtype=choice.dtype), source, report, preset)
    return LoadedModel(preset, model, vae.to(device), text, choice.dtype, device, weights)


def build_engine(source: ModelSource, config: EngineConfig, report: Report | None = None) -> tuple[Engine, str]:
    """The engine ``streamgen serve`` runs, and a description of its weights for ModelInfo.weights."""
    m = load_model(source, report)
    return Engine(m.preset, m.transformer, m.vae, m.text, config, dtype=m.dtype, device=m.device), m.weights


def _dtype(source: ModelSource, device: Any, report: Report) -> Any:
    choice = resolve_dtype(source.dtype, device)
    report("dtype", dtype=choice.name, reason=choice.reason)
    if choice.warning:
        log.warning(choice.warning)
    return choice


def _load_model_dir(source: ModelSource, device: Any, choice: Any, report: Report) -> LoadedModel:
    """``--model DIR``: everything (preset, weights, prompt encoder) from the directory."""
    from streamgen.model.text import HashTokenEncoder
    from streamgen.model_dir import load_model_dir, read_model_dir

    assert source.model_dir is not None
    md = read_model_dir(source.model_dir)
    if source.text_encoder == "minilm" and md.text_kind != "minilm":
        raise ValueError(f"--text-encoder minilm, but {md.root} uses a {md.text_kind} text encoder "
                         f"(width {md.text_dim}); drop --text-encoder")
    token_encoder = HashTokenEncoder(md.preset.model.text_dim) if source.text_encoder == "hash" else None
    # A UMT5 encoder runs in the serving dtype, as Wan runs its T5 in bf16 (MiniLM ignores it).
    parts = load_model_dir(md, device=device, attention=source.attention, token_encoder=token_encoder,
                           text_dtype=choice.dtype)
    weights = parts.description + (" text=hash (not a language model)" if token_encoder is not None else "")
    parts.text.encode(["warm-up"])  # load the prompt encoder now, not on the first client's clock
    model = _prepare(parts.transformer.eval().to(device=device, dtype=choice.dtype), source, report, parts.preset)
    return LoadedModel(parts.preset, model, parts.vae, parts.text, choice.dtype, device, weights)


def _prepare(model: Any, source: ModelSource, report: Report, preset: Any) -> Any:
    """INT8, prepacked linears and compilation as asked (after the dtype cast); a combination that cannot run
    is a ValueError."""
    from streamgen.model.compile import prepare_for_inference
    from streamgen.model.prepack import resolve_linear

    param = next(model.parameters())
    linear = resolve_linear(source.linear, param.device, dtype=param.dtype, quantize=source.quantize,
                            compile=source.compile)
    report("linear", kernel=linear.kernel, reason=linear.reason)
    if source.quantize != "none" or source.compile:
        report("speedups", quantize=source.quantize, compile=source.compile)
    return prepare_for_inference(model, quantize=source.quantize, compile=source.compile, linear=linear.kernel,
                                 rows_hint=preset.chunk_tokens)
